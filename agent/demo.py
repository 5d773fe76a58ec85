"""`edge-agent demo`: see store-and-forward work in ten seconds, without hardware.

It starts the reference gateway as a real separate process on loopback, and an agent with
a simulated production line forwarding to it. Once a second it prints what was collected,
what is waiting in the buffer and what the gateway has. At ``--outage-at`` seconds it kills
the gateway for ``--outage-for`` seconds: the backlog grows, then drains in order once
the gateway is back, and the gateway's report shows nothing missing and nothing out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import httpx

from agent.config import parse_config
from agent.runtime import Agent


def self_command() -> list[str]:
    """How to run this program again (a PyInstaller binary is its own interpreter)."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "agent"]


def operator_command(*args: str) -> str:
    """A command line an operator can paste into another shell, as printed.

    The ``edge-agent`` console script is often not on PATH (a venv not activated, ``python3
    dev.py demo``), so name it by its full path: the binary itself when frozen, else the
    script beside this interpreter, else ``python -m agent``.
    """
    if getattr(sys, "frozen", False):
        argv = [sys.executable]
    else:
        script = Path(sys.executable).parent / "edge-agent"
        argv = [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "agent"]
    return shlex.join([*argv, *args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalGateway:
    """The reference gateway as a child process; stop() and start() simulate an outage."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        #: owns the output reader of each gateway process started (set by run_demo)
        self.tasks: asyncio.TaskGroup | None = None
        self.url = f"http://127.0.0.1:{port}/v1/batches"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self_command(), "gateway", "--listen", f"127.0.0.1:{self.port}",
            "--db", str(self.workdir / "gateway.sqlite3"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(20):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("the reference gateway did not start")
                if re.search(rb"listening on", line):
                    break
        assert self.tasks is not None, "LocalGateway.tasks: the task group that owns the reader"
        self.tasks.create_task(self._drain(self.proc), name="gateway-output")

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(Exception):
            while await proc.stdout.readline():
                pass

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.proc.wait()
            await self.kill()

    async def report(self) -> dict[str, Any] | None:
        try:
            async with httpx.AsyncClient(timeout=2) as c:
                r = await c.get(f"http://127.0.0.1:{self.port}/report")
                return r.json()  # type: ignore[no-any-return]
        except (httpx.HTTPError, ValueError):
            return None


async def _run_reporting(agent: Agent, echo: Any) -> None:
    """The agent's run; an error ends the demo with its one line, not a traceback."""
    try:
        await agent.run()
    except Exception as exc:  # noqa: BLE001 - shown, and the demo winds down
        echo(f"the agent stopped: {exc}")


def _totals(report: dict[str, Any] | None) -> str:
    if report is None:
        return "gateway DOWN"
    t = report.get("totals", {})
    return (
        f"gateway has {t.get('received', 0):>6}  dup {t.get('duplicates', 0)}  "
        f"missing {t.get('missing', 0)}  out-of-order {t.get('out_of_order', 0)}"
    )


async def run_demo(
    duration: float, rate: float, outage_at: float, outage_for: float, workdir: Path | None
) -> None:
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edge-agent-demo-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    gw = LocalGateway(workdir, free_port())
    cfg = parse_config(
        {
            "agent": {"id": "demo-agent", "plant": "demo-plant"},
            "buffer": {"path": str(workdir / "buffer.db"), "checkpoint_interval": "10s"},
            "forwarder": {"backoff_initial": 0.2, "backoff_max": 2.0},
            "metrics": {"enabled": False},
            "sinks": {"gateway": {"type": "https", "url": gw.url}},
            "sources": {"line1": {"type": "simulator", "rate": rate, "seed": 7}},
        }
    )
    echo = click.echo
    from agent.logs import setup_logging

    setup_logging("warning", "text")
    echo(f"edge-agent demo: workdir {workdir}")
    echo(f"  reference gateway on {gw.url} (pid printed below); agent buffer {cfg.buffer.path}")
    echo(f"  a simulated press line produces {rate:g} events/s into stream 'line1'")
    if outage_at > 0:
        echo(f"  at {outage_at:g}s the gateway is killed for {outage_for:g}s: watch the backlog")
    echo("  Ctrl-C stops. In another shell, while it runs:")
    echo(f"    {operator_command('status', '-c', str(workdir / 'demo.toml'))}")
    (workdir / "demo.toml").write_text(
        f'[agent]\nid = "demo-agent"\nplant = "demo-plant"\n[buffer]\npath = "{cfg.buffer.path}"\n'
        f'[sinks.gateway]\ntype = "https"\nurl = "{gw.url}"\n'
    )
    # the gateway's output reader and the agent: tasks of one group, none left behind
    async with asyncio.TaskGroup() as tg:
        gw.tasks = tg
        await gw.start()
        echo(f"  gateway pid {gw.proc.pid if gw.proc else '?'}\n")
        agent = Agent(cfg)
        with contextlib.suppress(NotImplementedError):
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, agent.request_stop)
            loop.add_signal_handler(signal.SIGTERM, agent.request_stop)
        task = tg.create_task(_run_reporting(agent, echo), name="agent")
        t0 = time.monotonic()
        phase = "online"
        try:
            while not task.done():
                await asyncio.sleep(1.0)
                t = time.monotonic() - t0
                if outage_at > 0 and phase == "online" and t >= outage_at:
                    await gw.kill()
                    phase = "outage"
                    echo(">>> gateway killed: the agent keeps collecting into its buffer")
                elif phase == "outage" and t >= outage_at + outage_for:
                    await gw.start()
                    phase = "back"
                    echo(">>> gateway back: the backlog drains, in order")
                try:
                    snap = agent.snapshot().to_dict()
                except RuntimeError:  # no snapshot yet: still starting
                    snap = {}
                streams = {s["stream"]: s for s in snap.get("streams", [])}
                s = streams.get("line1")
                if s is not None:
                    report = await gw.report() if phase != "outage" else None
                    echo(
                        f"t={t:5.1f}s  collected {s['ingested_total']:>6}  "
                        f"backlog {s['backlog_events']:>5} (oldest {s['oldest_unsent_age_s'] or 0:4.1f}s)"
                        f"  sent {s['forwarded_total']:>6}  |  {_totals(report)}"
                    )
                if duration and t >= duration:
                    agent.request_stop()
        finally:
            agent.request_stop()
            await task
            report = await gw.report()
            await gw.stop()
            echo("")
            echo(f"final: {_totals(report)}")
            if report:
                for st in report.get("streams", []):
                    echo(
                        f"  stream {st.get('stream')}: complete up to sequence "
                        f"{st.get('complete_up_to')}, last checkpoint {st.get('last_checkpoint')}"
                    )
            if tmp is not None and os.environ.get("EDGE_AGENT_DEMO_KEEP") is None:
                tmp.cleanup()

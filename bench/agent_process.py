"""The whole agent process (``python -m agent run -c``) draining a backlog, timed by its own
forwarded counter: the figure a plant sees, start-up excluded."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import Deadline, spawn

#: how often the forwarded counter is read from /metrics
POLL = 0.02


def forwarded(client: httpx.Client, url: str, stream: str) -> int:
    """edge_agent_events_forwarded_total for one stream, from the agent's /metrics."""
    total = 0.0
    for line in client.get(url).text.splitlines():
        if line.startswith("edge_agent_events_forwarded_total{") and f'stream="{stream}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def drain_process(
    db: Path, d: Path, n: int, sink_toml: str, stream: str = "line1"
) -> tuple[float, str]:
    """Run the agent on the backlog in ``db`` with one sink ``central`` (``sink_toml``: the
    body of its table) until its forwarded counter reaches ``n``. Returns (events/s from the
    first sample that shows a forwarded event to the last, a note with the whole time and
    what reading the counter cost)."""
    from tests.fixtures.mosquitto import free_port

    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = d / "agent.toml"
    cfg.write_text(
        f"""[agent]
id = "a"
plant = "p"

[buffer]
path = "{db}"
durability = "fsync"
max_bytes = "8GiB"

[metrics]
enabled = true
listen = "127.0.0.1:{port}"

[log]
level = "warning"
format = "text"

[sinks.central]
{sink_toml}"""
    )
    log_path = d / "agent.log"
    log = open(log_path, "wb")
    metrics = f"http://127.0.0.1:{port}/metrics"
    t_start = time.perf_counter()
    proc = spawn([sys.executable, "-m", "agent", "run", "-c", str(cfg)], stdout=log, stderr=log)
    dl = Deadline(600)
    t_first: float | None = None
    f_first = 0
    scrapes: list[float] = []
    try:
        with httpx.Client(timeout=10) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"agent exited with {proc.returncode}: {log_path.read_text()[-800:]}"
                    )
                dl.check("whole-agent drain")
                t_scrape = time.perf_counter()
                try:
                    got = forwarded(c, metrics, stream)
                except httpx.TransportError:
                    got = 0  # not listening yet
                now = time.perf_counter()
                if got:
                    scrapes.append(now - t_scrape)
                if got > 0 and t_first is None:
                    t_first, f_first = now, got
                if got >= n:
                    break
                time.sleep(POLL)
        assert t_first is not None
        total = now - t_start
        if f_first >= n:  # drained between two samples: only the whole time is known
            rate = n / total
        else:
            # the events of the first sample went out at some point before it: counted from
            # that sample, the rate leaves them out, and the process's start-up with them
            rate = (n - f_first) / (now - t_first)
        mean_ms = sum(scrapes) / len(scrapes) * 1000 if scrapes else 0.0
        note = (
            f"{total:.2f} s from process start; /metrics read {len(scrapes)} times while "
            f"draining, every {POLL * 1000:.0f} ms, {mean_ms:.1f} ms per read"
        )
        return rate, note
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

"""Figure 6: peak RSS of the agent process (``python -m agent run``) draining a 1,000,000-event
backlog to the reference gateway over HTTPS; and ``status --json`` wall time with that
backlog (issue 6: under a second)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import Ctx, Deadline, figure, fill, spawn
from bench.drain_https import start_gateway


def write_config(d: Path, db: Path, gw: Any) -> Path:
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
enabled = false

[log]
level = "warning"
format = "text"

[sinks.central]
type = "https"
url = "{gw.url}"
ca_file = "{gw.ca_file}"
"""
    )
    return cfg


def status_time(cfg: Path) -> tuple[float, int]:
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "-c", str(cfg)],
        capture_output=True,
        timeout=60,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    el = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"status failed: {p.stderr.decode()[-500:]}")
    return el, len(p.stdout)


def run(ctx: Ctx) -> dict[str, Any]:
    from gateway.store import received_count

    d = ctx.dir("memory")
    n = ctx.n(1_000_000, 200_000)
    db = d / "buffer.db"
    t = time.perf_counter()
    asyncio.run(fill(db, n, "line1"))
    fill_s = time.perf_counter() - t
    gw = start_gateway(d / "gw")
    try:
        cfg = write_config(d, db, gw)
        st, _ = min(status_time(cfg) for _ in range(3))
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "agent", "--version"], capture_output=True, timeout=60
        )
        startup = time.perf_counter() - t
        log = open(d / "agent.log", "wb")
        proc = spawn([sys.executable, "-m", "agent", "run", "-c", str(cfg)], stdout=log, stderr=log)
        ps = psutil.Process(proc.pid)
        peak = 0
        dl = Deadline(ctx.n(400, 120))
        t0 = time.perf_counter()
        got = 0
        samples = 0
        while not dl.over() and proc.poll() is None:
            peak = max(peak, ps.memory_info().rss)
            samples += 1
            if samples % 10 == 0:
                got = received_count(gw.db_path, "line1")
                if got >= n:
                    break
            time.sleep(0.1)
        el = time.perf_counter() - t0
        if proc.poll() is not None:
            raise RuntimeError(
                f"agent exited with {proc.returncode}: {(d / 'agent.log').read_text()[-800:]}"
            )
        proc.terminate()
        proc.wait(20)
    finally:
        gw.stop()
    mb = peak / 1e6
    return {
        "memory": figure(
            value=mb,
            unit="MB peak RSS",
            target="<= 150 MB",
            met=mb <= 150,
            detail=(
                f"`python -m agent run` draining a {n:,}-event backlog over HTTPS: "
                f"{got:,} delivered in {el:.0f} s ({got / el:,.0f}/s); RSS sampled every 0.1 s"
            ),
        ),
        "status_time": figure(
            value=st,
            unit="s",
            target="< 1 s",
            met=st < 1.0,
            detail=f"best of 3 `python -m agent status --json` with {n:,} events unsent (fill took {fill_s:.0f} s); `--version` alone (interpreter + CLI imports) {startup:.2f} s",
        ),
    }

"""The whole agent process (``python -m agent run -c``) draining a backlog, timed from its
first batch at the peer to its acknowledged cursor covering the backlog: the figure a
plant sees, start-up excluded (issue 16 measured the MQTT drain this way).

The cursor is read from the buffer file itself (the streams row an ack updates in its own
transaction), every POLL, by a read-only connection of this process. Not from /metrics:
its counters come from the status snapshot, refreshed with each heartbeat, so they move in
steps of HEARTBEAT_INTERVAL (2 s) and a drain timed by them is quantised to the heartbeat:
a backlog acknowledged at 2.1 s showed as 4.2 s. That step, not the agent, is also what
issue 16's "1.95 s until the forwarded counter reached the backlog although a subscriber
had every message after 0.65 s" measured."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Deadline, spawn

#: the wait between two reads of the acknowledged cursor
POLL = 0.02


def acknowledged(db: Path, stream: str) -> int:
    """Events of ``stream`` the agent has acknowledged (streams.forwarded_total), read from
    the file; 0 before the agent created it."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.OperationalError:
        return 0
    try:
        row = conn.execute(
            "SELECT forwarded_total FROM streams WHERE name = ?", (stream,)
        ).fetchone()
        return int(row[0]) if row else 0
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def drain_process(
    db: Path,
    d: Path,
    n: int,
    sink_toml: str,
    first_seen: Callable[[], float | None],
    stream: str = "line1",
) -> tuple[float, str]:
    """Run the agent on the backlog in ``db`` with one sink ``central`` (``sink_toml``: the
    body of its table) until its acknowledged cursor covers ``n`` events.

    The clock starts when the peer sees the agent's first batch (``first_seen``: the
    receiver's or a subscriber's ``time.monotonic()`` of it, None before), which no
    revision's start-up order can move, and stops at the first read of the cursor that shows
    the whole backlog acknowledged. Returns (events/s, a note with the times)."""
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
    t_start = time.monotonic()
    proc = spawn([sys.executable, "-m", "agent", "run", "-c", str(cfg)], stdout=log, stderr=log)
    dl = Deadline(600)

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(
                f"agent exited with {proc.returncode}: {log_path.read_text()[-800:]}"
            )
        dl.check("whole-agent drain")

    reads: list[float] = []
    try:
        while (t0 := first_seen()) is None:
            alive()
            time.sleep(0.005)
        while True:
            alive()
            t = time.monotonic()
            got = acknowledged(db, stream)
            now = time.monotonic()
            reads.append(now - t)
            if got >= n:
                break
            time.sleep(POLL)
        el = now - t0
        mean_ms = sum(reads) / len(reads) * 1000
        note = (
            f"first batch at the peer {t0 - t_start:.2f} s after process start, backlog "
            f"acknowledged {el:.2f} s later (cursor read from the file every {POLL * 1000:.0f} "
            f"ms, {mean_ms:.1f} ms per read)"
        )
        return n / el, note
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

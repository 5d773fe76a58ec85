"""The whole agent process (``python -m agent run -c``) draining a backlog, timed from its
first batch at the peer to its own forwarded counter covering the backlog: the figure a
plant sees, start-up excluded (issue 16 measured the MQTT drain this way)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.common import Deadline, spawn

#: the shortest wait between two reads of the forwarded counter (/metrics)
POLL = 0.02


def _next_poll(t0: float, now: float, got: int, n: int) -> float:
    """A scrape builds the agent's status snapshot (tens of ms on its event loop), so the
    counter is read sparsely: half the predicted time left, shrinking to POLL near the end,
    which keeps the end time exact to about POLL with a handful of reads."""
    if got <= 0 or now <= t0:
        return POLL
    left = (n - got) / (got / (now - t0))
    return max(POLL, min(left / 2, 1.0))


def forwarded(client: httpx.Client, url: str, stream: str) -> int:
    """edge_agent_events_forwarded_total for one stream, from the agent's /metrics."""
    total = 0.0
    for line in client.get(url).text.splitlines():
        if line.startswith("edge_agent_events_forwarded_total{") and f'stream="{stream}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def drain_process(
    db: Path,
    d: Path,
    n: int,
    sink_toml: str,
    first_seen: Callable[[], float | None],
    stream: str = "line1",
) -> tuple[float, str]:
    """Run the agent on the backlog in ``db`` with one sink ``central`` (``sink_toml``: the
    body of its table) until its forwarded counter reaches ``n``.

    The clock starts when the peer sees the agent's first batch (``first_seen``: the
    receiver's or a subscriber's ``time.monotonic()`` of it, None before), which no
    revision's start-up order can move, and stops at the first read of the counter that
    shows the whole backlog acknowledged. Returns (events/s, a note with the times and
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
    t_start = time.monotonic()
    proc = spawn([sys.executable, "-m", "agent", "run", "-c", str(cfg)], stdout=log, stderr=log)
    dl = Deadline(600)

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(
                f"agent exited with {proc.returncode}: {log_path.read_text()[-800:]}"
            )
        dl.check("whole-agent drain")

    scrapes: list[float] = []
    try:
        while (t0 := first_seen()) is None:
            alive()
            time.sleep(0.005)
        with httpx.Client(timeout=10) as c:
            while True:
                alive()
                t = time.monotonic()
                try:
                    got = forwarded(c, metrics, stream)
                except httpx.TransportError:
                    got = 0  # not listening (yet)
                now = time.monotonic()
                scrapes.append(now - t)
                if got >= n:
                    break
                time.sleep(_next_poll(t0, now, got, n))
        el = now - t0
        mean_ms = sum(scrapes) / len(scrapes) * 1000
        note = (
            f"first batch at the peer {t0 - t_start:.2f} s after process start, backlog "
            f"acknowledged {el:.2f} s later; forwarded counter read {len(scrapes)} times "
            f"(/metrics, {mean_ms:.0f} ms per read)"
        )
        return n / el, note
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

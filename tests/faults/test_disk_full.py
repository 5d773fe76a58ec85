"""A disk that fills up under the buffer: the agent refuses new events with a clear error
(503 to the MES, the reason in status), keeps every event it acknowledged, and accepts again
once space returns.

As root the buffer lives on a small tmpfs this test mounts (and unmounts). Without root no
real filesystem can be filled safely: the test then runs the same story against
buffer.max_bytes (space returns when the gateway drains the backlog) and says so in its
output; run the suite as root (as CI does) for the real thing."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.campaign import (
    MesClient,
    check_delivery,
    mes_source,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import agent_config, free_port, https_sink

FS_SIZE = 8 * 1024 * 1024
FILLER = 5 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """An 8 MiB tmpfs (root), or None (not root: fall back to max_bytes)."""
    if os.geteuid() != 0:
        print("disk full: not root, so no tmpfs: buffer.max_bytes stands in for the disk")
        yield None
        return
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_refuses_keeps_and_recovers(small_fs, gateway, agent_process, tmp_path):
    real = small_fs is not None
    where = small_fs if real else tmp_path / "fs"
    where.mkdir(exist_ok=True)
    filler = where / "filler"
    if real:
        filler.write_bytes(b"\0" * FILLER)
    db = where / "buffer.db"
    gw = gateway()
    gw.stop()  # nothing drains: the buffer can only grow
    port = free_port()
    cfg = agent_config(
        tmp_path / "agent",
        sinks={"central": https_sink(gw)},
        sources={"mes": mes_source(port)},
        buffer={
            "path": str(db),
            "max_bytes": "1GiB" if real else "256KiB",
            "on_full": "block",
        },
    )
    agent = agent_process(cfg, workdir=tmp_path / "agent").start(wait_ready=False)
    wait_listening(agent, port)
    mes = MesClient(port, batch=20, give_up_on_503=True).start()
    deadline = time.monotonic() + 90
    while not mes.refused:
        assert time.monotonic() < deadline, f"the disk never filled: {mes.statuses}"
        time.sleep(0.1)
    mes.stop()
    assert not mes.problems, mes.problems[:5]
    acked_while_full = len(mes.acked)
    assert acked_while_full > 0

    # status while full (checked at the end, so the rest of the story is tested either way)
    def tells_why(st: dict) -> bool:
        error = st["buffer"].get("last_write_error") or ""
        srcs = st["sources"]
        return bool(
            st["agent"]["running"]
            and srcs
            and (srcs[0]["last_error"] or "").startswith("503")
            and (not real or "disk full" in error)
        )

    deadline = time.monotonic() + 20  # the heartbeat carries last_error: every 2 s
    status_while_full = agent.status()
    while not tells_why(status_while_full) and time.monotonic() < deadline:
        time.sleep(0.3)
        status_while_full = agent.status()
    # still refusing while full, and still running
    with httpx.Client(timeout=10) as client:
        assert mes.push_once(client, [10_000_001]) == 503
    assert agent.proc.poll() is None

    # what it acknowledged is in the file (read-only, while the agent runs)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    stored = {r[0] for r in conn.execute("SELECT id FROM events")}
    conn.close()
    missing = [n for n, a in mes.acked.items() if a.id not in stored]
    assert not missing, f"acknowledged events not in the buffer: {missing[:10]}"

    # space returns: accepted again, without a restart
    if real:
        filler.unlink()
    else:
        gw.start()  # the backlog drains: room in max_bytes again
    with httpx.Client(timeout=10) as client:
        deadline = time.monotonic() + 30
        while mes.push_once(client, [10_000_002]) != 202:
            assert time.monotonic() < deadline, (
                f"not accepting after space returned: {mes.statuses}"
            )
            time.sleep(0.5)

    if real:
        gw.start()
    wait_drained(agent)
    summary = check_delivery(gw, mes.acked)
    print(f"disk full: {acked_while_full} accepted before the disk filled, gateway {summary}")
    agent.wait(lambda s: not s["buffer"].get("last_write_error"), 20, "the write error cleared")
    assert agent.stop() == 0
    # status told the operator, while the disk was full, that the agent runs and why it refuses
    buffer = status_while_full["buffer"]
    assert status_while_full["agent"]["running"], status_while_full["agent"]
    if real:
        error = buffer.get("last_write_error") or ""
        assert "disk full" in error and str(db) in error, buffer
    [src] = status_while_full["sources"]
    assert (src["last_error"] or "").startswith("503"), src

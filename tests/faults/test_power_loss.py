"""A power-loss approximation: durability "fsync", the agent SIGKILLed the instant an MES
got its 202. The acknowledged event must be in the buffer file (read here read-only with
sqlite3, before any restart) and must reach the gateway after the restart.

What this does NOT simulate: a real power cut also loses the disk's volatile write cache
and whatever the kernel had not written. SIGKILL only ends the process; the page cache
survives. The guarantee against a real power cut rests on synchronous=FULL (fsync of the
WAL before COMMIT returns, and so before the 202) and on the disk honouring flushes;
docs/guarantees.md says what that buys and what it does not. The real power cuts (a
filesystem that forgets what was not fsynced) are in test_power_cuts.py.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.campaign import (
    LONG,
    MesClient,
    check_delivery,
    mes_source,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import agent_config, free_port, https_sink

# the long run (EDGE_AGENT_FAULTS_LONG=1) outlasts the suite's default per-test timeout
pytestmark = pytest.mark.timeout(3600 if LONG else 600)

ROUNDS = 100 if LONG else 10


def stored_ids(path: Path) -> set[str]:
    """Event ids in the buffer file, read-only, as they are after the crash (WAL included)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM events")}
    finally:
        conn.close()


def test_acknowledged_events_are_in_the_file_when_killed_right_after_the_202(
    gateway, agent_process, tmp_path
):
    gw = gateway()
    gw.stop()  # nothing is forwarded (and deleted) before the file is inspected
    port = free_port()
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw)},
        sources={"mes": mes_source(port)},
        buffer={"durability": "fsync"},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    mes = MesClient(port)
    path = tmp_path / "buffer.db"
    started = time.monotonic()
    for r in range(ROUNDS):
        agent.start(wait_ready=False)
        wait_listening(agent, port)
        numbers = [r * 3 + 1, r * 3 + 2, r * 3 + 3]
        with httpx.Client(timeout=10) as client:
            for n in numbers:
                assert mes.push_once(client, [n]) == 202, mes.statuses
            # the 202 is in: no goodbye, no checkpoint, no close
            agent.kill()
        have = stored_ids(path)
        lost = [n for n in numbers if mes.acked[n].id not in have]
        assert not lost, f"round {r}: acknowledged MES events not in the file: {lost}"
    assert agent.status()["buffer"]["durability"] == "fsync"
    agent.start(wait_ready=False)
    gw.start()
    wait_drained(agent)
    summary = check_delivery(gw, mes.acked)
    assert summary["acked"] == 3 * ROUNDS
    print(f"power loss: {ROUNDS} kills in {time.monotonic() - started:.1f}s, gateway {summary}")
    assert agent.stop() == 0

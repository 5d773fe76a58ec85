"""What the agent finds at start: a corrupt buffer file (quarantined, a clear error, never
overwritten) and a buffer file from an older schema version (migrated, nothing lost)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from agent.buffer import SCHEMA_VERSION, Buffer
from agent.interfaces import NewEvent
from tests.fixtures.campaign import (
    MesClient,
    check_delivery,
    mes_source,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import ROOT, agent_config, free_port, https_sink


def run_once(agent) -> subprocess.CompletedProcess[str]:
    """`edge-agent run` in the foreground, for a start that must fail."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "run", "-c", str(agent.config_path)],
        capture_output=True, text=True, cwd=str(ROOT), timeout=60,
    )  # fmt: skip


def test_corrupt_buffer_is_quarantined_with_a_clear_error(gateway, agent_process, tmp_path):
    gw = gateway()
    gw.stop()
    port = free_port()
    cfg = agent_config(
        tmp_path, sinks={"central": https_sink(gw)}, sources={"mes": mes_source(port)}
    )
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_listening(agent, port)
    mes = MesClient(port, batch=10).start()
    while len(mes.acked) < 200:
        assert agent.proc.poll() is None, agent.log()[-2000:]
        time.sleep(0.05)
    mes.stop()
    assert agent.stop() == 0
    path = tmp_path / "buffer.db"
    raw = bytearray(path.read_bytes())
    raw[0:100] = b"\xde\xad" * 50  # the SQLite header: "file is not a database"
    path.write_bytes(bytes(raw))

    res = run_once(agent)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    [err] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    [moved] = list(tmp_path.glob("buffer.db.corrupt-*"))
    assert str(path) in err and str(moved) in err and "moved aside" in err, err
    assert "recover" in err, f"the error should say how to recover the events: {err}"
    assert moved.read_bytes() == bytes(raw), "the corrupt file was changed"
    assert not path.exists()

    # the next start begins a new buffer (new epoch); the old file is still there, untouched
    agent.start(wait_ready=False)
    wait_listening(agent, port)
    with httpx.Client(timeout=10) as client:
        assert mes.push_once(client, [5001]) == 202
    assert mes.acked[5001].sequence == 1
    gw.start()
    wait_drained(agent)
    assert moved.read_bytes() == bytes(raw)
    assert [e["data"]["work_order"] for e in gw.events("mes")] == ["WO-9701"]
    assert agent.stop() == 0


async def make_schema1_file(path: Path, n: int) -> list[str]:
    """A buffer as a schema-1 agent left it: the schema-1 tables only (MIGRATIONS[0]),
    user_version 1, n unsent events. Written by today's Buffer, then the later tables are
    removed, so the rows are exactly what schema 1 stores."""
    buf = await Buffer.open(path, plant="test-plant", agent_id="test-agent")
    data = {"work_order": "WO-OLD", "item": "PN-1", "good": {"value": 1, "uom": "EA"}}
    committed = await buf.append(
        "mes",
        [
            NewEvent("mfg.production.counted", dict(data, work_order=f"WO-OLD-{i}"),
                     "2026-11-23T10:00:00.000Z", subject=f"old-{i}")
            for i in range(n)
        ],
    )  # fmt: skip
    await buf.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TABLE replays")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    return [c.id for c in committed]


def test_schema1_buffer_is_migrated_and_everything_arrives(gateway, agent_process, tmp_path):
    old_ids = asyncio.run(make_schema1_file(tmp_path / "buffer.db", 300))
    epoch = (
        sqlite3.connect(tmp_path / "buffer.db")
        .execute("SELECT value FROM meta WHERE key = 'epoch'")
        .fetchone()[0]
    )
    gw = gateway()
    port = free_port()
    cfg = agent_config(
        tmp_path, sinks={"central": https_sink(gw)}, sources={"mes": mes_source(port)}
    )
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_listening(agent, port)
    mes = MesClient(port, batch=10)
    with httpx.Client(timeout=10) as client:
        assert mes.push_once(client, list(range(1, 11))) == 202
    assert [mes.acked[n].sequence for n in range(1, 11)] == list(range(301, 311))
    wait_drained(agent)
    check_delivery(gw, mes.acked)
    events = gw.events("mes")
    assert [e["id"] for e in events[:300]] == old_ids
    assert {e["streamepoch"] for e in events} == {epoch}
    assert agent.stop() == 0
    version = sqlite3.connect(tmp_path / "buffer.db").execute("PRAGMA user_version").fetchone()
    assert version[0] == SCHEMA_VERSION
    assert "migrated from schema 1" in agent.log()

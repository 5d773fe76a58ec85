"""Real power cuts: the agent's buffer and drop folder on powerfs (tests/fixtures/powerfs), a
filesystem that keeps only what was fsynced and forgets the rest when the power is cut.

* the campaign (tests/fixtures/powerfs/campaign.py): the real agent ingesting from an MES
  over HTTP and from the drop folder while forwarding to the reference gateway, SIGKILLed
  and power-cut at random moments, remounted, restarted. 20 cuts here; the long run is
  ``python -m tests.fixtures.powerfs --cuts 100``. Each test prints its seed; replay with
  ``EDGE_AGENT_FAULTS_SEED=N``.
* one regression test per bug the campaign found, each the cut that found it, made exact.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from tests.fixtures.campaign import (
    LONG,
    MesClient,
    mes_source,
    seeded,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import agent_config, free_port, https_sink
from tests.fixtures.powerfs.campaign import Campaign
from tests.fixtures.powerfs.mount import PowerMount

pytestmark = pytest.mark.timeout(3600 if LONG else 900)

CUTS = 100 if LONG else 20


@pytest.fixture
def powerfs(tmp_path: Path) -> Iterator[Callable[..., PowerMount]]:
    made: list[PowerMount] = []

    def make(**options: object) -> PowerMount:
        m = PowerMount(tmp_path / "disk", tmp_path / "mnt", **options)  # type: ignore[arg-type]
        made.append(m)
        return m.mount()

    yield make
    for m in made:
        m.unmount()


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def run_campaign(tmp_path: Path, durability: str, cuts: int) -> Campaign:
    rng = seeded(f"power cuts ({durability})")
    campaign = Campaign(
        tmp_path / "run", durability=durability, cuts=cuts, seed=rng.randrange(10**6)
    )
    result = campaign.run()
    print(result.summary())
    assert not result.failures, "\n\n".join(result.failures[:3])
    assert result.mes_acked >= cuts and result.files_acked >= cuts, (
        f"too little acknowledged to mean anything: {result.summary()}"
    )
    return campaign


def test_power_cuts_with_durability_fsync_lose_nothing_acknowledged(tmp_path):
    result = run_campaign(tmp_path, "fsync", CUTS).result
    assert result.lost == []
    assert result.arrived >= result.acknowledged


def test_power_cuts_with_durability_os_lose_only_the_last_commits(tmp_path):
    result = run_campaign(tmp_path, "os", CUTS // 2).result
    # what docs/guarantees.md promises for "os": what is lost was acknowledged shortly
    # before the cut (after the last WAL sync), never a torn or unopenable buffer, never an
    # event the gateway had already seen (the check above: no sequence with two ids)
    assert result.loss_window_s < 5, result.summary()


# ---------------------------------------------------------------------- regressions


def start_agent(agent_process, tmp_path: Path, buffer: Path, port: int, gw, **buffer_opts):
    cfg = agent_config(
        tmp_path / "agent",
        sinks={"central": https_sink(gw)},
        sources={"mes": mes_source(port)},
        buffer={"path": str(buffer), "durability": "fsync", **buffer_opts},
    )
    agent = agent_process(cfg, workdir=tmp_path / "agent")
    agent.start(wait_ready=False)
    wait_listening(agent, port)
    return agent


def test_cut_after_first_start_keeps_the_buffer_in_the_directory_the_agent_created(
    powerfs, gateway, agent_process, tmp_path
):
    """Found by the campaign (its first cuts): the agent created var/edge-agent/ itself and
    never fsynced the parents, so after a cut the directory, and the buffer with every
    acknowledged event in it, was gone; the agent began a new buffer (a new epoch)."""
    fs = powerfs()
    gw = gateway()
    gw.stop()  # nothing is forwarded, so every acknowledged event must be in the file
    buffer = fs.mountpoint / "var" / "edge-agent" / "buffer.db"
    port = free_port()
    agent = start_agent(agent_process, tmp_path, buffer, port, gw)
    mes = MesClient(port)
    with httpx.Client(timeout=10) as client:
        for n in (1, 2, 3):
            assert mes.push_once(client, [n]) == 202
    agent.kill()
    fs.cut(seed=1)
    fs.mount()
    assert buffer.exists(), f"after the cut: {sorted(os.listdir(fs.mountpoint))}"
    with closing(read_only(buffer)) as db:
        ids = {r[0] for r in db.execute("SELECT id FROM events")}
    assert {mes.acked[n].id for n in (1, 2, 3)} <= ids


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 60, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def test_cut_after_a_quarantine_keeps_the_file_where_the_error_said(
    powerfs, gateway, agent_process, tmp_path
):
    """The quarantine renames buffer.db to buffer.db.corrupt-STAMP and says so; without an
    fsync of the directory a cut undid the rename: the message pointed at a file that did
    not exist, and the corrupt file was back under the buffer's name."""
    fs = powerfs()
    gw = gateway()
    buffer = fs.mountpoint / "buffer.db"
    fd = os.open(buffer, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\xde\xad" * 4096)  # not SQLite
    os.fsync(fd)
    os.close(fd)
    dfd = os.open(fs.mountpoint, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    cfg = agent_config(
        tmp_path / "agent",
        sinks={"central": https_sink(gw)},
        buffer={"path": str(buffer), "durability": "fsync"},
    )
    agent = agent_process(cfg, workdir=tmp_path / "agent").start(wait_ready=False)
    assert agent.proc is not None
    assert agent.proc.wait(60) == 1, agent.log()[-2000:]
    [moved] = list(fs.mountpoint.glob("buffer.db.corrupt-*"))
    assert moved.name in agent.log()
    fs.cut(seed=2)
    fs.mount()
    assert sorted(p.name for p in fs.mountpoint.iterdir()) == [moved.name]
    assert moved.read_bytes() == b"\xde\xad" * 4096


def gateway_batches(gw) -> list[tuple[int, int, str]]:
    db = sqlite3.connect(f"file:{gw.db_path}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT first_sequence, last_sequence, key FROM batches ORDER BY bn"
        ).fetchall()
    finally:
        db.close()


ROUNDS = 4


def test_cut_right_after_the_first_send_resends_under_the_same_idempotency_key(
    powerfs, gateway, agent_process, tmp_path
):
    """Found by the campaign (3 times in 15 cuts): the batch row was committed without an
    fsync, so a cut just after the first send lost it and the events went again under a
    new key, against the wire contract. The gateway here stores every batch and cuts the
    answer (drop_acks), so the agent keeps resending the batch; the cut comes as soon as
    the gateway has it. Several rounds: anything the agent fsyncs soon after (its
    once-a-second checkpoint, the sink error it records) makes the row durable if the cut
    comes late; without the fix about one round in three shows the new key."""
    fs = powerfs()
    (fs.mountpoint / "var").mkdir()
    dfd = os.open(fs.mountpoint, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    gw = gateway()
    buffer = fs.mountpoint / "var" / "buffer.db"
    port = free_port()
    mes = MesClient(port)
    for r in range(ROUNDS):
        gw.control(drop_acks=-1)
        agent = start_agent(agent_process, tmp_path / f"round{r}", buffer, port, gw)
        with httpx.Client(timeout=10) as client:
            assert mes.push_once(client, [r * 10 + i for i in range(1, 6)]) == 202
        wait_for(lambda r=r: len(gateway_batches(gw)) > r, "the first send", 30, poll=0.005)
        agent.kill()
        fs.cut(seed=10 + r)
        fs.mount()
        gw.control(drop_acks=0)
        agent = start_agent(agent_process, tmp_path / f"after{r}", buffer, port, gw)
        wait_drained(agent)
        assert agent.stop() == 0
    assert len({e["id"] for e in gw.events("mes")}) == 5 * ROUNDS
    batches = gateway_batches(gw)
    assert len(batches) == ROUNDS, f"a batch went again under a new key: {batches}"


def make_v1_buffer(path: Path) -> None:
    """A buffer file at schema version 1 with one event, made durable (a clean close)."""
    from agent.buffer import MIGRATIONS

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for stmt in MIGRATIONS[0].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO meta VALUES ('epoch', '01OLDEPOCH00000000000000000')")
    conn.execute(
        "INSERT INTO streams (name, last_seq, ingested_total, stored_bytes) VALUES ('s', 1, 1, 10)"
    )
    conn.execute("INSERT INTO events VALUES (1, 1, 'ID1', 0, 10, x'7b7d', 0)")
    conn.close()


@pytest.mark.parametrize("crash", ["lose", "reorder"])
def test_cut_after_a_schema_migration_keeps_the_migrated_file(powerfs, tmp_path, crash):
    """A migration the agent reported done (the buffer opened) survives the cut with
    durability fsync; with crash=reorder a random part of the unsynced writes also
    reaches the disk, and the file must open all the same."""
    import subprocess
    import sys

    from agent.buffer import SCHEMA_VERSION

    fs = powerfs(crash=crash)
    path = fs.mountpoint / "buffer.db"
    for seed in range(2):
        make_v1_buffer(path)
        dfd = os.open(fs.mountpoint, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        res = subprocess.run(
            [sys.executable, "-m", "tests.fixtures.programs.open_and_die", str(path), "fsync"],
            capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parents[2]),
        )  # fmt: skip
        assert "opened" in res.stdout, res.stderr[-2000:]
        fs.cut(seed=seed)
        fs.mount()
        with closing(read_only(path)) as db:
            assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert db.execute("SELECT id FROM events").fetchall() == [("ID1",)]
            assert db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone() == (
                "01OLDEPOCH00000000000000000",
            )
        for p in fs.mountpoint.iterdir():
            p.unlink()

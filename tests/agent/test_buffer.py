"""The buffer against a real SQLite file: durability, order, limits, recovery."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson
import pytest

from agent.buffer import MIGRATIONS, SCHEMA_VERSION, Buffer, operator
from agent.errors import BufferCorrupt, BufferError_, BufferFull
from agent.interfaces import NewEvent


def ev(i: int, pad: int = 0, sei: str | None = None) -> NewEvent:
    data = {"work_order": "WO-1", "item": "P-1", "good": {"value": i, "uom": "EA"}}
    if pad:
        data["pad"] = "x" * pad
    return NewEvent("mfg.production.counted", data, "2026-11-23T10:00:00.000Z", subject=f"s{i}",
                    source_event_id=sei)  # fmt: skip


async def open_buffer(path: Path, **kw) -> Buffer:
    return await Buffer.open(path, plant="p1", agent_id="a1", **kw)


async def drain_all(b: Buffer, stream: str) -> list[dict]:
    out = []
    while batch := await b.take_batch(stream, 0, 1000, 1 << 20):
        out.extend(orjson.loads(x) for x in batch.bodies)
        await b.ack(batch)
    return out


async def test_envelope_sequence_and_ids_assigned_at_commit(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    c1 = await b.append("line1", [ev(1), ev(2)])
    c2 = await b.append("line2", [ev(3)])
    c3 = await b.append("line1", [ev(4)])
    assert [c.sequence for c in c1 + c3] == [1, 2, 3]
    assert c2[0].sequence == 1
    events = await drain_all(b, "line1")
    assert [e["sequence"] for e in events] == [f"{i:020d}" for i in (1, 2, 3)]
    assert [e["id"] for e in events] == [c.id for c in c1 + c3]
    e = events[0]
    assert e["specversion"] == "1.0" and e["source"] == "edge-agent://p1/line1"
    assert e["streamepoch"] == b.epoch and e["plant"] == "p1" and e["agentid"] == "a1"
    assert e["dataschema"] == "urn:edge-agent:schema:mfg.production.counted:1"
    assert e["time"] == "2026-11-23T10:00:00.000Z" and e["data"]["good"] == {
        "value": 1,
        "uom": "EA",
    }
    assert len({x["id"] for x in events}) == 3 and all(len(x["id"]) == 26 for x in events)
    await b.close()


async def test_committed_events_survive_reopen_with_same_ids(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    committed = await b.append("s", [ev(i) for i in range(50)])
    epoch = b.epoch
    # no close(): the file is what a crash leaves behind
    b2 = await open_buffer(tmp_path / "b.db")
    assert b2.epoch == epoch
    events = await drain_all(b2, "s")
    assert [e["id"] for e in events] == [c.id for c in committed]
    more = await b2.append("s", [ev(99)])
    assert more[0].sequence == 51
    await b2.close()
    await b.close()


async def test_group_commit_shares_transactions(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    results = await asyncio.gather(*(b.append("s", [ev(i)]) for i in range(500)))
    seqs = sorted(r[0].sequence for r in results)
    assert seqs == list(range(1, 501))
    assert b.commits < 100, f"{b.commits} transactions for 500 concurrent appends"
    await b.close()


async def test_block_policy_refuses_whole_append_and_counts(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db", max_bytes=20_000, on_full="block")
    n = 0
    with pytest.raises(BufferFull) as info:
        while True:
            await b.append("s", [ev(n, pad=300)])
            n += 1
    assert "buffer full" in str(info.value) and "buffer.max_bytes" in str(info.value)
    assert not b.has_room()
    assert b.refused_total == 1 and b.refused_by_stream == {"s": 1}
    rows = await b.stream_rows()
    assert rows[0]["ingested_total"] == n and rows[0]["last_seq"] == n
    # forwarding frees room; the refused event was never stored
    events = await drain_all(b, "s")
    assert len(events) == n
    await b.housekeeping()
    assert b.has_room()
    await b.append("s", [ev(1000, pad=300)])
    await b.close()


async def test_drop_oldest_leaves_an_explained_gap(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db", max_bytes=100_000, on_full="drop_oldest")
    for i in range(300):
        await b.append("s", [ev(i, pad=300)])
    events = await drain_all(b, "s")
    rows = (await b.stream_rows())[0]
    gaps = [e for e in events if e["type"] == "mfg.agent.gap"]
    assert gaps, "dropping must be told to the central side"
    dropped = sum(g["data"]["count"] for g in gaps)
    assert dropped == rows["dropped_total"] > 0
    seen = {int(e["sequence"]) for e in events}
    explained = set()
    for g in gaps:
        d = g["data"]
        assert d["reason"] == "buffer_full_drop_oldest" and d["streamepoch"] == b.epoch
        explained |= set(range(d["first_sequence"], d["last_sequence"] + 1))
    # every sequence was either delivered or explained by a gap event; a range may hold the
    # agent's own rows (the gap event itself), which arrive, but never a business event
    assert seen | explained == set(range(1, rows["last_seq"] + 1))
    own = {int(e["sequence"]) for e in events if e["type"].startswith("mfg.agent.")}
    assert seen & explained <= own
    assert len(explained - seen) == dropped
    # nothing was sent while dropping: one open gap event was widened, not one per drop
    assert len(gaps) == 1, [g["data"] for g in gaps]
    # the newest events survived and the order is intact
    seqs = [int(e["sequence"]) for e in events]
    assert seqs == sorted(seqs) and seqs[-1] == rows["last_seq"]
    assert b.used_bytes <= 100_000
    await b.close()


def check_gaps_explain_exactly(events: list[dict], rows: dict) -> list[dict]:
    """What a receiver can rely on: every sequence arrives or lies in a gap range; ranges
    never claim a business event that arrived; counts add up to the missing ones."""
    seen = {int(e["sequence"]) for e in events}
    own = {int(e["sequence"]) for e in events if e["type"].startswith("mfg.agent.")}
    gaps = [e for e in events if e["type"] == "mfg.agent.gap"]
    explained: set[int] = set()
    for g in gaps:
        d = g["data"]
        span = set(range(d["first_sequence"], d["last_sequence"] + 1))
        assert not (span & explained), f"gap ranges overlap: {[x['data'] for x in gaps]}"
        assert d["count"] == len(span - seen), d
        explained |= span
    assert seen | explained == set(range(1, rows["last_seq"] + 1))
    assert seen & explained <= own
    assert sum(g["data"]["count"] for g in gaps) == rows["dropped_total"] == len(explained - seen)
    seqs = [int(e["sequence"]) for e in events]
    assert seqs == sorted(seqs), "out of order"
    return gaps


async def test_drop_oldest_one_gap_across_checkpoints(tmp_path: Path) -> None:
    """Checkpoints between drops do not start new gap events: still one per outage."""
    b = await open_buffer(tmp_path / "b.db", max_bytes=100_000, on_full="drop_oldest")
    for i in range(600):
        await b.append("s", [ev(i, pad=300)])
        if i % 50 == 49:
            assert await b.append_checkpoint("s") is not None
    events = await drain_all(b, "s")
    gaps = check_gaps_explain_exactly(events, (await b.stream_rows())[0])
    assert len(gaps) == 1, [g["data"] for g in gaps]
    assert sum(1 for e in events if e["type"] == "mfg.agent.checkpoint") >= 1
    await b.close()


async def test_drop_oldest_with_a_flapping_sink_keeps_ranges_exact(tmp_path: Path) -> None:
    """Batches sent now and then while the buffer keeps overflowing: a gap event in a batch
    is frozen, the next drop starts a new one, and the ranges stay exact and disjoint."""
    b = await open_buffer(tmp_path / "b.db", max_bytes=60_000, on_full="drop_oldest")
    sent: list[dict] = []
    for i in range(1500):
        await b.append("s", [ev(i, pad=300)])
        if i % 97 == 0:  # the sink is up for one small batch
            batch = await b.take_batch("s", 0, 7, 1 << 20)
            assert batch is not None
            sent.extend(orjson.loads(x) for x in batch.bodies)
            await b.ack(batch)
    sent.extend(await drain_all(b, "s"))
    gaps = check_gaps_explain_exactly(sent, (await b.stream_rows())[0])
    assert len(gaps) > 1
    await b.close()


async def test_rows_of_a_taken_batch_are_never_dropped(tmp_path: Path) -> None:
    """A batch taken (persisted, about to be sent) is frozen: an overflow drops around it,
    and it is resent after a restart exactly as it was taken."""
    b = await open_buffer(tmp_path / "b.db", max_bytes=50_000, on_full="drop_oldest")
    for i in range(50):  # about 37 KB of 50 KB
        await b.append("s", [ev(i, pad=300)])
    assert (await b.stream_stats())[0].dropped_total == 0
    batch = await b.take_batch("s", 0, 10, 1 << 20)
    assert batch is not None and batch.first_sequence == 1 and len(batch) == 10
    for i in range(50, 150):  # overflows: the oldest unsent events go, not the batch's
        await b.append("s", [ev(i, pad=300)])
    assert (await b.stream_stats())[0].dropped_total > 0
    (pending,) = await b.pending_batches("s")
    assert pending.batch_id == batch.batch_id and list(pending.bodies) == list(batch.bodies)
    await b.ack(batch)
    after = await b.take_batch("s", 0, 10, 1 << 20)
    assert after is not None and after.first_sequence > batch.last_sequence + 1  # a hole
    assert orjson.loads(after.bodies[0])["type"] == "mfg.agent.gap"
    await b.close()


async def test_forwarded_rows_deleted_or_kept_and_space_reclaimed(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    for _ in range(5):
        await b.append("s", [ev(i, pad=500) for i in range(1000)])
    size_full = sum(p.stat().st_size for p in tmp_path.glob("b.db*"))
    await drain_all(b, "s")
    while await b.housekeeping():
        pass
    await b.close()
    b = await open_buffer(tmp_path / "b.db")
    await b.housekeeping()
    await b.close()
    assert b.used_bytes == 0
    size_after = sum(p.stat().st_size for p in tmp_path.glob("b.db*"))
    assert size_after < size_full / 2, (size_full, size_after)

    k = await open_buffer(tmp_path / "k.db", keep_forwarded=3600)
    await k.append("s", [ev(i) for i in range(10)])
    await drain_all(k, "s")
    await k.housekeeping()
    kept = await k.read_range("s", 0, 10, 100)
    assert [r[0] for r in kept] == list(range(1, 11))
    await k.close()


async def test_corrupt_file_is_quarantined_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    garbage = b"this is not a database" * 500
    path.write_bytes(garbage)
    with pytest.raises(BufferCorrupt) as info:
        await open_buffer(path)
    msg = str(info.value)
    assert "moved aside" in msg and "corrupt" in msg
    moved = list(tmp_path.glob("b.db.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == garbage
    assert not path.exists()
    # the next start begins a new buffer, with a new epoch
    b = await open_buffer(path)
    assert (await b.append("s", [ev(1)]))[0].sequence == 1
    await b.close()


async def test_damaged_pages_are_detected_and_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    b = await open_buffer(path)
    await b.append("s", [ev(i, pad=200) for i in range(2000)])
    await b.close()
    raw = bytearray(path.read_bytes())
    for off in range(8192, len(raw) - 4096, 4096):  # the b-tree page headers
        raw[off : off + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    with pytest.raises(BufferCorrupt):
        await open_buffer(path)
    assert list(tmp_path.glob("b.db.corrupt-*"))


async def test_older_schema_is_migrated_keeping_events(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
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
    b = await open_buffer(path)
    assert b.epoch == "01OLDEPOCH00000000000000000"
    rows = await b.read_range("s", 0, 10, 10)
    assert rows == [(1, "ID1", b"{}")]
    assert (await b.append("s", [ev(2)]))[0].sequence == 2
    await b.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    b = await open_buffer(path)
    await b.close()
    # closed before the file is read: an open connection left to the GC would checkpoint
    # and change the file whenever it is collected, maybe during open_buffer below
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(Exception, match="newer than this agent"):
        await open_buffer(path)
    assert path.read_bytes() == before


async def test_source_event_ids_deduplicated_and_marks_atomic(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    first = await b.append("mes", [ev(1, sei="MES-1"), ev(2, sei="MES-2")], marks=[("drop", "h1")])
    again = await b.append("mes", [ev(1, sei="MES-1"), ev(3, sei="MES-3")])
    assert again[0].duplicate and again[0].id == first[0].id and again[0].sequence == 1
    assert not again[1].duplicate and again[1].sequence == 3
    assert await b.has_mark("drop", "h1") and not await b.has_mark("drop", "h2")
    rows = (await b.stream_rows())[0]
    assert rows["ingested_total"] == 3
    await b.close()


async def test_a_source_id_repeated_within_one_append_is_stored_once(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    got = await b.append("mes", [ev(1, sei="MES-1"), ev(2, sei="MES-2"), ev(1, sei="MES-1")])
    assert [c.duplicate for c in got] == [False, False, True]
    assert (got[2].id, got[2].sequence, got[2].stream) == (got[0].id, 1, "mes")
    assert (await b.stream_rows())[0]["ingested_total"] == 2
    await b.close()


async def test_checkpoint_covers_everything_since_the_previous(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    await b.append("s", [ev(i) for i in range(5)])
    c1 = await b.append_checkpoint("s")
    assert c1 is not None and c1.sequence == 6
    assert await b.append_checkpoint("s") is None  # nothing new since
    await b.append("s", [ev(9)])
    c2 = await b.append_checkpoint("s")
    events = await drain_all(b, "s")
    cps = [e["data"] for e in events if e["type"] == "mfg.agent.checkpoint"]
    assert cps[0] == {"streamepoch": b.epoch, "first_sequence": 1, "last_sequence": 5, "count": 5}
    # the first checkpoint (sequence 6) is itself an event of the stream, not counted again
    assert cps[1]["first_sequence"] == 7 and cps[1]["last_sequence"] == 7 and cps[1]["count"] == 1
    assert c2 is not None and c2.sequence == 8
    await b.close()


async def test_persisted_batch_is_resent_with_same_id_after_restart(tmp_path: Path) -> None:
    b = await open_buffer(tmp_path / "b.db")
    await b.append("s", [ev(i) for i in range(10)])
    batch = await b.take_batch("s", 0, 4, 1 << 20)
    assert batch is not None
    # crash before the acknowledgement
    b2 = await open_buffer(tmp_path / "b.db")
    pending = await b2.pending_batches("s")
    assert len(pending) == 1
    assert pending[0].batch_id == batch.batch_id and list(pending[0].ids) == list(batch.ids)
    assert pending[0].payload == batch.payload
    await b2.close()
    await b.close()


async def test_ack_whose_caller_is_cancelled_still_moves_the_cursor_once(tmp_path: Path) -> None:
    """A forwarder cancelled (reload, stop) while its ack runs must not leave a stale
    cursor: its successor would send the batch again and count it twice."""
    b = await open_buffer(tmp_path / "b.db")
    try:
        await b.append("s", [ev(i) for i in range(10)])
        batch = await b.take_batch("s", 0, 4, 1 << 20)
        assert batch is not None
        ack = asyncio.create_task(b.ack(batch))
        await asyncio.sleep(0)  # the transaction is queued to the writer's thread
        ack.cancel()
        await asyncio.gather(ack, return_exceptions=True)
        assert ack.cancelled()
        nxt = await b.take_batch("s", 0, 4, 1 << 20)
        assert nxt is not None and nxt.first_sequence == 5, "the acked batch was taken again"
        # an ack or a dead letter that comes again changes nothing
        await b.ack(batch)
        await b.ack(nxt)
        await b.ack(nxt)
        one = await b.take_batch("s", 0, 1, 1 << 20)
        assert one is not None
        await b.dead_letter(one, "refused", 422)
        await b.dead_letter(one, "refused", 422)
        [row] = await b.stream_rows()
        assert (row["forwarded_total"], row["dead_lettered_total"]) == (8, 1), row
        assert row["backlog_events"] == 1 and row["forwarded_seq"] == 9, row
        assert len(await b.dead_letters("s")) == 1
    finally:
        await b.close()


async def test_take_batch_ids_are_the_committed_ids(tmp_path: Path) -> None:
    """take_batch leaves ids inside the bodies; asked for, they are the ids assigned at
    commit, whole, indexed or sliced (bisection and dead-lettering use them)."""
    b = await open_buffer(tmp_path / "b.db")
    try:
        committed = await b.append("s", [ev(i) for i in range(6)])
        batch = await b.take_batch("s", 0, 100, 1 << 20)
        assert batch is not None and len(batch.ids) == 6
        assert list(batch.ids) == [c.id for c in committed]
        assert batch.ids[0] == committed[0].id and batch.ids[-1] == committed[-1].id
        assert batch.ids[2:4] == [c.id for c in committed[2:4]]
        left, right = await b.split_batch(batch)
        assert list(left.ids) + list(right.ids) == [c.id for c in committed]
        # a run that does not fit max_bytes, or has a hole, is cut where the old loop cut it
        size = len(batch.bodies[0]) + len(batch.bodies[1]) + 3
        await b.discard_batch(left)
        await b.discard_batch(right)
        two = await b.take_batch("s", 0, 100, size)
        assert two is not None and (two.first_sequence, two.last_sequence) == (1, 2)
        assert list(two.ids) == [c.id for c in committed[:2]]
    finally:
        await b.close()


async def test_operator_drop_of_dead_letters_reaches_a_running_buffer(tmp_path: Path) -> None:
    """`edge-agent dead-letter drop` runs in another process: the running agent's size
    (and so its room for appends) follows on its next housekeeping tick."""
    path = tmp_path / "b.db"
    b = await open_buffer(path)
    await b.append("s", [ev(1, pad=2000), ev(2)])
    batch = await b.take_batch("s", 0, 1, 1 << 20)
    assert batch is not None and len(batch) == 1
    await b.dead_letter(batch, "HTTP 422", 422)
    size = len(batch.bodies[0])
    used = b.used_bytes
    conn = operator.connect(path)
    try:
        assert operator.drop_dead_letters(conn, operator.Selection(all=True)) == 1
    finally:
        conn.close()
    assert await b.dead_letters() == []
    await b.housekeeping()
    assert b.used_bytes == used - size
    assert b.used_bytes == sum(s.stored_bytes for s in await b.stream_stats())
    await b.housekeeping()  # the same generation: nothing re-read, nothing changes
    assert b.used_bytes == used - size
    await b.close()


async def test_close_resolves_every_queued_append_when_its_wait_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the write lock: the appends cannot commit. close() gives up
    waiting after its budget, and every append gets an answer (an error saying it was not
    committed) instead of hanging; nothing of them is in the file."""
    import agent.buffer as buffer_pkg

    monkeypatch.setattr(buffer_pkg, "CLOSE_TIMEOUT", 0.3)
    path = tmp_path / "b.db"
    b = await open_buffer(path)
    await b.append("s", [ev(0)])
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        appends = [asyncio.create_task(b.append("s", [ev(i)])) for i in range(1, 4)]
        await asyncio.sleep(0)
        closing = asyncio.create_task(b.close())
        results = await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True), 60)
        assert all(isinstance(r, BufferError_) for r in results), results
        await asyncio.wait_for(closing, 60)
    finally:
        lock.rollback()
        lock.close()
    b2 = await open_buffer(path)
    assert b2.stream_state("s") == (1, 0)
    await b2.close()


async def test_take_batches_persists_several_runs_in_order_and_a_hole_ends_one(
    tmp_path: Path,
) -> None:
    """take_batches returns up to ``count`` runs after the cursor, each with its own
    persisted batch id (what a restart resends), split at max_events and at a hole."""
    path = tmp_path / "b.db"
    b = await open_buffer(path)
    await b.append("s", [ev(i) for i in range(1, 11)])
    await b.close()
    # a hole at sequence 6, as drop_oldest or a dead letter past the cursor leaves one
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM events WHERE seq = 6")
    conn.close()
    b = await open_buffer(path)
    got = await b.take_batches("s", 0, 3, 1 << 20, 5)
    assert [(x.first_sequence, x.last_sequence) for x in got] == [(1, 3), (4, 5), (7, 9), (10, 10)]
    assert len({x.batch_id for x in got}) == 4
    pending = await b.pending_batches("s")
    assert [(x.batch_id, x.first_sequence, x.last_sequence) for x in pending] == [
        (x.batch_id, x.first_sequence, x.last_sequence) for x in got
    ]
    assert [x.bodies for x in pending] == [list(x.bodies) for x in got]
    # count bounds it; after the last run there is nothing
    assert len(await b.take_batches("s", 0, 3, 1 << 20, 2)) == 2
    assert await b.take_batches("s", 10, 3, 1 << 20, 2) == []
    await b.close()


async def test_ack_many_moves_the_cursor_over_all_and_counts_each_event_once(
    tmp_path: Path,
) -> None:
    b = await open_buffer(tmp_path / "b.db")
    await b.append("s", [ev(i) for i in range(1, 10)])
    got = await b.take_batches("s", 0, 3, 1 << 20, 3)
    await b.ack(got[0])
    await b.ack_many(got)  # the first again (idempotent), then the other two
    assert b.stream_state("s") == (9, 9)
    assert await b.pending_batches("s") == []
    [row] = [r for r in await b.stream_rows() if r["name"] == "s"]
    assert row["forwarded_total"] == 9
    await b.close()

"""Figure 1, ingest: events/s committed through Buffer.append (group commit, fsync) vs raw
sqlite3 inserts of the same encoded rows, WAL + synchronous=FULL, batches of 1000: the
faster of executemany and one INSERT ... SELECT FROM json_each per batch (the statement
the buffer itself uses since 2026-12-02, agent/buffer/rows.py, and cheaper than
executemany: a raw side on executemany alone would flatter the buffer)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import EVENTS_1000, Ctx, Deadline, event, figure, ratio

RAW_SCHEMA = """CREATE TABLE events (
    sid INTEGER NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, committed_at REAL NOT NULL,
    size INTEGER NOT NULL, body BLOB NOT NULL, ctl INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sid, seq)) WITHOUT ROWID"""


async def agent_concurrent(path: Path, n: int, appenders: int) -> float:
    """``appenders`` tasks each appending ONE event at a time: group commit must batch them."""
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    per = n // appenders
    evs = [event(i) for i in range(appenders)]
    dl = Deadline(300)

    async def one(k: int) -> None:
        ev = [evs[k]]
        for _ in range(per):
            await buf.append("line1", ev)
        dl.check("concurrent appends")

    t = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(appenders)))
    el = time.perf_counter() - t
    commits = getattr(buf, "commits", "?")  # a diagnostic, not every revision has it
    await buf.close()
    return per * appenders / el, commits


async def agent_batches(path: Path, n: int, size: int, appenders: int) -> float:
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    per = n // (size * appenders)
    evs = EVENTS_1000[:size]
    dl = Deadline(300)

    async def one() -> None:
        for _ in range(per):
            await buf.append("line1", evs)
            dl.check("500-event appends")

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(appenders)))
    el = time.perf_counter() - t
    commits = getattr(buf, "commits", "?")  # a diagnostic, not every revision has it
    await buf.close()
    return per * size * appenders / el, commits


def stored_rows(path: Path) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(path)
    try:
        return c.execute(
            "SELECT sid, seq, id, committed_at, size, body, ctl FROM events"
        ).fetchall()
    finally:
        c.close()


def page_size_of(path: Path) -> int:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(c.execute("PRAGMA page_size").fetchone()[0])
    finally:
        c.close()


def _json_insert(c: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """The rows (one stream, consecutive seqs) in one statement: the buffer's own
    rows.INSERT_RUN, plain SQL, so the raw side runs exactly what the buffer runs."""
    from agent.buffer.rows import INSERT_RUN

    offsets, off = [], 0
    for r in rows:
        offsets.append(b"%012d" % off)
        off += len(r[5])
    c.execute(
        INSERT_RUN,
        (
            rows[0][0], rows[0][1] - 1, "".join([r[2] for r in rows]).encode(), rows[0][3],
            b"".join(offsets), b"".join([r[5] for r in rows]), rows[0][6],
            orjson.dumps([len(r[5]) for r in rows]),
        ),
    )  # fmt: skip


def raw_sqlite_best(
    d: Path, name: str, rows: list[tuple[Any, ...]], batch: int = 1000, page_size: int = 4096
) -> tuple[float, str]:
    """The faster raw insert of the two, and which it was."""
    many = raw_sqlite(d / f"{name}-many.db", rows, batch, page_size)
    one = raw_sqlite(d / f"{name}-json.db", rows, batch, page_size, json_each=True)
    return (many, "executemany") if many >= one else (one, "json_each")


def raw_sqlite(
    path: Path,
    rows: list[tuple[Any, ...]],
    batch: int = 1000,
    page_size: int = 4096,
    json_each: bool = False,
) -> float:
    """A raw limit in rows/s: the same rows, per 1000, WAL + synchronous=FULL, in a file
    with the page size the agent's own file has (16 KiB pages make the same inserts
    cheaper too: the raw side must not be handicapped by a smaller one); executemany, or
    one INSERT per batch (``json_each``: rows of one stream with consecutive seqs, as
    stored)."""
    wall, _ = raw_insert(path, rows, batch, page_size, json_each)
    return len(rows) / wall


def raw_insert(
    path: Path, rows: list[tuple[Any, ...]], batch: int, page_size: int, json_each: bool
) -> tuple[float, float]:
    """Insert ``rows`` into a fresh file as raw_sqlite says: (wall seconds, CPU seconds of
    this process)."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(f"PRAGMA page_size={page_size}")
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    c.execute(RAW_SCHEMA)
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), batch):
        c.execute("BEGIN IMMEDIATE")
        if json_each:
            _json_insert(c, rows[i : i + batch])
        else:
            c.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows[i : i + batch])
        c.execute("COMMIT")
    out = time.perf_counter() - t, time.process_time() - cpu
    c.close()
    return out


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("ingest")
    n = ctx.n(200_000, 40_000)
    conc, conc_commits = asyncio.run(agent_concurrent(d / "conc.db", ctx.n(60_000, 15_000), 200))
    b500, b500_commits = asyncio.run(agent_batches(d / "b500.db", n, 500, 4))
    rows = stored_rows(d / "b500.db")
    body_bytes = sum(r[4] for r in rows) / len(rows)
    page = page_size_of(d / "b500.db")
    rows.sort(key=lambda r: (r[0], r[1]))
    raw, how = raw_sqlite_best(d, "raw", rows, page_size=page)
    raw_single = raw_sqlite(d / "raw1.db", rows[: ctx.n(3000, 1000)], batch=1, page_size=page)
    best = max(conc, b500)
    return {
        "ingest": figure(
            value=b500,
            unit="events/s",
            raw=raw,
            raw_label=f"sqlite3 inserts x1000 ({how}, the faster), WAL, synchronous=FULL",
            target=">= 0.5",
            met=ratio(b500, raw) >= 0.5,
            detail=(
                f"500-event appends x4 tasks ({b500_commits} commits); durability fsync; "
                f"{body_bytes:.0f}-byte events"
            ),
        ),
        "ingest_concurrent": figure(
            value=conc,
            unit="events/s",
            raw=raw,
            raw_label=f"sqlite3 inserts x1000 ({how}, the faster), WAL, synchronous=FULL",
            target=">= 0.5",
            met=ratio(conc, raw) >= 0.5,
            detail=(
                f"200 tasks appending 1 event each; group commit made {conc_commits} commits; "
                f"raw one row per transaction: {raw_single:,.0f}/s"
            ),
        ),
        "_ingest_best": best,
    }

"""Inserting a group commit's event (and dedupe) rows in statements that run without the
GIL.

Why not ``executemany``: CPython's sqlite3 lets go of the GIL around every
``sqlite3_step``, once per row, and must take it back before binding the next row. While
the event loop's thread is busy (a Sparkplug source decoding the next payloads, an HTTP
handler parsing a POST), taking it back waits for the loop to give it up, which a busy
thread does only every ``sys.getswitchinterval()`` (5 ms). Measured with a Python thread
spinning beside the insert (2 cores, 100,000 rows of 723 bytes in groups of 10,000, fsync
commits): executemany 1,430-1,840 us a row, so a group commit waited for the loop to go
idle and the two threads ran one after the other; this module's one statement 5.9-6.3 us
a row while the spinning thread kept its full speed. Uncontended, the statement costs
less user CPU than executemany (1.5 against 2.1-2.5 us a row), as nothing is bound per
row from Python. The agent's own loops yield often enough that the starvation was not
what held any bench back; what the benches showed is the cheaper row (docs/performance.md,
"Issue 12, the GIL per row").

The statement walks a JSON array of the rows' sizes (``json_each``, one step for the
whole run) and cuts each row's id, offset and body out of three BLOB parameters by byte
position: the ids joined (a ULID is 26 ASCII characters), the offsets as 12-digit
numbers, the bodies joined. A BLOB, because ``substr`` of TEXT counts characters from the
start on every call (quadratic: 77 us a row). The rows stored are exactly the rows
executemany would store (same values, same SQL types; tests/agent/test_buffer_rows.py).

The dedupe rows of MES events (one per source event id) go the same way, as a JSON array
of [sid, source id, seq, id] walked by one INSERT OR IGNORE, as the reference gateway
inserts its ids (gateway/store.py); an id that JSON cannot carry exactly (a NUL, which
SQLite's JSON functions may cut at, or a lone surrogate) sends the rows to executemany.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator, Sequence

import orjson

from agent.buffer.state import EventRow

#: a dedupe row: (sid, source_event_id, seq, id, committed_at)
DedupeRow = tuple[int, str, int, str, float]

INSERT_ONE = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)"

#: one run of rows: ?1 sid, ?2 the seq before the first, ?3 ids, ?4 committed_at,
#: ?5 offsets, ?6 bodies, ?7 ctl, ?8 the JSON array of sizes
INSERT_RUN = (
    "INSERT INTO events (sid, seq, id, committed_at, size, body, ctl)"
    " SELECT ?1, ?2 + key + 1, CAST(substr(?3, key * 26 + 1, 26) AS TEXT), ?4, value,"
    " substr(?6, CAST(substr(?5, key * 12 + 1, 12) AS INTEGER) + 1, value), ?7"
    " FROM json_each(?8)"
)

INSERT_DEDUPE_ONE = "INSERT OR IGNORE INTO dedupe VALUES (?, ?, ?, ?, ?)"
#: ?1 committed_at, ?2 the JSON array of [sid, source_event_id, seq, id]
INSERT_DEDUPE_RUN = (
    "INSERT OR IGNORE INTO dedupe (sid, source_event_id, seq, id, committed_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]'), json_extract(value, '$[3]'), ?1 FROM json_each(?2)"
)

ULID_LEN = 26
#: a run is cut at this many rows or body bytes (each statement binds its run's bodies
#: as one BLOB, copied once by SQLite; SQLite refuses a value over 1e9 bytes)
RUN_ROWS = 10_000
RUN_BYTES = 32 << 20


@functools.cache
def json_each_works() -> bool:
    """Whether this process's SQLite runs INSERT_RUN (json_each: built in since 3.38,
    compiled in by most builds before). Without it every row goes through executemany."""
    try:
        db = sqlite3.connect(":memory:")
        try:
            db.execute(
                "CREATE TABLE events (sid INTEGER, seq INTEGER, id TEXT, committed_at REAL,"
                " size INTEGER, body BLOB, ctl INTEGER)"
            )
            rows = [
                (1, 5, "0" * ULID_LEN, 1.5, 2, b"ab", 0),
                (1, 6, "1" * ULID_LEN, 1.5, 1, b"c", 0),
            ]
            _insert_run(db, rows, 0, 2)
            return db.execute("SELECT * FROM events ORDER BY seq").fetchall() == rows
        finally:
            db.close()
    except sqlite3.Error:
        return False


def insert_events(db: sqlite3.Connection, rows: Sequence[EventRow], min_run: int = 2) -> None:
    """INSERT ``rows`` (sid, seq, id, committed_at, size, body, ctl) into events.

    Rows of one stream with consecutive sequences, one committed_at and one ctl (what a
    group commit makes: each request's events in order) go in one statement per run;
    shorter runs than ``min_run``, and ids that are not 26 ASCII characters, one
    statement per row."""
    if not json_each_works():
        db.executemany(INSERT_ONE, rows)
        return
    single: list[EventRow] = []
    for lo, hi in _runs(rows):
        if hi - lo < min_run or not _insert_run(db, rows, lo, hi):
            single.extend(rows[lo:hi])
    if single:
        db.executemany(INSERT_ONE, single)


def insert_dedupe(db: sqlite3.Connection, rows: Sequence[DedupeRow]) -> None:
    """INSERT OR IGNORE ``rows`` (sid, source_event_id, seq, id, committed_at) into dedupe:
    one statement when they share committed_at (a group's do) and JSON carries every id."""
    if len(rows) > 1 and json_each_works() and all(r[4] == rows[0][4] for r in rows):
        try:
            doc = orjson.dumps([r[:4] for r in rows])
        except orjson.JSONEncodeError:  # a str orjson refuses (a lone surrogate)
            doc = b""
        if doc and b"\\u0000" not in doc:
            db.execute(INSERT_DEDUPE_RUN, (rows[0][4], doc))
            return
    db.executemany(INSERT_DEDUPE_ONE, rows)


def _runs(rows: Sequence[EventRow]) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of rows that one INSERT_RUN can insert."""
    n = len(rows)
    lo = 0
    while lo < n:
        sid, seq, _, at, size, _, ctl = rows[lo]
        hi = lo + 1
        total = size
        while hi < n and hi - lo < RUN_ROWS and total < RUN_BYTES:
            r = rows[hi]
            if r[0] != sid or r[1] != seq + (hi - lo) or r[3] != at or r[6] != ctl:
                break
            total += r[4]
            hi += 1
        yield lo, hi
        lo = hi


def _insert_run(db: sqlite3.Connection, rows: Sequence[EventRow], lo: int, hi: int) -> bool:
    run = rows[lo:hi]
    if any(len(r[2]) != ULID_LEN for r in run):
        return False
    ids = "".join([r[2] for r in run])
    if not ids.isascii():
        return False
    offsets = []
    off = 0
    sizes = []
    for r in run:
        offsets.append(b"%012d" % off)
        size = len(r[5])
        if size != r[4] or not size:
            # the size column is the body's length: never store another; and an empty
            # BLOB parameter reaches SQLite as NULL (no event body is empty)
            return False
        off += size
        sizes.append(size)
    first = run[0]
    db.execute(
        INSERT_RUN,
        (
            first[0], first[1] - 1, ids.encode("ascii"), first[3], b"".join(offsets),
            b"".join([r[5] for r in run]), first[6], orjson.dumps(sizes),
        ),
    )  # fmt: skip
    return True

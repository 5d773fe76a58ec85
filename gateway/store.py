"""The gateway's own SQLite file: every accepted event, per-stream counters, idempotency keys.

The central side's promise is "2xx means durably stored", so a batch is committed in one
transaction before the handler answers. The file uses WAL with ``synchronous=NORMAL``: a
commit survives the gateway process being killed (what tests simulate), not a power cut;
``fsync=True`` (``--fsync``) switches to ``synchronous=FULL``.

Everything here is synchronous and called from the event loop thread without an ``await``
between reading the per-stream state and committing, so requests are serialised without a
lock (SQLite has one writer anyway, and a thread hop per batch would only add latency).

Counters live in the file too (``stream_stats``, ``counters``), so ``edge-agent gateway
report --db FILE`` gives the same figures offline as ``GET /report`` online.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import orjson

from gateway.encoding import stored_json
from gateway.validate import ParsedBatch

SCHEMA_VERSION = 1

_SCHEMA = """
-- One row per (source, stream, epoch) with its counters; events refer to it by sk.
CREATE TABLE IF NOT EXISTS streams (
    sk INTEGER PRIMARY KEY,
    source TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
    received INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0,
    out_of_order INTEGER NOT NULL DEFAULT 0, id_conflicts INTEGER NOT NULL DEFAULT 0,
    highest INTEGER NOT NULL DEFAULT 0, batches INTEGER NOT NULL DEFAULT 0,
    first_at REAL, last_at REAL,
    UNIQUE (source, stream, epoch)
);
-- Dedupe is on (source, id) across epochs, so sources get their own small key.
CREATE TABLE IF NOT EXISTS sources (src INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE);

-- Accepted batches: the Idempotency-Key, the answer given, and the body as received
-- (events point into it by index, so nothing is re-encoded on the hot path).
CREATE TABLE IF NOT EXISTS batches (
    bn INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, sk INTEGER NOT NULL,
    first_sequence INTEGER NOT NULL, last_sequence INTEGER NOT NULL,
    status INTEGER NOT NULL, response BLOB NOT NULL, at REAL NOT NULL, body BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS events (
    n       INTEGER PRIMARY KEY,         -- arrival order
    src     INTEGER NOT NULL,
    sk      INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    id      TEXT NOT NULL,
    type    TEXT NOT NULL,
    bn      INTEGER NOT NULL,            -- batch it arrived in
    idx     INTEGER NOT NULL             -- its index in that batch's body
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_id ON events (src, id);
CREATE INDEX IF NOT EXISTS events_by_seq ON events (sk, seq);

-- Sequences the gateway knows will never arrive, and why: ranges announced by an
-- mfg.agent.gap event (kind 'gap') and events it refused itself (kind 'rejected').
CREATE TABLE IF NOT EXISTS explained (
    sk INTEGER NOT NULL, first_sequence INTEGER NOT NULL, last_sequence INTEGER NOT NULL,
    count INTEGER NOT NULL, reason TEXT NOT NULL, kind TEXT NOT NULL,
    event_id TEXT, at REAL NOT NULL,
    PRIMARY KEY (sk, kind, first_sequence, last_sequence)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS checkpoints (
    sk INTEGER NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
    last_sequence INTEGER NOT NULL, count INTEGER, time TEXT NOT NULL, at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
"""

#: Request-level counters shown under "requests" in the report.
COUNTERS = (
    "accepted_batches",
    "replayed_batches",
    "rejected_400",
    "rejected_415",
    "rejected_422",
    "idempotency_conflicts",
    "unauthorized",
    "injected_failures",
    "dropped_acks",
)

_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (src, sk, seq, id, type, bn, idx) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
#: The same rows in one statement: SQLite walks a JSON array of [id, type] pairs, which
#: costs about half of executemany's per-row binding; a batch of one event type passes
#: the type once and a plain array of ids, half as much again (docs/performance.md).
_INSERT_EVENTS_JSON = (
    "INSERT OR IGNORE INTO events (src, sk, seq, id, type, bn, idx)"
    " SELECT ?1, ?2, ?3 + key, json_extract(value, '$[0]'), json_extract(value, '$[1]'), ?4, key"
    " FROM json_each(?5)"
)
_INSERT_EVENTS_ONE_TYPE = (
    "INSERT OR IGNORE INTO events (src, sk, seq, id, type, bn, idx)"
    " SELECT ?1, ?2, ?3 + key, value, ?5, ?4, key FROM json_each(?6)"
)
_UPDATE_STATS = (
    "UPDATE streams SET received = ?, duplicates = ?, out_of_order = ?, id_conflicts = ?,"
    " highest = ?, batches = ?, first_at = ?, last_at = ? WHERE sk = ?"
)


def _has_json(conn: sqlite3.Connection) -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38, usual before)."""
    try:
        row = conn.execute("""SELECT json_extract(value, '$[1]') FROM json_each('[[1,"t"]]')""")
        return bool(row.fetchone() == ("t",))
    except sqlite3.OperationalError:
        return False


class GatewayDbError(Exception):
    """The database file cannot be used; str() is one line naming the file and what to do."""


@dataclass(slots=True)
class StreamStats:
    sk: int
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    id_conflicts: int = 0
    highest: int = 0
    batches: int = 0
    first_at: float = 0.0


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """The answer recorded under an Idempotency-Key."""

    stream: str
    epoch: str
    first: int
    last: int
    status: int
    response: bytes


def _chunks(items: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a gateway database (created unless ``readonly``), checking it is one."""
    path = Path(path)
    try:
        if readonly:
            if not path.exists():
                raise GatewayDbError(
                    f"{path}: no such gateway database (give the --db the gateway was run with)"
                )
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise GatewayDbError(
            f"{path}: not a usable SQLite file ({exc}); move it aside or pick another --db"
        ) from exc
    if version > SCHEMA_VERSION:
        conn.close()
        raise GatewayDbError(
            f"{path}: gateway schema version {version} is newer than this gateway's "
            f"{SCHEMA_VERSION} (upgrade edge-agent or pick another --db)"
        )
    if tables and "events" not in tables:
        conn.close()
        raise GatewayDbError(
            f"{path}: is an SQLite file of something else, not a gateway database "
            "(pick another --db)"
        )
    if readonly and "events" not in tables:
        conn.close()
        raise GatewayDbError(f"{path}: empty file, not a gateway database (check --db)")
    return conn


class GatewayStore:
    """Owns the write connection. Not thread-safe: call from one thread (the event loop)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._stats: dict[tuple[str, str, str], StreamStats] = {}
        self._sources: dict[str, int] = {}
        #: Cache entries created inside the open transaction: dropped again on rollback.
        self._pending: list[tuple[str, Any]] = []
        self._next_bn = 1
        self._json_insert = _has_json(conn)

    @classmethod
    def open(cls, path: str | Path, *, fsync: bool = False) -> GatewayStore:
        path = Path(path)
        conn = connect(path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: indexes stay in memory
            # Checkpoint (and, under NORMAL, fsync) every ~16 MiB of WAL, not every 4 MiB.
            conn.execute("PRAGMA wal_autocheckpoint=4000")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.executemany(
                "INSERT OR IGNORE INTO counters (name, n) VALUES (?, 0)", ((c,) for c in COUNTERS)
            )
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise GatewayDbError(f"{path}: cannot set up the gateway database ({exc})") from exc
        store = cls(conn, path)
        for row in conn.execute(
            "SELECT source, stream, epoch, sk, received, duplicates, out_of_order, id_conflicts,"
            " highest, batches, first_at FROM streams"
        ):
            sk, received, duplicates, out_of_order, id_conflicts, highest, batches = row[3:10]
            store._stats[(row[0], row[1], row[2])] = StreamStats(
                sk=sk,
                received=received,
                duplicates=duplicates,
                out_of_order=out_of_order,
                id_conflicts=id_conflicts,
                highest=highest,
                batches=batches,
                first_at=row[10] or 0.0,
            )
        store._sources = dict(conn.execute("SELECT source, src FROM sources").fetchall())
        store._next_bn = conn.execute("SELECT COALESCE(MAX(bn), 0) + 1 FROM batches").fetchone()[0]
        return store

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; idempotent."""
        if self._conn is None:  # type: ignore[comparison-overlap]
            return
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError:
            pass  # closing anyway; the WAL is replayed on the next open
        self._conn.close()
        self._conn = None  # type: ignore[assignment]

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conn

    # ------------------------------------------------------------------ idempotency

    def lookup_batch(self, key: str) -> StoredBatch | None:
        row = self._conn.execute(
            "SELECT s.stream, s.epoch, b.first_sequence, b.last_sequence, b.status, b.response"
            " FROM batches b JOIN streams s USING (sk) WHERE b.key = ?",
            (key,),
        ).fetchone()
        return StoredBatch(*row) if row else None

    # ------------------------------------------------------------------ counters

    def bump(self, name: str, n: int = 1) -> None:
        """Count a request outcome (its own small transaction: these are rare)."""
        self._conn.execute("UPDATE counters SET n = n + ? WHERE name = ?", (n, name))

    def record_rejected(
        self,
        source: str,
        stream: str,
        epoch: str,
        rejected: Iterable[tuple[int, str | None, str]],
        status: int,
    ) -> None:
        """Remember events refused on purpose: (sequence, id, reason).

        The agent dead-letters them, so their sequences never arrive; the report lists them
        as explained instead of missing.
        """
        now = time.time()
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            sk = self._stream_key((source, stream, epoch)).sk
            conn.executemany(
                "INSERT OR REPLACE INTO explained (sk, first_sequence, last_sequence, count,"
                " reason, kind, event_id, at) VALUES (?, ?, ?, 1, ?, 'rejected', ?, ?)",
                [
                    (sk, seq, seq, f"rejected by the gateway ({status}): {reason}", eid, now)
                    for seq, eid, reason in rejected
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._rolled_back()
            raise
        self._pending.clear()

    # ------------------------------------------------------------------ the batch

    def _stream_key(self, key: tuple[str, str, str]) -> StreamStats:
        """The counters of (source, stream, epoch), creating its row (inside a transaction)."""
        st = self._stats.get(key)
        if st is None:
            cur = self._conn.execute(
                "INSERT INTO streams (source, stream, epoch) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET sk = sk RETURNING sk",
                key,
            )
            st = StreamStats(cur.fetchone()[0])
            self._stats[key] = st
            self._pending.append(("stats", key))
        return st

    def _source_key(self, source: str) -> int:
        src = self._sources.get(source)
        if src is None:
            cur = self._conn.execute(
                "INSERT INTO sources (source) VALUES (?)"
                " ON CONFLICT DO UPDATE SET src = src RETURNING src",
                (source,),
            )
            src = cur.fetchone()[0]
            self._sources[source] = src
            self._pending.append(("source", source))
        return src

    def _rolled_back(self) -> None:
        """Forget cache entries whose rows the rollback removed."""
        for kind, key in self._pending:
            if kind == "stats":
                self._stats.pop(key, None)
            else:
                self._sources.pop(key, None)
        self._pending.clear()

    def store_batch(self, batch: ParsedBatch, response_for: Any) -> tuple[int, int, bytes]:
        """Store the new events of ``batch`` in one transaction.

        ``response_for(accepted, duplicates) -> bytes`` builds the 200 body, which is stored
        under the Idempotency-Key in the same transaction. Returns (accepted, duplicates,
        body).
        """
        key = (batch.source, batch.stream, batch.epoch)
        now = time.time()
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = self._stream_key(key)
            src = self._source_key(batch.source)
            sk = old.sk
            bn = self._next_bn
            first = batch.first
            n = len(batch.ids)
            new_events: list[int] = []  # indexes of events stored for the first time
            out_of_order = conflicts = 0
            fast = False
            if first > old.highest:
                # The normal case: the batch lies beyond everything seen in this stream, so
                # no sequence can collide; one statement tells whether any id was known.
                conn.execute("SAVEPOINT fast")
                if self._json_insert:
                    cur = self._insert_json(batch, src, sk, bn)
                else:
                    cur = conn.executemany(_INSERT_EVENT, self._rows(batch, src, sk, bn))
                if cur.rowcount == n:
                    fast = True
                    new_events = list(range(n))
                    conn.execute("RELEASE fast")
                else:
                    conn.execute("ROLLBACK TO fast")
                    conn.execute("RELEASE fast")
            if not fast:
                new_events, out_of_order, conflicts = self._classify(batch, src, sk, old.highest)
                rows = self._rows(batch, src, sk, bn)
                conn.executemany(_INSERT_EVENT, [rows[i] for i in new_events])
            accepted = len(new_events)
            duplicates = n - accepted
            highest = old.highest
            if new_events:  # in increasing order
                highest = max(highest, first + new_events[-1])
            st = StreamStats(
                sk=sk,
                received=old.received + accepted,
                duplicates=old.duplicates + duplicates,
                out_of_order=old.out_of_order + out_of_order,
                id_conflicts=old.id_conflicts + conflicts,
                highest=highest,
                batches=old.batches + 1,
                first_at=old.first_at or now,
            )
            conn.execute(
                _UPDATE_STATS,
                (
                    st.received,
                    st.duplicates,
                    st.out_of_order,
                    st.id_conflicts,
                    st.highest,
                    st.batches,
                    st.first_at,
                    now,
                    sk,
                ),
            )
            if batch.gaps or batch.checkpoints:
                self._record_gaps_and_checkpoints(batch, sk, set(new_events), now)
            body = response_for(accepted, duplicates)
            conn.execute(
                "INSERT INTO batches (bn, key, sk, first_sequence, last_sequence, status,"
                " response, at, body) VALUES (?, ?, ?, ?, ?, 200, ?, ?, ?)",
                (bn, batch.key, sk, batch.first, batch.last, body, now, batch.body),
            )
            conn.execute("UPDATE counters SET n = n + 1 WHERE name = 'accepted_batches'")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._rolled_back()
            raise
        self._pending.clear()
        self._stats[key] = st
        self._next_bn = bn + 1
        return accepted, duplicates, body

    def _insert_json(self, batch: ParsedBatch, src: int, sk: int, bn: int) -> sqlite3.Cursor:
        """INSERT OR IGNORE the events of ``batch`` in one statement (_INSERT_EVENTS_JSON).

        An id or type holding a NUL character goes through executemany instead: SQLite's
        JSON functions may cut text at NUL, and two ids must never collapse into one."""
        types = batch.types
        if types.count(types[0]) == len(types):
            ids = orjson.dumps(list(batch.ids))
            if b"\\u0000" not in ids and "\0" not in types[0]:
                return self._conn.execute(
                    _INSERT_EVENTS_ONE_TYPE, (src, sk, batch.first, bn, types[0], ids)
                )
        else:
            pairs = orjson.dumps(list(zip(batch.ids, types, strict=True)))
            if b"\\u0000" not in pairs:
                return self._conn.execute(_INSERT_EVENTS_JSON, (src, sk, batch.first, bn, pairs))
        return self._conn.executemany(_INSERT_EVENT, self._rows(batch, src, sk, bn))

    @staticmethod
    def _rows(batch: ParsedBatch, src: int, sk: int, bn: int) -> list[tuple[Any, ...]]:
        """The events table's rows of ``batch``, for executemany."""
        n = len(batch.ids)
        return list(
            zip(
                repeat(src, n),
                repeat(sk, n),
                range(batch.first, batch.first + n),
                batch.ids,
                batch.types,
                repeat(bn, n),
                range(n),
                strict=True,
            )
        )

    def _classify(
        self, batch: ParsedBatch, src: int, sk: int, highest: int
    ) -> tuple[list[int], int, int]:
        """Slow path: which events are new, and how many arrive late or clash by sequence."""
        conn = self._conn
        ids = batch.ids
        known: set[str] = set()
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            known.update(
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM events WHERE src = ? AND id IN ({marks})", (src, *chunk)
                )
            )
        taken = {
            r[0]
            for r in conn.execute(
                "SELECT seq FROM events WHERE sk = ? AND seq BETWEEN ? AND ?",
                (sk, batch.first, batch.last),
            )
        }
        new: list[int] = []
        out_of_order = conflicts = 0
        for i, eid in enumerate(ids):
            if eid in known:
                continue  # a duplicate: the same event again
            known.add(eid)
            seq = batch.first + i
            if seq < highest:
                out_of_order += 1
            if seq in taken:
                conflicts += 1  # this (stream, epoch, sequence) already has another id
            new.append(i)
        return new, out_of_order, conflicts

    def _record_gaps_and_checkpoints(
        self, batch: ParsedBatch, sk: int, new: set[int], now: float
    ) -> None:
        conn = self._conn
        for i, gap in batch.gaps:
            if i not in new:
                continue
            gap_sk = sk
            if gap["streamepoch"] != batch.epoch:  # a gap reported for another epoch
                gap_sk = self._stream_key((batch.source, batch.stream, gap["streamepoch"])).sk
            conn.execute(
                "INSERT OR REPLACE INTO explained (sk, first_sequence, last_sequence, count,"
                " reason, kind, event_id, at) VALUES (?, ?, ?, ?, ?, 'gap', ?, ?)",
                (
                    gap_sk,
                    gap["first_sequence"],
                    gap["last_sequence"],
                    gap["count"],
                    gap["reason"],
                    batch.events[i]["id"],
                    now,
                ),
            )
        for i, cp in batch.checkpoints:
            if i not in new:
                continue
            ev = batch.events[i]
            conn.execute(
                "INSERT INTO checkpoints (sk, seq, id, last_sequence, count, time, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sk, batch.first + i, ev["id"], cp["last_sequence"], cp["count"], ev["time"], now),
            )


def received_count(db: str | Path, stream: str | None = None) -> int:
    """Unique events stored (of one stream): cheap enough to poll while waiting."""
    conn = connect(db, readonly=True)
    try:
        sql = "SELECT COALESCE(SUM(received), 0) FROM streams"
        args: tuple[str, ...] = ()
        if stream is not None:
            sql, args = sql + " WHERE stream = ?", (stream,)
        return int(conn.execute(sql, args).fetchone()[0])
    finally:
        conn.close()


def read_events(
    db: str | Path | sqlite3.Connection,
    stream: str | None = None,
    *,
    epoch: str | None = None,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """The events the gateway accepted, in arrival order (optionally of one stream)."""
    return orjson.loads(read_events_json(db, stream, epoch=epoch, source=source))


def read_events_json(
    db: str | Path | sqlite3.Connection,
    stream: str | None = None,
    *,
    epoch: str | None = None,
    source: str | None = None,
) -> bytes:
    """Like read_events, as the JSON array bytes (what GET /events answers)."""
    conn = db if isinstance(db, sqlite3.Connection) else connect(db, readonly=True)
    try:
        where, args = [], []
        for column, value in (("stream", stream), ("epoch", epoch), ("source", source)):
            if value is not None:
                where.append(f"s.{column} = ?")
                args.append(value)
        sql = "SELECT e.bn, e.idx FROM events e JOIN streams s USING (sk)"
        if where:
            sql += " WHERE " + " AND ".join(where)
        picks = conn.execute(sql + " ORDER BY e.n", args).fetchall()
        bodies: dict[int, list[Any]] = {}
        out = []
        for bn, idx in picks:
            events = bodies.get(bn)
            if events is None:
                row = conn.execute("SELECT body FROM batches WHERE bn = ?", (bn,)).fetchone()
                events = bodies[bn] = orjson.loads(stored_json(row[0]))
            out.append(events[idx])
    finally:
        if conn is not db:
            conn.close()
    return orjson.dumps(out)

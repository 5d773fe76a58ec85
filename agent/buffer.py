"""The durable local buffer: SQLite in WAL mode, driven through aiosqlite.

Why it looks the way it does:

* Durability is bought per transaction, so appends are grouped: a writer task takes every
  append waiting in its queue and commits them in ONE transaction, run in aiosqlite's thread
  in one hop. Under load thousands of events share a commit; when idle an event is
  committed as soon as it arrives (no linger).
* Each event is encoded to its final CloudEvents JSON once, at commit, with its id, stream
  sequence and epoch. Forwarding joins stored bytes; retries and replays resend the same
  bytes.
* Forwarding advances a per-stream cursor (``streams.forwarded_seq``) instead of deleting
  rows in the hot path; ``housekeeping()`` deletes acknowledged rows in bulk later, keeps
  them for ``keep_forwarded`` when asked, and gives freed pages back to the filesystem
  (incremental auto-vacuum), so the file does not grow without bound.
* Counters (ingested, forwarded, dropped, dead-lettered, bytes) live in the ``streams``
  row and change in the same transaction as the events, so status is O(streams) and exact
  even with a million events in the backlog, and survives restarts.
* Nothing is silent: a refused append raises BufferFull, a dropped range is logged,
  counted and becomes an ``mfg.agent.gap`` event in its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import aiosqlite
import orjson

from agent import event as envelope
from agent.errors import BufferCorrupt, BufferError_, BufferFull, DiskFull
from agent.ids import ulid, ulids
from agent.interfaces import Batch, Committed, NewEvent

log = logging.getLogger("edge_agent.buffer")

T = TypeVar("T")

SCHEMA_VERSION = 2
# Each migration takes the file from version i to i+1. Never edit a released one: add one.
MIGRATIONS: list[str] = [
    # 0 -> 1: the core tables
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE streams (
        sid INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        last_seq INTEGER NOT NULL DEFAULT 0,
        forwarded_seq INTEGER NOT NULL DEFAULT 0,
        deleted_seq INTEGER NOT NULL DEFAULT 0,
        ingested_total INTEGER NOT NULL DEFAULT 0,
        ingested_bytes INTEGER NOT NULL DEFAULT 0,
        forwarded_total INTEGER NOT NULL DEFAULT 0,
        forwarded_bytes INTEGER NOT NULL DEFAULT 0,
        dropped_total INTEGER NOT NULL DEFAULT 0,
        dropped_bytes INTEGER NOT NULL DEFAULT 0,
        dead_lettered_total INTEGER NOT NULL DEFAULT 0,
        dead_lettered_bytes INTEGER NOT NULL DEFAULT 0,
        stored_bytes INTEGER NOT NULL DEFAULT 0,
        last_forwarded_at REAL,
        last_error TEXT,
        checkpoint_seq INTEGER NOT NULL DEFAULT 0,
        checkpoint_at REAL
    );
    CREATE TABLE events (
        sid INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        committed_at REAL NOT NULL,
        size INTEGER NOT NULL,
        body BLOB NOT NULL,
        ctl INTEGER NOT NULL DEFAULT 0,  -- 1: the agent's own gap/checkpoint: never dropped
        PRIMARY KEY (sid, seq)
    ) WITHOUT ROWID;
    CREATE TABLE batches (
        batch_id TEXT PRIMARY KEY,
        sid INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE forward_log (
        sid INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        forwarded_at REAL NOT NULL,
        PRIMARY KEY (sid, last_seq)
    ) WITHOUT ROWID;
    CREATE TABLE dead_letters (
        sid INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        status INTEGER,
        dead_at REAL NOT NULL,
        retry_requested INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sid, seq)
    ) WITHOUT ROWID;
    CREATE TABLE dedupe (
        sid INTEGER NOT NULL,
        source_event_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        committed_at REAL NOT NULL,
        PRIMARY KEY (sid, source_event_id)
    ) WITHOUT ROWID;
    CREATE TABLE marks (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        committed_at REAL NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;
    """,
    # 1 -> 2: operator-requested replays of kept events
    """
    CREATE TABLE replays (
        replay_id INTEGER PRIMARY KEY,
        sid INTEGER NOT NULL,
        from_seq INTEGER NOT NULL,
        to_seq INTEGER NOT NULL,
        requested_at REAL NOT NULL
    );
    """,
]
assert len(MIGRATIONS) == SCHEMA_VERSION

#: The buffer's mode (and so its -wal and -shm): the agent's user writes, members of its
#: group (``edge-agent`` on a .deb install) may read, for `edge-agent status`; others nothing.
FILE_MODE = 0o640

#: After the disk filled up, appends are refused until this much is free again, so the
#: agent does not flap between accepting and refusing at the edge of a full disk.
DISK_RESERVE = 4 * 1024 * 1024

CHECKPOINT_TYPE = "mfg.agent.checkpoint"
GAP_TYPE = "mfg.agent.gap"
DROP_OLDEST_REASON = "buffer_full_drop_oldest"


@dataclass(slots=True)
class _Stream:
    sid: int
    name: str
    last_seq: int
    forwarded_seq: int
    checkpoint_seq: int
    stored_bytes: int
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Append:
    stream: str
    events: Sequence[NewEvent]
    marks: Sequence[tuple[str, str]]
    future: asyncio.Future[list[Committed]]
    checkpoint: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stream: str
    sequence: int
    id: str
    reason: str
    status: int | None
    dead_at: float
    retry_requested: bool
    body: bytes


class Buffer:
    """Implements agent.interfaces.Ingest for sources and the batch API for the forwarder."""

    def __init__(
        self,
        path: Path,
        *,
        plant: str,
        agent_id: str,
        durability: str,
        max_bytes: int,
        on_full: str,
        keep_forwarded: float,
        dedupe_window: float,
    ) -> None:
        self.path = path
        self.plant = plant
        self.agent_id = agent_id
        self.durability = durability
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.keep_forwarded = keep_forwarded
        self.dedupe_window = dedupe_window
        self.epoch = ""
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._streams: dict[str, _Stream] = {}
        self._queue: asyncio.Queue[_Append] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._used = 0  # bytes of event bodies stored (events + dead letters)
        self._acked_unreclaimed = 0  # forwarded but not yet deleted
        self._refusing = False  # an append was refused; cleared when room is freed
        self._disk_full: DiskFull | None = None  # latched until DISK_RESERVE is free
        self._closed = False
        self.refused_total = 0
        self.refused_by_stream: dict[str, int] = {}
        self.new_stream_listeners: list[Callable[[str], None]] = []
        self.last_write_error: str | None = None
        #: transactions that committed events: with group commit, far fewer than appends
        self.commits = 0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        plant: str = "plant",
        agent_id: str = "agent",
        durability: str = "fsync",
        max_bytes: int = 1 << 30,
        on_full: str = "block",
        keep_forwarded: float = 0.0,
        dedupe_window: float = 86400.0,
    ) -> Buffer:
        """Open (creating or migrating) the buffer file. A corrupt file is quarantined."""
        self = cls(
            Path(path),
            plant=plant,
            agent_id=agent_id,
            durability=durability,
            max_bytes=max_bytes,
            on_full=on_full,
            keep_forwarded=keep_forwarded,
            dedupe_window=dedupe_window,
        )
        await self._open()
        return self

    async def _open(self) -> None:
        make_dirs_durably(self.path.parent)
        existed = self.path.exists() and self.path.stat().st_size > 0
        if existed and not os.access(self.path, os.R_OK | os.W_OK):
            raise BufferError_(
                f"cannot open buffer {self.path}: permission denied "
                "(the agent's user must own it: chown edge-agent and chmod 640)"
            )
        if not existed:
            # FILE_MODE from the first byte, whatever the umask (-wal/-shm follow the main file)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
            # the name too: SQLite fsyncs the directory only for its -wal/-journal files
            fsync_dir(self.path.parent)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._call(self._init_sync, existed)
        except sqlite3.DatabaseError as exc:
            await self._close_connections()
            if not existed:
                raise BufferError_(f"cannot create buffer {self.path}: {exc}") from exc
            moved = self._quarantine()
            raise BufferCorrupt(
                f"buffer {self.path} is unreadable ({exc}); moved aside to {moved} and kept. "
                "Start the agent again to begin a new buffer (new stream epoch); recover events "
                f"from the old file with: sqlite3 {moved} .recover"
            ) from exc
        except BaseException:
            # e.g. a newer schema: the file is fine, we just must not keep it open (a live
            # aiosqlite thread would keep the process from exiting)
            await self._close_connections()
            raise
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA query_only = ON")
        await self._reader.execute("PRAGMA busy_timeout = 5000")
        with contextlib.suppress(OSError):
            os.chmod(self.path, FILE_MODE)
        self._writer = asyncio.create_task(self._write_loop(), name="buffer-writer")

    def _init_sync(self, existed: bool) -> None:
        db = self._sync
        db.execute("PRAGMA busy_timeout = 5000")
        if existed:
            # Fails with DatabaseError on a file that is not SQLite or is damaged.
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else '?'}")
        else:
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous = {'FULL' if self.durability == 'fsync' else 'NORMAL'}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BufferError_(
                f"buffer {self.path} has schema version {version}, newer than this agent "
                f"understands ({SCHEMA_VERSION}); upgrade edge-agent or set buffer.path elsewhere"
            )
        for v in range(version, SCHEMA_VERSION):
            db.execute("BEGIN IMMEDIATE")
            for stmt in _split_sql(MIGRATIONS[v]):
                db.execute(stmt)
            db.execute(f"PRAGMA user_version = {v + 1}")
            db.execute("COMMIT")
            if version:
                log.info("buffer %s migrated from schema %d to %d", self.path, v, v + 1)
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is None:
            epoch = ulid()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
            db.execute("INSERT INTO meta VALUES ('created_at', ?)", (repr(time.time()),))
            db.execute("COMMIT")
        else:
            epoch = row[0]
        self.epoch = epoch
        for sid, name, last, fwd, ckpt, stored in db.execute(
            "SELECT sid, name, last_seq, forwarded_seq, checkpoint_seq, stored_bytes FROM streams"
        ):
            self._streams[name] = _Stream(sid, name, last, fwd, ckpt, stored)
        self._used = sum(s.stored_bytes for s in self._streams.values())

    def _quarantine(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(target) + suffix))
        # the move itself must survive a power cut: the message below points at target
        with contextlib.suppress(OSError):
            fsync_dir(self.path.parent)
        log.error("buffer %s quarantined to %s", self.path, target)
        return target

    async def close(self) -> None:
        """Commit what is queued, stop the writer, close cleanly. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._call(lambda: self._sync.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._reader, self._db):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._reader = self._db = None

    # ------------------------------------------------------------------ plumbing

    @property
    def _sync(self) -> sqlite3.Connection:
        """The writer's raw connection; only touched inside _call, in aiosqlite's thread."""
        assert self._db is not None
        return self._db._conn  # noqa: SLF001

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in the writer connection's thread: a whole transaction in one hop."""
        assert self._db is not None, "buffer is closed"
        return await self._db._execute(fn, *args)  # noqa: SLF001

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._reader is not None, "buffer is closed"
        reader = self._reader
        return await reader._execute(lambda: fn(reader._conn))  # noqa: SLF001

    def _stream(self, name: str) -> _Stream | None:
        return self._streams.get(name)

    def streams(self) -> list[str]:
        return list(self._streams)

    def wakeup_event(self, stream: str) -> asyncio.Event:
        s = self._streams.get(stream)
        if s is None:
            raise KeyError(stream)
        return s.wakeup

    # ------------------------------------------------------------------ ingest

    def has_room(self) -> bool:
        if self._disk_full is not None and self._disk_free() < DISK_RESERVE:
            return False
        if self.on_full != "block":
            return True
        return not self._refusing and self._used - self._acked_unreclaimed < self.max_bytes

    @property
    def used_bytes(self) -> int:
        return self._used

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        marks: Sequence[tuple[str, str]] = (),
    ) -> list[Committed]:
        if self._closed:
            raise BufferError_("buffer is closed (the agent is stopping)")
        if not events and not marks:
            return []
        if self._disk_full is not None:
            if self._disk_free() < DISK_RESERVE:
                self.refused_total += len(events)
                self.refused_by_stream[stream] = self.refused_by_stream.get(stream, 0) + len(events)
                raise self._disk_full
            self._disk_full = None
        fut: asyncio.Future[list[Committed]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Append(stream, events, marks, fut))
        return await fut

    async def append_checkpoint(self, stream: str) -> Committed | None:
        """Commit an mfg.agent.checkpoint to stream if it had events since the last one."""
        s = self._streams.get(stream)
        if s is None or s.last_seq <= s.checkpoint_seq:
            return None
        fut: asyncio.Future[list[Committed]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Append(stream, (), (), fut, checkpoint=True))
        res = await fut
        return res[0] if res else None

    async def has_mark(self, namespace: str, key: str) -> bool:
        row = await self._read(
            lambda c: c.execute(
                "SELECT 1 FROM marks WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
        )
        return row is not None

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            group = [first]
            events = len(first.events)
            while events < 20_000 and not self._queue.empty():
                item = self._queue.get_nowait()
                group.append(item)
                events += len(item.events)
            try:
                await self._commit_group(group)
            except asyncio.CancelledError:
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(BufferError_("buffer closed before commit"))
                raise
            finally:
                for _ in group:
                    self._queue.task_done()

    async def _commit_group(self, group: list[_Append]) -> None:
        live = [g for g in group if not g.future.done()]
        if not live:
            return
        try:
            results, new_streams, touched = await self._call(self._commit_sync, live)
        except sqlite3.OperationalError as exc:
            err = self._write_error(exc)
            self.last_write_error = str(err)
            if isinstance(err, DiskFull):
                self._disk_full = err
                n = sum(len(g.events) for g in live)
                self.refused_total += n
                for g in live:
                    self.refused_by_stream[g.stream] = self.refused_by_stream.get(
                        g.stream, 0
                    ) + len(g.events)
            log.error("%s", err)
            for g in live:
                if not g.future.done():
                    g.future.set_exception(err)
            return
        except Exception as exc:  # a bug: do not leave sources hanging
            log.exception("buffer commit failed")
            for g in live:
                if not g.future.done():
                    g.future.set_exception(BufferError_(f"buffer commit failed: {exc}"))
            return
        self.last_write_error = None
        self.commits += 1
        for g, res in zip(live, results, strict=True):
            if g.future.done():
                continue
            if isinstance(res, BaseException):
                g.future.set_exception(res)
            else:
                g.future.set_result(res)
        for name in touched:
            self._streams[name].wakeup.set()
        for name in new_streams:
            for cb in self.new_stream_listeners:
                cb(name)

    @contextlib.contextmanager
    def _bookkeeping(self) -> Any:
        """Commit forwarding bookkeeping (an ack: the cursor) without an fsync.

        Events are committed with the configured durability; an ack needs less. In WAL
        mode synchronous=NORMAL still survives a crash of the process; a power cut may roll
        the last acks back, which only means a batch is sent again under its own key (its
        batch row was made durable before its first send: _before_send), never that an
        event is lost. The next fsynced commit makes them durable too. This saves an fsync
        per batch on the drain path. Runs in the db thread only.
        """
        db = self._sync
        if self.durability != "fsync":
            yield
            return
        db.execute("PRAGMA synchronous = NORMAL")
        try:
            yield
        finally:
            db.execute("PRAGMA synchronous = FULL")

    @contextlib.contextmanager
    def _before_send(self) -> Any:
        """Commit a batch row that is about to be sent with a WAL fsync, in either mode.

        The batch id is the Idempotency-Key, and the wire contract says a resend after a
        crash carries the same key; a power cut is a crash. Found by the power-cut
        campaign: with the batch row committed without an fsync (as bookkeeping), a cut
        right after the first send lost the row, and the events went again under a new
        key. With ``durability = "os"`` this fsync also makes every event of the batch (and
        every commit before it) durable before the gateway sees it, so a cut can roll back
        only events nobody outside has seen: a sequence never reaches the gateway with two
        ids. One fsync per batch, not per event. Runs in the db thread only.
        """
        db = self._sync
        if self.durability == "fsync":
            yield
            return
        db.execute("PRAGMA synchronous = FULL")
        try:
            yield
        finally:
            db.execute("PRAGMA synchronous = NORMAL")

    def _disk_free(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _write_error(self, exc: sqlite3.OperationalError) -> BufferError_:
        text = str(exc)
        if "full" in text or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return DiskFull(
                f"disk full writing buffer {self.path}: nothing of these events was committed; "
                f"free space on {self.path.parent} (events are refused until then)"
            )
        return BufferError_(f"cannot write buffer {self.path}: {text}")

    def _commit_sync(
        self, group: list[_Append]
    ) -> tuple[list[list[Committed] | BaseException], list[str], set[str]]:
        """One transaction for a whole group of appends. Runs in the db thread."""
        db = self._sync
        now = time.time()
        results: list[list[Committed] | BaseException] = []
        new_streams: list[str] = []
        touched: set[str] = set()
        # Work on copies of the stream state; publish only after COMMIT.
        staged: dict[str, list[int]] = {}  # name -> [sid, last_seq, checkpoint_seq]
        rows: list[tuple[int, int, str, float, int, bytes, int]] = []
        dedupe_rows: list[tuple[int, str, int, str, float]] = []
        mark_rows: list[tuple[str, str, float]] = []
        counts: dict[int, list[int]] = {}  # sid -> [events, bytes]
        full = False
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = ulids(sum(len(g.events) for g in group) + len(group))
            id_pos = 0
            pending_bytes = 0

            def room() -> int:
                return self.max_bytes - (self._used - self._acked_unreclaimed) - pending_bytes

            for g in group:
                if full:
                    results.append(BufferFull(self._used, self.max_bytes))
                    continue
                st = staged.get(g.stream)
                if st is None:
                    s = self._streams.get(g.stream)
                    if s is None:
                        cur = db.execute("INSERT INTO streams (name) VALUES (?)", (g.stream,))
                        sid = int(cur.lastrowid or 0)
                        new_streams.append(g.stream)
                        st = [sid, 0, 0]
                    else:
                        st = [s.sid, s.last_seq, s.checkpoint_seq]
                    staged[g.stream] = st
                sid = st[0]
                source = envelope.source_uri(self.plant, g.stream)
                events = list(g.events)
                if g.checkpoint:
                    first = st[2] + 1
                    events = [
                        NewEvent(
                            type=CHECKPOINT_TYPE,
                            subject=g.stream,
                            time=envelope.now_rfc3339(),
                            data={
                                "streamepoch": self.epoch,
                                "first_sequence": first,
                                "last_sequence": st[1],
                                "count": st[1] - first + 1,
                            },
                        )
                    ]
                dup_map = self._existing_dupes(db, sid, events)
                first_id = id_pos
                ctl = 1 if g.checkpoint else 0

                def encode_all(
                    base: int,
                    g: _Append = g,
                    events: list[NewEvent] = events,
                    dup_map: dict[str, Committed] = dup_map,
                    first_id: int = first_id,
                    source: str = source,
                    sid: int = sid,
                    ctl: int = ctl,
                ) -> tuple[list[Any], list[Committed], list[Any], int]:
                    """Encode the request on top of sequence ``base`` (again after a drop)."""
                    pos = first_id
                    enc: list[tuple[int, int, str, float, int, bytes, int]] = []
                    out: list[Committed] = []
                    dd: list[tuple[int, str, int, str, float]] = []
                    here: dict[str, Committed] = {}
                    seq = base
                    for ev in events:
                        sei = ev.source_event_id
                        if sei is not None:
                            prior = dup_map.get(sei) or here.get(sei)
                            if prior is not None:
                                out.append(prior)
                                continue
                        seq += 1
                        eid = ids[pos]
                        pos += 1
                        body = envelope.encode(
                            ev,
                            id=eid,
                            source=source,
                            seq=seq,
                            epoch=self.epoch,
                            plant=self.plant,
                            agent_id=self.agent_id,
                        )
                        enc.append((sid, seq, eid, now, len(body), body, ctl))
                        out.append(Committed(g.stream, seq, eid))
                        if sei is not None:
                            here[sei] = Committed(g.stream, seq, eid, duplicate=True)
                            dd.append((sid, sei, seq, eid, now))
                    return enc, out, dd, seq

                encoded, committed, dd_rows, seq = encode_all(st[1])
                id_pos += len(encoded)
                need = sum(r[4] for r in encoded)
                if encoded and need > room() and not g.checkpoint:
                    if self.on_full == "drop_oldest":
                        self._drop_oldest_sync(db, need - room(), now, staged, rows)
                        # gap events took the next sequences: this request goes after them
                        encoded, committed, dd_rows, seq = encode_all(st[1])
                    if need > room():
                        # This request (and the rest of the group) does not fit: refuse whole.
                        full = True
                        self._refusing = True
                        self.refused_total += len(g.events)
                        self.refused_by_stream[g.stream] = self.refused_by_stream.get(
                            g.stream, 0
                        ) + len(g.events)
                        results.append(BufferFull(self._used, self.max_bytes))
                        continue
                dedupe_rows.extend(dd_rows)
                pending_bytes += need
                rows.extend(encoded)
                st[1] = seq
                if g.checkpoint and encoded:
                    st[2] = seq
                cnt = counts.setdefault(sid, [0, 0])
                cnt[0] += len(encoded)
                cnt[1] += need
                mark_rows.extend((ns, key, now) for ns, key in g.marks)
                results.append(committed)
                touched.add(g.stream)
            if rows:
                db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            if dedupe_rows:
                db.executemany("INSERT OR IGNORE INTO dedupe VALUES (?, ?, ?, ?, ?)", dedupe_rows)
            if mark_rows:
                db.executemany("INSERT OR IGNORE INTO marks VALUES (?, ?, ?)", mark_rows)
            for st in staged.values():
                sid = st[0]
                n, b = counts.get(sid, (0, 0))
                db.execute(
                    "UPDATE streams SET last_seq = ?, checkpoint_seq = ?,"
                    " checkpoint_at = CASE WHEN checkpoint_seq != ? THEN ? ELSE checkpoint_at END,"
                    " ingested_total = ingested_total + ?, ingested_bytes = ingested_bytes + ?,"
                    " stored_bytes = stored_bytes + ? WHERE sid = ?",
                    (st[1], st[2], st[2], now, n, b, b, sid),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._reload_streams_sync(db)
            raise
        # Publish the staged state (we are still in the db thread; the loop only reads).
        for name, st in staged.items():
            s = self._streams.get(name)
            n, b = counts.get(st[0], (0, 0))
            if s is None:
                self._streams[name] = _Stream(st[0], name, st[1], 0, st[2], b)
            else:
                s.last_seq, s.checkpoint_seq = st[1], st[2]
                s.stored_bytes += b
            self._used += b
        return results, new_streams, touched | set(staged)

    @staticmethod
    def _existing_dupes(
        db: sqlite3.Connection, sid: int, events: Sequence[NewEvent]
    ) -> dict[str, Committed]:
        keys = [e.source_event_id for e in events if e.source_event_id is not None]
        if not keys:
            return {}
        out: dict[str, Committed] = {}
        name = db.execute("SELECT name FROM streams WHERE sid = ?", (sid,)).fetchone()
        stream = name[0] if name else ""
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = ",".join("?" * len(chunk))
            for key, seq, eid in db.execute(
                f"SELECT source_event_id, seq, id FROM dedupe WHERE sid = ? AND source_event_id IN ({q})",
                (sid, *chunk),
            ):
                out[key] = Committed(stream, seq, eid, duplicate=True)
        return out

    def _drop_oldest_sync(
        self,
        db: sqlite3.Connection,
        need: int,
        now: float,
        staged: dict[str, list[int]],
        pending_rows: list[tuple[int, int, str, float, int, bytes, int]],
    ) -> None:
        """Free at least ``need`` bytes: forwarded rows first, then the oldest unsent events.

        Frees at least 5% of max_bytes at a time, so a full buffer does not drop one event
        per append. Each stream keeps one open mfg.agent.gap event while its sink is down:
        a drop extends that event's range in place (it was never sent, so nobody has seen
        it) instead of appending another, so a long outage cannot fill the buffer with gap
        events, and every range stays exact. Counters in the file and in memory are updated
        here directly; a rollback reloads them (_reload_streams_sync).
        """
        target = max(need, self.max_bytes // 20)
        before = self._used - self._acked_unreclaimed
        self._delete_forwarded_sync(None, now, True)
        if before - (self._used - self._acked_unreclaimed) >= need:
            return
        freed = 0
        in_flight = {
            sid: last
            for sid, last in db.execute("SELECT sid, MAX(last_seq) FROM batches GROUP BY sid")
        }
        while freed < target:
            # the stream whose oldest unsent business event (never our own rows) is oldest
            best: tuple[float, int, int, int] | None = None
            for s in self._streams.values():
                floor = max(s.forwarded_seq, in_flight.get(s.sid, 0))
                row = db.execute(
                    "SELECT committed_at, seq FROM events WHERE sid = ? AND seq > ? "
                    "AND ctl = 0 ORDER BY seq LIMIT 1",
                    (s.sid, floor),
                ).fetchone()
                if row and (best is None or row[0] < best[0]):
                    best = (row[0], s.sid, row[1], floor)
            if best is None:
                break  # only in-flight events and our own rows left: nothing to drop
            _, sid, first, floor = best
            take: list[int] = []
            acc = 0
            for seq, size, is_ctl in db.execute(
                "SELECT seq, size, ctl FROM events WHERE sid = ? AND seq >= ? "
                "ORDER BY seq LIMIT 2000",
                (sid, first),
            ):
                # a dropped run is contiguous and holds business events only
                if is_ctl or (take and seq != take[-1] + 1) or (take and freed + acc >= target):
                    break
                take.append(seq)
                acc += size
            last = take[-1]
            db.execute(
                "DELETE FROM events WHERE sid = ? AND seq >= ? AND seq <= ?", (sid, first, last)
            )
            name = next(s.name for s in self._streams.values() if s.sid == sid)
            stream = self._streams[name]
            st = staged.setdefault(name, [sid, stream.last_seq, stream.checkpoint_seq])
            db.execute(
                "UPDATE streams SET dropped_total = dropped_total + ?, "
                "dropped_bytes = dropped_bytes + ?, stored_bytes = stored_bytes - ? "
                "WHERE sid = ?",
                (len(take), acc, acc, sid),
            )
            stream.stored_bytes -= acc
            self._used -= acc
            freed += acc
            grown = self._extend_open_gap_sync(db, sid, floor, first, last, len(take), pending_rows)
            if grown is None:
                grown = self._append_gap_sync(db, sid, name, st, first, last, len(take), now,
                                              pending_rows)  # fmt: skip
            stream.stored_bytes += grown
            self._used += grown
            freed -= grown
            log.warning(
                "buffer full: dropped %d oldest events of stream %s (sequences %d-%d, %d bytes); "
                "an mfg.agent.gap event tells the central side",
                len(take),
                name,
                first,
                last,
                acc,
                extra={"stream": name, "first_sequence": first, "last_sequence": last},
            )

    def _gap_body(self, name: str, eid: str, seq: int, first: int, last: int, count: int) -> bytes:
        return envelope.encode(
            NewEvent(
                type=GAP_TYPE,
                subject=name,
                time=envelope.now_rfc3339(),
                data={
                    "streamepoch": self.epoch,
                    "first_sequence": first,
                    "last_sequence": last,
                    "count": count,
                    "reason": DROP_OLDEST_REASON,
                },
            ),
            id=eid,
            source=envelope.source_uri(self.plant, name),
            seq=seq,
            epoch=self.epoch,
            plant=self.plant,
            agent_id=self.agent_id,
        )

    def _append_gap_sync(
        self,
        db: sqlite3.Connection,
        sid: int,
        name: str,
        st: list[int],
        first: int,
        last: int,
        count: int,
        now: float,
        pending_rows: list[tuple[int, int, str, float, int, bytes, int]],
    ) -> int:
        """A new gap event at the end of the stream; returns its size."""
        seq = st[1] + 1
        eid = ulid()
        body = self._gap_body(name, eid, seq, first, last, count)
        pending_rows.append((sid, seq, eid, now, len(body), body, 1))
        st[1] = seq
        db.execute(
            "UPDATE streams SET ingested_total = ingested_total + 1, ingested_bytes = "
            "ingested_bytes + ?, stored_bytes = stored_bytes + ? WHERE sid = ?",
            (len(body), len(body), sid),
        )
        return len(body)

    def _extend_open_gap_sync(
        self,
        db: sqlite3.Connection,
        sid: int,
        floor: int,
        first: int,
        last: int,
        count: int,
        pending_rows: list[tuple[int, int, str, float, int, bytes, int]],
    ) -> int | None:
        """Widen the stream's newest drop_oldest gap event to cover ``first..last`` when that
        event is still unsent (above ``floor``: in no batch) and nothing but our own rows lie
        between its range and ``first``. Returns the change in its size, or None when there
        is no such event and a new one must be appended.

        The widened range may then hold the gap event's own sequence or a checkpoint's; the
        receiver gets those, so "every sequence in the range that does not arrive was
        dropped, count says how many" stays exact.
        """
        # the newest own row that is a gap event (checkpoints in between are passed over):
        # rows of this transaction first, the file only when none of them is one
        pending = (
            (r[1], r[2], r[5], i)
            for i, r in reversed(list(enumerate(pending_rows)))
            if r[0] == sid and r[6] == 1
        )
        stored = (
            (row[0], row[1], bytes(row[2]), None)
            for row in db.execute(
                "SELECT seq, id, body FROM events WHERE sid = ? AND seq > ? AND ctl = 1 "
                "ORDER BY seq DESC LIMIT 100",
                (sid, floor),
            )
        )
        found = None
        for seq, eid, body, index in itertools.chain(pending, stored):
            ev = orjson.loads(body)
            if ev.get("type") == GAP_TYPE:
                found = (seq, eid, body, index, ev)
                break
        if found is None:
            return None
        seq, eid, body, index, ev = found
        data = ev.get("data") or {}
        if data.get("reason") != DROP_OLDEST_REASON:
            return None
        low = int(data["last_sequence"])  # the open range ends here
        if low < floor or low >= first:
            return None  # events after its range were sent: widening would claim them
        # between the open range and this run only rows that will arrive (our own)
        present = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(ctl = 0), 0) FROM events "
            "WHERE sid = ? AND seq > ? AND seq < ?",
            (sid, low, first),
        ).fetchone()
        pending_between = sum(1 for r in pending_rows if r[0] == sid and low < r[1] < first)
        if present[1] or present[0] + pending_between != first - low - 1:
            return None
        new_body = self._gap_body(
            ev["subject"], eid, seq, int(data["first_sequence"]), last, int(data["count"]) + count
        )
        grown = len(new_body) - len(body)
        if index is not None:
            r = pending_rows[index]
            pending_rows[index] = (r[0], r[1], r[2], r[3], len(new_body), new_body, r[6])
        else:
            db.execute(
                "UPDATE events SET body = ?, size = ? WHERE sid = ? AND seq = ?",
                (new_body, len(new_body), sid, seq),
            )
        db.execute(
            "UPDATE streams SET ingested_bytes = ingested_bytes + ?, "
            "stored_bytes = stored_bytes + ? WHERE sid = ?",
            (grown, grown, sid),
        )
        return grown

    def _reload_streams_sync(self, db: sqlite3.Connection) -> None:
        for sid, name, last, fwd, ckpt, stored in db.execute(
            "SELECT sid, name, last_seq, forwarded_seq, checkpoint_seq, stored_bytes FROM streams"
        ):
            s = self._streams.get(name)
            if s is None:
                continue
            s.sid, s.last_seq, s.forwarded_seq, s.checkpoint_seq, s.stored_bytes = (
                sid,
                last,
                fwd,
                ckpt,
                stored,
            )
        self._used = sum(s.stored_bytes for s in self._streams.values())

    # ------------------------------------------------------------------ forwarding

    async def pending_batches(self, stream: str) -> list[Batch]:
        """Batches persisted but not acknowledged (after a crash): resend them as they are."""
        s = self._streams.get(stream)
        if s is None:
            return []

        def q(c: sqlite3.Connection) -> list[Batch]:
            out = []
            for bid, first, last in c.execute(
                "SELECT batch_id, first_seq, last_seq FROM batches WHERE sid = ? ORDER BY first_seq",
                (s.sid,),
            ).fetchall():
                rows = c.execute(
                    "SELECT seq, id, body FROM events WHERE sid = ? AND seq BETWEEN ? AND ? "
                    "ORDER BY seq",
                    (s.sid, first, last),
                ).fetchall()
                if len(rows) != last - first + 1:
                    out.append(Batch(stream, bid, self.epoch, first, last, [], []))  # stale
                    continue
                out.append(
                    Batch(
                        stream,
                        bid,
                        self.epoch,
                        first,
                        last,
                        [r[1] for r in rows],
                        [r[2] for r in rows],
                    )
                )
            return out

        batches = await self._read(q)
        stale = [b for b in batches if not b.bodies]
        for b in stale:
            await self.discard_batch(b)
        return [b for b in batches if b.bodies]

    async def read_next(
        self, stream: str, after_seq: int, max_events: int, max_bytes: int
    ) -> list[tuple[int, str, bytes]]:
        """Unsent events after ``after_seq``: the contiguous run starting at the first one.

        A hole (events dropped under drop_oldest, or dead-lettered) ends the run, so a
        batch is always contiguous as the contract requires; the next read starts after it.
        """
        s = self._streams.get(stream)
        if s is None:
            return []
        after = max(after_seq, s.forwarded_seq)

        def q(c: sqlite3.Connection) -> list[tuple[int, str, bytes]]:
            rows = c.execute(
                "SELECT seq, id, body FROM events WHERE sid = ? AND seq > ? ORDER BY seq LIMIT ?",
                (s.sid, after, max_events),
            ).fetchall()
            return _contiguous_run(rows, max_bytes)

        return await self._read(q)

    async def open_batch(
        self, stream: str, rows: Sequence[tuple[int, str, bytes]], priority: str = "normal"
    ) -> Batch | None:
        """Persist a batch id for these rows before the first send (idempotent retries).

        None when the rows changed since they were read: drop_oldest may have deleted them
        or widened an open gap event among them in between. Once the batch row exists they
        are frozen (drop_oldest never touches a row in a batch), so the caller re-reads.
        """
        s = self._streams[stream]
        bid = ulid()
        first, last = rows[0][0], rows[-1][0]

        def tx() -> bool:
            with self._before_send():
                now = self._sync.execute(
                    "SELECT seq, id, CASE WHEN ctl = 1 THEN body END FROM events "
                    "WHERE sid = ? AND seq BETWEEN ? AND ? ORDER BY seq",
                    (s.sid, first, last),
                ).fetchall()
                if len(now) != len(rows) or any(
                    n[0] != r[0] or n[1] != r[1] or (n[2] is not None and bytes(n[2]) != r[2])
                    for n, r in zip(now, rows, strict=True)
                ):
                    return False
                self._sync.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                    (bid, s.sid, first, last, time.time()),
                )
                return True

        if not await self._call(tx):
            return None
        return Batch(
            stream,
            bid,
            self.epoch,
            first,
            last,
            [r[1] for r in rows],
            [r[2] for r in rows],
            priority,
        )

    async def take_batch(
        self,
        stream: str,
        after_seq: int,
        max_events: int,
        max_bytes: int,
        priority: str = "normal",
    ) -> Batch | None:
        """read_next and open_batch in one hop to the writer's thread: the next contiguous
        run after ``after_seq`` (or the cursor), persisted under a new batch id, or None.

        Reading in the writer's own transaction means nothing (drop_oldest) can change the
        rows between the read and the batch row, and it is one thread hop instead of two
        on the drain path.
        """
        s = self._streams.get(stream)
        if s is None:
            return None
        bid = ulid()

        def tx() -> tuple[int, list[bytes]] | None:
            db = self._sync
            after = max(after_seq, s.forwarded_seq)
            # No id column: the drain path never needs the ids (see _IdsInBodies), and
            # fetching them costs a third of the read.
            rows = db.execute(
                "SELECT seq, body FROM events WHERE sid = ? AND seq > ? ORDER BY seq LIMIT ?",
                (s.sid, after, max_events),
            ).fetchall()
            if not rows:
                return None
            bodies = [r[1] for r in _contiguous_run(rows, max_bytes)]
            first = rows[0][0]
            with self._before_send():
                db.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                    (bid, s.sid, first, first + len(bodies) - 1, time.time()),
                )
            return first, bodies

        taken = await self._call(tx)
        if taken is None:
            return None
        first, bodies = taken
        return Batch(
            stream,
            bid,
            self.epoch,
            first,
            first + len(bodies) - 1,
            _IdsInBodies(bodies),
            bodies,
            priority,
        )

    async def split_batch(self, batch: Batch) -> tuple[Batch, Batch]:
        """Replace ``batch`` by its two halves in one transaction (bisecting a rejection), so
        its events are never outside a batch, where drop_oldest could take them."""
        s = self._streams[batch.stream]
        mid = len(batch) // 2
        halves = []
        for lo, hi in ((0, mid), (mid, len(batch))):
            halves.append(
                Batch(
                    batch.stream,
                    ulid(),
                    self.epoch,
                    batch.first_sequence + lo,
                    batch.first_sequence + hi - 1,
                    batch.ids[lo:hi],
                    batch.bodies[lo:hi],
                    batch.priority,
                )
            )

        def tx() -> None:
            with self._before_send():
                self._sync.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))
                self._sync.executemany(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                    [
                        (h.batch_id, s.sid, h.first_sequence, h.last_sequence, time.time())
                        for h in halves
                    ],  # fmt: skip
                )

        await self._call(tx)
        return halves[0], halves[1]

    async def discard_batch(self, batch: Batch) -> None:
        """Forget a persisted batch without advancing (re-formed smaller, or stale)."""
        await self._call(
            lambda: self._sync.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))
        )

    async def ack(self, batch: Batch) -> None:
        """The sink accepted every event of ``batch``: advance the stream's cursor past it.

        Idempotent, and complete even if the caller is cancelled while it runs: the
        transaction is already queued to the writer's thread then, so the in-memory cursor
        is moved there too. Were it moved after the await, a forwarder cancelled here (a
        reload, a stop) would leave a stale cursor and its successor would send the batch
        again and count it twice.
        """
        s = self._streams[batch.stream]
        now = time.time()

        def tx() -> None:
            db = self._sync
            with self._bookkeeping():
                db.execute("BEGIN IMMEDIATE")
                try:
                    done = db.execute(
                        "SELECT forwarded_seq FROM streams WHERE sid = ?", (s.sid,)
                    ).fetchone()[0]
                    db.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))
                    # only what is past the cursor counts (a batch is contiguous)
                    new = batch.bodies[max(0, done - batch.first_sequence + 1) :]
                    size = sum(map(len, new))
                    if new:
                        db.execute(
                            "UPDATE streams SET forwarded_seq = ?, forwarded_total ="
                            " forwarded_total + ?, forwarded_bytes = forwarded_bytes + ?,"
                            " last_forwarded_at = ?, last_error = NULL WHERE sid = ?",
                            (batch.last_sequence, len(new), size, now, s.sid),
                        )
                        if self.keep_forwarded > 0:
                            db.execute(
                                "INSERT OR REPLACE INTO forward_log VALUES (?, ?, ?)",
                                (s.sid, batch.last_sequence, now),
                            )
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            s.forwarded_seq = max(s.forwarded_seq, batch.last_sequence, done)
            if self.keep_forwarded <= 0:
                self._acked_unreclaimed += size
                self._refusing = False

        await self._call(tx)

    async def dead_letter(self, batch: Batch, reason: str, status: int | None) -> None:
        """Move the single event of ``batch`` to the dead-letter table and move on."""
        assert len(batch) == 1, "bisect down to one event before dead-lettering"
        s = self._streams[batch.stream]
        now = time.time()
        body = batch.bodies[0]

        def tx() -> None:
            db = self._sync
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))
                done = db.execute(
                    "SELECT forwarded_seq FROM streams WHERE sid = ?", (s.sid,)
                ).fetchone()[0]
                if batch.first_sequence <= done:  # settled already (see ack)
                    db.execute("COMMIT")
                    s.forwarded_seq = max(s.forwarded_seq, done)
                    return
                db.execute(
                    "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                    (s.sid, batch.first_sequence, batch.ids[0], body, reason, status, now),
                )
                db.execute(
                    "DELETE FROM events WHERE sid = ? AND seq = ?", (s.sid, batch.first_sequence)
                )
                db.execute(
                    "UPDATE streams SET forwarded_seq = MAX(forwarded_seq, ?),"
                    " dead_lettered_total = dead_lettered_total + 1,"
                    " dead_lettered_bytes = dead_lettered_bytes + ?, last_error = ? WHERE sid = ?",
                    (
                        batch.first_sequence,
                        len(body),
                        f"dead-lettered {batch.ids[0]}: {reason}",
                        s.sid,
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            s.forwarded_seq = max(s.forwarded_seq, batch.first_sequence)  # as in ack

        await self._call(tx)

    async def set_last_error(self, stream: str, error: str | None) -> None:
        s = self._streams[stream]
        await self._call(
            lambda: self._sync.execute(
                "UPDATE streams SET last_error = ? WHERE sid = ?", (error, s.sid)
            )
        )

    # ------------------------------------------------------------------ dead letters, replays

    async def dead_letters(self, stream: str | None = None) -> list[DeadLetter]:
        def q(c: sqlite3.Connection) -> list[DeadLetter]:
            return [
                DeadLetter(name, seq, eid, reason, status, dead_at, bool(retry), body)
                for name, seq, eid, reason, status, dead_at, retry, body in c.execute(
                    "SELECT s.name, d.seq, d.id, d.reason, d.status, d.dead_at, "
                    "d.retry_requested, d.body FROM dead_letters d JOIN streams s USING (sid) "
                    "WHERE ? IS NULL OR s.name = ? ORDER BY s.name, d.seq",
                    (stream, stream),
                )
            ]

        return await self._read(q)

    async def retry_requested(self, stream: str) -> list[DeadLetter]:
        return [d for d in await self.dead_letters(stream) if d.retry_requested]

    async def resolve_dead_letter(
        self, stream: str, seq: int, *, delivered: bool, reason: str = ""
    ) -> None:
        """After a retry: delivered -> remove it; else keep it with the new reason."""
        s = self._streams[stream]

        def tx() -> None:
            db = self._sync
            if delivered:
                row = db.execute(
                    "SELECT length(body) FROM dead_letters WHERE sid = ? AND seq = ?", (s.sid, seq)
                ).fetchone()
                db.execute("DELETE FROM dead_letters WHERE sid = ? AND seq = ?", (s.sid, seq))
                if row:
                    db.execute(
                        "UPDATE streams SET stored_bytes = stored_bytes - ? WHERE sid = ?",
                        (row[0], s.sid),
                    )
                    s.stored_bytes -= row[0]
                    self._used -= row[0]
            else:
                db.execute(
                    "UPDATE dead_letters SET retry_requested = 0, reason = ? WHERE sid = ? AND seq = ?",
                    (reason, s.sid, seq),
                )

        await self._call(tx)

    async def pending_replays(self, stream: str) -> list[tuple[int, int, int]]:
        s = self._streams.get(stream)
        if s is None:
            return []
        return await self._read(
            lambda c: c.execute(
                "SELECT replay_id, from_seq, to_seq FROM replays WHERE sid = ? ORDER BY replay_id",
                (s.sid,),
            ).fetchall()
        )

    async def read_range(
        self, stream: str, after_seq: int, to_seq: int, max_events: int
    ) -> list[tuple[int, str, bytes]]:
        s = self._streams[stream]
        return await self._read(
            lambda c: c.execute(
                "SELECT seq, id, body FROM events WHERE sid = ? AND seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?",
                (s.sid, after_seq, to_seq, max_events),
            ).fetchall()
        )

    async def finish_replay(self, replay_id: int, progressed_to: int | None = None) -> None:
        def tx() -> None:
            if progressed_to is None:
                self._sync.execute("DELETE FROM replays WHERE replay_id = ?", (replay_id,))
            else:
                self._sync.execute(
                    "UPDATE replays SET from_seq = ? WHERE replay_id = ?",
                    (progressed_to, replay_id),
                )

        await self._call(tx)

    # ------------------------------------------------------------------ housekeeping

    async def housekeeping(self, max_rows: int = 20_000) -> int:
        """Delete acknowledged rows (past keep_forwarded), prune dedupe keys, reclaim pages.

        Works in bounded chunks so an append never waits behind a huge DELETE.
        Returns the number of bytes freed.
        """
        freed = await self._call(self._delete_forwarded_sync, max_rows, time.time(), False)
        await self._call(self._prune_sync, time.time())
        return freed

    def _delete_forwarded_sync(self, limit_rows: int | None, now: float, force: bool) -> int:
        db = self._sync
        own_tx = not db.in_transaction
        if own_tx:
            db.execute("BEGIN IMMEDIATE")
        freed_total = 0
        try:
            for s in list(self._streams.values()):
                upto = s.forwarded_seq
                if self.keep_forwarded > 0 and not force:
                    row = db.execute(
                        "SELECT MAX(last_seq) FROM forward_log WHERE sid = ? AND forwarded_at < ?",
                        (s.sid, now - self.keep_forwarded),
                    ).fetchone()
                    upto = min(upto, row[0] or 0)
                lo = db.execute(
                    "SELECT deleted_seq FROM streams WHERE sid = ?", (s.sid,)
                ).fetchone()[0]
                if upto <= lo:
                    continue
                if limit_rows is not None:
                    upto = min(upto, lo + limit_rows)
                freed = db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM events WHERE sid = ? AND seq > ? AND seq <= ?",
                    (s.sid, lo, upto),
                ).fetchone()[0]
                db.execute(
                    "DELETE FROM events WHERE sid = ? AND seq > ? AND seq <= ?", (s.sid, lo, upto)
                )
                db.execute("DELETE FROM forward_log WHERE sid = ? AND last_seq <= ?", (s.sid, upto))
                db.execute(
                    "UPDATE streams SET deleted_seq = ?, stored_bytes = stored_bytes - ? "
                    "WHERE sid = ?",
                    (upto, freed, s.sid),
                )
                s.stored_bytes -= freed
                self._used -= freed
                freed_total += freed
            if own_tx:
                db.execute("COMMIT")
        except BaseException:
            if own_tx and db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if freed_total:
            self._refusing = False
        if self.keep_forwarded <= 0 or force:
            self._acked_unreclaimed = max(0, self._acked_unreclaimed - freed_total)
            if force:
                self._acked_unreclaimed = 0
        return freed_total

    def _prune_sync(self, now: float) -> None:
        db = self._sync
        db.execute("DELETE FROM dedupe WHERE committed_at < ?", (now - self.dedupe_window,))
        free_pages = db.execute("PRAGMA freelist_count").fetchone()[0]
        if free_pages > 256:
            # It frees one page per sqlite3_step, and the sqlite3 module steps a statement
            # without result columns only once: executescript runs it to completion.
            db.executescript("PRAGMA incremental_vacuum(4096);")
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ------------------------------------------------------------------ meta & status

    async def write_meta(self, key: str, value: Any) -> None:
        data = orjson.dumps(value).decode()
        await self._call(
            lambda: self._sync.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, data))
        )

    async def stream_rows(self) -> list[dict[str, Any]]:
        """The streams table as dicts, plus the commit time of the oldest unsent event."""

        def q(c: sqlite3.Connection) -> list[dict[str, Any]]:
            return read_stream_rows(c)

        return await self._read(q)

    def stream_state(self, stream: str) -> tuple[int, int]:
        """(last committed sequence, forwarded cursor) as this process knows them."""
        s = self._streams[stream]
        return s.last_seq, s.forwarded_seq


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (POSIX: a new, renamed or removed name
    survives a power cut only once its directory is fsynced)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(directory: Path) -> None:
    """``mkdir -p`` whose every new directory survives a power cut: each one created is
    fsynced in its parent (found by the power-cut campaign: a buffer in a directory the
    agent had created came back, after a cut, as no directory and no buffer at all)."""
    if directory.is_dir():
        return
    try:
        directory.mkdir()
    except FileNotFoundError:  # as pathlib's mkdir(parents=True): the parents first
        if directory.parent == directory:
            raise
        make_dirs_durably(directory.parent)
        make_dirs_durably(directory)
        return
    except FileExistsError:
        if directory.is_dir():
            return
        raise
    fsync_dir(directory.parent)


def read_stream_rows(c: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per-stream counters straight from the file: used by the agent and by status."""
    cols = [
        "sid", "name", "last_seq", "forwarded_seq", "ingested_total", "ingested_bytes",
        "forwarded_total", "forwarded_bytes", "dropped_total", "dropped_bytes",
        "dead_lettered_total", "dead_lettered_bytes", "stored_bytes", "last_forwarded_at",
        "last_error", "checkpoint_seq", "checkpoint_at",
    ]  # fmt: skip
    out = []
    for row in c.execute(f"SELECT {', '.join(cols)} FROM streams ORDER BY name").fetchall():
        d = dict(zip(cols, row, strict=True))
        first = c.execute(
            "SELECT committed_at FROM events WHERE sid = ? AND seq > ? ORDER BY seq LIMIT 1",
            (d["sid"], d["forwarded_seq"]),
        ).fetchone()
        d["oldest_unsent_at"] = first[0] if first else None
        d["dead_letters"] = c.execute(
            "SELECT COUNT(*) FROM dead_letters WHERE sid = ?", (d["sid"],)
        ).fetchone()[0]
        d["backlog_events"] = (
            d["ingested_total"]
            - d["forwarded_total"]
            - d["dropped_total"]
            - d["dead_lettered_total"]
        )
        d["backlog_bytes"] = (
            d["ingested_bytes"]
            - d["forwarded_bytes"]
            - d["dropped_bytes"]
            - d["dead_lettered_bytes"]
        )
        out.append(d)
    return out


_Row = TypeVar("_Row", bound=tuple[Any, ...])


def _contiguous_run(rows: Sequence[_Row], max_bytes: int) -> list[_Row]:
    """The leading run of consecutive sequences that fits max_bytes as a JSON array: a
    hole (dropped or dead-lettered events) ends it, so a batch is always contiguous.
    Each row is (seq, ..., body)."""
    # The usual case, decided without the loop: no hole (seq is the key, so a span equal
    # to the count means consecutive) and the whole array fits.
    if rows and rows[-1][0] - rows[0][0] == len(rows) - 1:
        if sum(len(r[-1]) for r in rows) + len(rows) + 1 <= max_bytes:
            return list(rows)
    out: list[_Row] = []
    size = 1
    for row in rows:
        seq, body = row[0], row[-1]
        if out and (seq != out[-1][0] + 1 or size + len(body) + 1 > max_bytes):
            break
        out.append(row)
        size += len(body) + 1
    return out


class _IdsInBodies(Sequence[str]):
    """A batch's event ids, read from its stored bodies only when asked for.

    Only bisection, dead-lettering and their log lines look at ids; the drain path does
    not, so take_batch leaves them inside the bodies instead of fetching a column.
    """

    __slots__ = ("_bodies",)

    def __init__(self, bodies: Sequence[bytes]) -> None:
        self._bodies = bodies

    def __len__(self) -> int:
        return len(self._bodies)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [orjson.loads(b)["id"] for b in self._bodies[index]]
        return str(orjson.loads(self._bodies[index])["id"])


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]

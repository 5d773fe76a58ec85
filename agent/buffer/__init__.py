"""The durable local buffer: SQLite in WAL mode, behind one writer thread.

One noun per module:

* ``schema``: tables, migrations, opening the file, quarantining a corrupt one;
* ``writer``: the one queue and the one thread where every SQL statement of the running
  agent executes; database functions return deltas, the event loop applies them;
* ``state``: the in-memory state (streams, sizes, counters) and those deltas;
* ``ingest``: group commit and encoding;
* ``overflow``: drop_oldest and its gap events;
* ``batches``: take, split, ack, dead-letter;
* ``operator``: dead letters and replays, the CLI's only way in;
* ``housekeeping``: deleting acknowledged rows, pruning, noticing operator changes;
* ``stats``: the read-only view of the counters.

``Buffer`` ties them together: agent.interfaces.Ingest for sources and
agent.interfaces.BatchStore for the forwarder. Nothing is silent: a refused append
raises BufferFull, a dropped range is logged, counted and becomes an ``mfg.agent.gap``
event in its stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.buffer import batches, housekeeping, ingest, operator, schema, stats
from agent.buffer.ingest import CHECKPOINT_TYPE, PendingAppend
from agent.buffer.operator import DeadLetter
from agent.buffer.overflow import DROP_OLDEST_REASON, GAP_TYPE
from agent.buffer.schema import MIGRATIONS, SCHEMA_VERSION
from agent.buffer.state import BufferState, Settings, StreamState
from agent.buffer.stats import StreamStats
from agent.buffer.writer import Writer
from agent.durable_files import FILE_MODE, fsync_dir, make_dirs_durably
from agent.errors import BufferError_, DiskFull
from agent.interfaces import Batch, Committed, NewEvent

log = logging.getLogger("edge_agent.buffer")

__all__ = [
    "CHECKPOINT_TYPE",
    "DISK_RESERVE",
    "DROP_OLDEST_REASON",
    "FILE_MODE",
    "GAP_TYPE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Batch",
    "Buffer",
    "DeadLetter",
    "StreamStats",
    "fsync_dir",
    "make_dirs_durably",
]

#: After the disk filled up, appends are refused until this much is free again, so the
#: agent does not flap between accepting and refusing at the edge of a full disk.
DISK_RESERVE = 4 * 1024 * 1024

#: close() waits this long for queued work before failing what is left
CLOSE_TIMEOUT = 10.0


class Buffer:
    """Implements agent.interfaces.Ingest for sources and BatchStore for the forwarder."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.path
        self.max_bytes = settings.max_bytes
        self.state = BufferState()
        self._writer: Writer[PendingAppend] | None = None
        self._disk_full: DiskFull | None = None  # latched until DISK_RESERVE is free
        self._closed = False
        self.new_stream_listeners: list[Callable[[str], None]] = []
        self.last_write_error: str | None = None

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
        settings = Settings(
            Path(path), plant, agent_id, durability, max_bytes, on_full, keep_forwarded,
            dedupe_window,
        )  # fmt: skip
        self = cls(settings)
        await self._open()
        return self

    async def _open(self) -> None:
        path = self.path
        existed = schema.prepare_file(path)
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-sql")
        db: sqlite3.Connection | None = None

        def init() -> schema.Opened:
            nonlocal db
            db = schema.connect(path)
            return schema.initialise(db, path, existed, self.settings.durability)

        try:
            opened = await loop.run_in_executor(executor, init)
        except BaseException as exc:
            # close in the same thread, and let the thread end: a live one would keep the
            # process from exiting (e.g. a newer schema: the file is fine, just not ours)
            if db is not None:
                await loop.run_in_executor(executor, db.close)
            executor.shutdown(wait=True)
            if not isinstance(exc, sqlite3.DatabaseError):
                raise
            if not existed:
                raise BufferError_(f"cannot create buffer {path}: {exc}") from exc
            raise schema.corrupt_error(path, schema.quarantine(path), exc) from exc
        assert db is not None
        self.state.epoch = opened.epoch
        self.state.operator_generation = opened.operator_generation
        for sid, name, last, fwd, ckpt, stored in opened.streams:
            self.state.streams[name] = StreamState(sid, name, last, fwd, ckpt, stored)
        self.state.used = sum(s.stored_bytes for s in self.state.streams.values())
        schema.chmod_file(path)
        self._writer = Writer(
            db, executor, self.state, self._commit_group, lambda a: len(a.events), _fail_append
        )
        await self._writer.start()

    async def close(self) -> None:
        """Commit what is queued (up to CLOSE_TIMEOUT), stop the writer, close cleanly.
        Every queued append gets its result or a BufferError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await self._writer.close(CLOSE_TIMEOUT)

    @property
    def _w(self) -> Writer[PendingAppend]:
        if self._writer is None or self._closed:
            raise BufferError_("buffer is closed (the agent is stopping)")
        return self._writer

    # ------------------------------------------------------------------ state

    @property
    def epoch(self) -> str:
        return self.state.epoch

    @property
    def durability(self) -> str:
        return self.settings.durability

    @property
    def on_full(self) -> str:
        return self.settings.on_full

    @property
    def keep_forwarded(self) -> float:
        return self.settings.keep_forwarded

    @property
    def refused_total(self) -> int:
        return self.state.refused_total

    @property
    def refused_by_stream(self) -> dict[str, int]:
        return self.state.refused_by_stream

    @property
    def commits(self) -> int:
        """Transactions that committed events: with group commit, far fewer than appends."""
        return self.state.commits

    @property
    def used_bytes(self) -> int:
        return self.state.used

    def streams(self) -> list[str]:
        return list(self.state.streams)

    def wakeup_event(self, stream: str) -> asyncio.Event:
        return self.state.streams[stream].wakeup

    def stream_state(self, stream: str) -> tuple[int, int]:
        """(last committed sequence, forwarded cursor) as this process knows them."""
        s = self.state.streams[stream]
        return s.last_seq, s.forwarded_seq

    # ------------------------------------------------------------------ ingest

    def has_room(self) -> bool:
        if self._disk_full is not None and self._disk_free() < DISK_RESERVE:
            return False
        if self.settings.on_full != "block":
            return True
        st = self.state
        return not st.refusing and st.used - st.acked_unreclaimed < self.settings.max_bytes

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
                self._count_refused(stream, len(events))
                raise self._disk_full
            self._disk_full = None
        fut: asyncio.Future[list[Committed]] = asyncio.get_running_loop().create_future()
        self._w.append(PendingAppend(stream, events, marks, fut))
        return await fut

    async def append_checkpoint(self, stream: str) -> Committed | None:
        """Commit an mfg.agent.checkpoint to stream if it had events since the last one."""
        s = self.state.streams.get(stream)
        if s is None or s.last_seq <= s.checkpoint_seq:
            return None
        fut: asyncio.Future[list[Committed]] = asyncio.get_running_loop().create_future()
        self._w.append(PendingAppend(stream, (), (), fut, checkpoint=True))
        res = await fut
        return res[0] if res else None

    async def has_mark(self, namespace: str, key: str) -> bool:
        row = await self._w.run(
            lambda c: c.execute(
                "SELECT 1 FROM marks WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
        )
        return row is not None

    def _count_refused(self, stream: str, n: int) -> None:
        self.state.refused_total += n
        self.state.refused_by_stream[stream] = self.state.refused_by_stream.get(stream, 0) + n

    async def _commit_group(self, group: list[PendingAppend]) -> None:
        """The writer's handler for a group of appends (on the event loop)."""
        live = [g for g in group if not g.future.done()]
        if not live:
            return
        assert self._writer is not None
        try:
            results, delta = await self._writer.hop(
                lambda db: ingest.commit_group(db, self.settings, self.state, live)
            )
        except sqlite3.OperationalError as exc:
            err = self._write_error(exc)
            self.last_write_error = str(err)
            if isinstance(err, DiskFull):
                self._disk_full = err
                for g in live:
                    self._count_refused(g.stream, len(g.events))
            log.error("%s", err)
            for g in live:
                _fail_append(g, err)
            return
        self.state.apply(delta)
        self.last_write_error = None
        for g, res in zip(live, results, strict=True):
            if g.future.done():
                continue
            if isinstance(res, BaseException):
                g.future.set_exception(res)
            else:
                g.future.set_result(res)
        for name in delta.seqs:
            self.state.streams[name].wakeup.set()
        for name in delta.new_streams:
            for cb in self.new_stream_listeners:
                cb(name)

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

    # ------------------------------------------------------------------ forwarding

    async def pending_batches(self, stream: str) -> list[Batch]:
        """Batches persisted but not acknowledged (after a crash): resend them as they are."""
        s = self.state.streams.get(stream)
        if s is None:
            return []
        found = await self._w.run(lambda db: batches.pending(db, self.epoch, s))
        for b in found:
            if not b.bodies:
                await self.discard_batch(b)
        return [b for b in found if b.bodies]

    async def take_batch(
        self,
        stream: str,
        after_seq: int,
        max_events: int,
        max_bytes: int,
        priority: str = "normal",
    ) -> Batch | None:
        """The next contiguous run after ``after_seq`` (or the cursor), persisted under a
        new batch id (fsynced before it is returned, so before its first send), or None."""
        got = await self.take_batches(stream, after_seq, max_events, max_bytes, 1, priority)
        return got[0] if got else None

    async def take_batches(
        self,
        stream: str,
        after_seq: int,
        max_events: int,
        max_bytes: int,
        count: int,
        priority: str = "normal",
    ) -> list[Batch]:
        """Up to ``count`` next runs, in order, persisted together (one transaction, one
        fsync) before they are returned; empty when there is nothing to send."""
        s = self.state.streams.get(stream)
        if s is None:
            return []
        return await self._w.run(
            lambda db: batches.take(
                db,
                self.settings,
                self.epoch,
                s,
                after_seq,
                max_events,
                max_bytes,
                priority,
                count,
            )  # fmt: skip
        )

    async def split_batch(self, batch: Batch) -> tuple[Batch, Batch]:
        """Replace ``batch`` by its two halves in one transaction (bisecting a rejection)."""
        s = self.state.streams[batch.stream]
        parts = batches.halves(batch, self.epoch)
        await self._w.run(lambda db: batches.split(db, self.settings, s, batch, parts))
        return parts

    async def discard_batch(self, batch: Batch) -> None:
        """Forget a persisted batch without advancing (re-formed smaller, or stale)."""
        await self._w.run(lambda db: batches.discard(db, batch))

    async def ack(self, batch: Batch) -> None:
        """The sink accepted every event of ``batch``: advance the stream's cursor past it.

        Idempotent, and complete even if the caller is cancelled while it runs: the job is
        queued to the writer then, and the writer applies the cursor (agent/buffer/writer.py).
        Were it moved by the caller after the await, a forwarder cancelled here (a reload,
        a stop) would leave a stale cursor and its successor would send the batch again
        and count it twice.
        """
        s = self.state.streams[batch.stream]
        await self._w.write(lambda db: batches.ack(db, self.settings, s, batch))

    async def ack_many(self, accepted: list[Batch]) -> None:
        """Acknowledge consecutive accepted batches of one stream in one transaction;
        the same guarantees as ack."""
        if not accepted:
            return
        s = self.state.streams[accepted[0].stream]
        await self._w.write(lambda db: batches.ack_many(db, self.settings, s, accepted))

    async def dead_letter(self, batch: Batch, reason: str, status: int | None) -> None:
        """Move the single event of ``batch`` to the dead-letter table and move on."""
        assert len(batch) == 1, "bisect down to one event before dead-lettering"
        s = self.state.streams[batch.stream]
        await self._w.write(lambda db: batches.dead_letter(db, s, batch, reason, status))

    async def set_last_error(self, stream: str, error: str | None) -> None:
        s = self.state.streams[stream]
        await self._w.run(lambda db: batches.set_last_error(db, s, error))

    # ------------------------------------------------------------------ dead letters, replays

    async def dead_letters(self, stream: str | None = None) -> list[DeadLetter]:
        return await self._w.run(lambda db: operator.list_dead_letters(db, stream))

    async def retry_requested(self, stream: str) -> list[DeadLetter]:
        return await self._w.run(lambda db: operator.retry_requested(db, stream))

    async def resolve_dead_letter(
        self, stream: str, seq: int, *, delivered: bool, reason: str = ""
    ) -> None:
        """After a retry: delivered -> remove it; else keep it with the new reason."""
        s = self.state.streams[stream]
        await self._w.write(lambda db: operator.resolve(db, s, seq, delivered, reason))

    async def pending_replays(self, stream: str) -> list[tuple[int, int, int]]:
        s = self.state.streams.get(stream)
        if s is None:
            return []
        return await self._w.run(lambda db: operator.pending_replays(db, s))

    async def read_range(
        self, stream: str, after_seq: int, to_seq: int, max_events: int
    ) -> list[tuple[int, str, bytes]]:
        """Committed events ``after_seq < seq <= to_seq`` as (seq, id, body), in order."""
        s = self.state.streams.get(stream)
        if s is None:
            return []
        return await self._w.run(
            lambda db: operator.read_range(db, s, after_seq, to_seq, max_events)
        )

    async def finish_replay(self, replay_id: int, progressed_to: int | None = None) -> None:
        await self._w.run(lambda db: operator.finish_replay(db, replay_id, progressed_to))

    # ------------------------------------------------------------------ housekeeping, stats

    async def housekeeping(self, max_rows: int = 20_000) -> int:
        """Delete acknowledged rows (past keep_forwarded), prune dedupe keys, reclaim pages,
        re-read sizes an operator command changed. Bounded chunks, so an append never waits
        behind a huge DELETE. Returns the number of bytes freed."""
        now = time.time()
        return await self._w.write(
            lambda db: housekeeping.run(db, self.settings, self.state, max_rows, now)
        )

    async def checkpoint_wal(self) -> None:
        """Copy the WAL into the main file and truncate it (for measuring the file size)."""
        await self._w.run(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())

    async def stream_stats(self) -> list[StreamStats]:
        return await self._w.run(stats.read_streams)

    async def stream_rows(self) -> list[dict[str, Any]]:
        """The streams table as dicts (see StreamStats.as_dict), for heartbeat and status."""
        return [s.as_dict() for s in await self.stream_stats()]


def _fail_append(item: PendingAppend, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)

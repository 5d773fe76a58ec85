"""The writer: the one queue and the one thread where every SQL statement of the running
agent executes.

Why a plain ``sqlite3`` connection in a single-worker executor and not aiosqlite: a
buffer operation is a multi-statement transaction (a group commit is BEGIN, a dedupe
lookup per stream, an INSERT per run of events (rows.py), two executemany, an UPDATE per
stream, COMMIT; drop_oldest adds a loop of SELECT/DELETE/UPDATE), and it must run as ONE
function in the database thread.
aiosqlite's public API runs one statement per hop (about 8 hops per group commit, more
under drop_oldest), so the old code reached into its private ``_execute`` and ``_conn``
to get one hop; with that gone, aiosqlite would add nothing but its own second queue.
Here a job is one function and one hop, and the order of jobs is the order of the queue.
Measured with ``python -m bench --quick --only ingest`` (once each, same loaded machine):
aiosqlite with its private one-hop call before, 16.7k events/s = 0.63 of raw executemany
(200 concurrent single-event appends: 6.1k/s = 0.23); this writer after, 18.2k events/s
= 0.66 (concurrent: 7.4k/s = 0.27). Same hop count (one per job), no regression, one
dependency less.

Database functions READ the in-memory state (agent/buffer/state.py) and return a Delta;
this task applies the delta on the event loop right after the function returns, before
the next one starts and before the caller's future resolves. So the caller being
cancelled (a reload stopping a forwarder in the middle of an ack) cannot leave memory
behind the file, and nothing but the event loop ever changes the state.

Appends queued next to each other are handed to the ingest handler as one group (group
commit); any other job runs alone, in queue order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from agent.buffer.state import BufferState, Delta
from agent.errors import BufferError_
from agent.tasks import TaskScope

log = logging.getLogger("edge_agent.buffer")

T = TypeVar("T")
A = TypeVar("A")

#: a group commit takes at most about this many events
GROUP_EVENTS = 20_000


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], tuple[Any, Delta | None]]
    future: asyncio.Future[Any]


class Writer(Generic[A]):
    """One connection, one thread, one queue. ``A`` is the ingest layer's append item."""

    def __init__(
        self,
        db: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        state: BufferState,
        on_appends: Callable[[list[A]], Awaitable[None]],
        size_of: Callable[[A], int],
        fail: Callable[[A, BaseException], None],
    ) -> None:
        self._db = db
        self._executor = executor
        self._state = state
        self._on_appends = on_appends
        self._size_of = size_of
        self._fail = fail
        self._jobs: collections.deque[_Job | A] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._scope = TaskScope("buffer writer")
        #: what the loop took off the queue and has not resolved yet (failed if it crashes)
        self._in_hand: list[_Job | A] = []

    async def start(self) -> None:
        """Start the loop in the writer's own task scope (agent/tasks.py): a crash of the
        loop is logged, fails whatever is queued, and is raised again by close()."""
        await self._scope.open()
        self._scope.spawn(self._loop(), name="buffer-writer")

    # ------------------------------------------------------------------ submitting

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` (no change to memory) in the writer's thread, in queue order."""
        return cast(T, await self._submit(lambda db: (fn(db), None)))

    async def write(self, fn: Callable[[sqlite3.Connection], tuple[T, Delta]]) -> T:
        """Run ``fn`` in the writer's thread; apply the Delta it returns, then resolve."""
        return cast(T, await self._submit(fn))

    async def _submit(self, fn: Callable[[sqlite3.Connection], tuple[Any, Delta | None]]) -> Any:
        if self._stopping:
            raise BufferError_("buffer is closed (the agent is stopping)")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._push(_Job(fn, fut))
        return await fut

    def append(self, item: A) -> None:
        """Queue an append; the ingest layer's item carries its own future."""
        if self._stopping:
            raise BufferError_("buffer is closed (the agent is stopping)")
        self._push(item)

    def _push(self, job: _Job | A) -> None:
        self._jobs.append(job)
        self._idle.clear()
        self._wake.set()

    async def hop(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the thread now. Only for this task's handlers (and open/close)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._db)

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        try:
            await self._serve()
        except Exception as exc:
            # a bug: nothing more will run, so nothing may wait on it (close() then raises)
            self._stopping = True
            err = BufferError_(f"buffer writer crashed: {exc}; not committed")
            for job in self._in_hand:
                self._fail_one(job, err)
            self._fail_queued(err)
            self._idle.set()
            raise

    async def _serve(self) -> None:
        while True:
            if not self._jobs:
                self._idle.set()
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self._jobs.popleft()
            if isinstance(job, _Job):
                self._in_hand = [job]
                await self._run_job(job)
                continue
            group = [job]
            self._in_hand = cast("list[_Job | A]", group)
            events = self._size_of(job)
            while events < GROUP_EVENTS and self._jobs and not isinstance(self._jobs[0], _Job):
                item = self._jobs.popleft()
                assert not isinstance(item, _Job)
                group.append(item)
                events += self._size_of(item)
            try:
                await self._on_appends(group)
            except Exception as exc:  # a bug: do not leave sources hanging
                log.exception("buffer commit failed")
                for item in group:
                    self._fail(item, BufferError_(f"buffer commit failed: {exc}"))

    async def _run_job(self, job: _Job) -> None:
        # A job runs even when its caller was cancelled after queueing it: an ack queued by
        # a forwarder that a reload stops must still move the cursor (batches.ack).
        try:
            value, delta = await self.hop(job.fn)
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
            return
        if delta is not None:
            self._state.apply(delta)
        if not job.future.done():
            job.future.set_result(value)

    # ------------------------------------------------------------------ closing

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 (a budget, not a wait)
        """Run what is queued (up to ``timeout`` seconds), then stop.

        Whatever is still queued when the time is up is failed with a BufferError saying it
        was NOT committed (a source then does not acknowledge it upstream and gets it again);
        the job running in the thread at that moment is let finish, so its caller learns
        its true outcome. Then the WAL is checkpointed and the connection closed.
        """
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        left = list(self._jobs)
        self._jobs.clear()
        if left:
            log.error(
                "buffer close: %d queued operation(s) not run after %.0f s; failed", len(left),
                timeout,
            )  # fmt: skip
        for job in left:
            self._fail_one(
                job,
                BufferError_(
                    f"buffer closed before commit (stop timed out after {timeout:g} s): "
                    "not committed"
                ),
            )
        self._wake.set()
        try:
            await self._scope.close()  # the job in flight, if any, runs to its end
        finally:  # after a crash of the loop, too: the file is closed cleanly
            with contextlib.suppress(sqlite3.Error):
                await self.hop(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
            await self.hop(lambda db: db.close())
            self._executor.shutdown(wait=True)

    def _fail_queued(self, err: BufferError_) -> None:
        left = list(self._jobs)
        self._jobs.clear()
        for job in left:
            self._fail_one(job, err)

    def _fail_one(self, job: _Job | A, err: BufferError_) -> None:
        if isinstance(job, _Job):
            if not job.future.done():
                job.future.set_exception(err)
        else:
            self._fail(job, err)

"""TaskScope: the asyncio.TaskGroup of one long-lived component (the buffer's writer, a
sink's connection loop), entered by the component's start and exited by its stop.

Why not ``async with asyncio.TaskGroup()`` in place: the component's tasks live from
``start()`` to ``stop()`` (Buffer.open to Buffer.close, Sink.start to Sink.stop), two calls
the runtime's AsyncExitStack pairs, not one block. The scope keeps the TaskGroup's rules
all the same: no task outlives ``close()``, and a task that crashes is never silent. It is
logged at once with its traceback, the group cancels the task that opened the scope (in
the agent: ``Agent.run``, so the agent stops), and ``close()`` raises
:class:`TaskCrashed` naming the task, with the crash as its cause, so ``edge-agent run``
exits 1 with it. A component's expected trouble (a broker that is down, a refused
connection) is handled inside its loop; only a bug reaches the scope.

tests/agent/test_no_stray_tasks.py fails if a module of agent/ or adapters/ creates a
task any other way than in a TaskGroup or a TaskScope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

log = logging.getLogger("edge_agent.tasks")

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True, slots=True)
class Captured(Generic[T]):
    """What an awaitable gave: its value, or the exception it raised."""

    value: T | None = None
    error: Exception | None = None

    def get(self) -> T:
        """The value, or the exception raised again (unwrapped, its traceback kept)."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # T may itself admit None


async def captured(
    fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> Captured[T]:
    """Await ``fn(*args, **kwargs)`` and keep its outcome: a task of a TaskGroup that must
    not cancel its siblings and the body when it fails (an in-flight send, a publish
    racing a lost connection) runs this; the body decides what the exception means.
    Cancellation is not captured. ``fn`` is called here, not by the caller, so a task
    cancelled before it ran leaves no coroutine that was never awaited."""
    try:
        return Captured(value=await fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - handed to the body, not dropped
        return Captured(error=exc)


class TaskCrashed(Exception):
    """A component's background task ended with an exception (a bug); ``__cause__`` is it."""


class TaskScope:
    """The task group of one component, from ``open()`` to ``close()``.

    ``open()`` and ``close()`` are awaited by the component's own start and stop; ``close``
    may run in another task than ``open`` (the runtime stops sinks from tasks of its own),
    the group cancels the task that opened it when a task crashes.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._group: asyncio.TaskGroup | None = None
        self._closed = False
        self._exited = False

    @property
    def is_open(self) -> bool:
        return self._group is not None and not self._closed

    async def open(self) -> None:
        if self._group is not None:
            raise RuntimeError(f"{self.owner}: task scope opened twice")
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this scope."""
        if self._group is None or self._closed:
            coro.close()
            raise RuntimeError(f"{self.owner}: task scope is not open (start it first)")
        task = self._group.create_task(coro, name=name)
        task.add_done_callback(self._report)
        return task

    def _report(self, task: asyncio.Task[Any]) -> None:
        # now, not at close(): the owner may be waiting on this task's work
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: task %s crashed", self.owner, task.get_name(), exc_info=exc)

    async def close(self) -> None:
        """Wait for every task of the scope (the component cancels its own first).

        Raises TaskCrashed if one of them crashed. Idempotent."""
        group, self._closed = self._group, True
        if group is None or self._exited:
            return
        self._exited = True
        try:
            await group.__aexit__(None, None, None)
        except BaseExceptionGroup as eg:
            crashes = [e for e in eg.exceptions if isinstance(e, Exception)]
            if not crashes:
                raise
            first = crashes[0]
            raise TaskCrashed(
                f"{self.owner}: background task crashed: {type(first).__name__}: {first}"
            ) from first


__all__ = ["Captured", "TaskCrashed", "TaskScope", "captured"]

"""A crash of a background loop is never silent (agent/tasks.py TaskScope).

The buffer's writer loop and a sink's connection loop live in a TaskScope. When one
crashes (a bug), it is logged at once with its traceback, whatever waits on it is failed,
the task that started the component (in the agent: Agent.run) is cancelled, and the
component's stop raises TaskCrashed with the crash as its cause: `edge-agent run` exits 1
naming it. A sink's expected trouble (nothing listening) stays inside its loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.buffer import Buffer
from agent.cli import _cause, _report
from agent.config import parse_config
from agent.errors import BufferError_
from agent.interfaces import NewEvent, State
from agent.runtime import Agent
from agent.tasks import TaskCrashed, TaskScope
from tests.fixtures.common import free_port

pytestmark = pytest.mark.timeout(120)


def ev(i: int) -> NewEvent:
    data = {"work_order": "WO-1", "item": "P-1", "good": {"value": i, "uom": "EA"}}
    return NewEvent("mfg.production.counted", data, "2026-11-23T10:00:00.000Z", subject=f"s{i}")


async def until(cond: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_crashed_task_cancels_its_owner_and_close_raises_it(caplog: Any) -> None:
    scope = TaskScope("probe")
    opened = asyncio.Event()

    async def owner() -> None:  # like Agent.run: opens the scope, then waits
        await scope.open()
        opened.set()
        await asyncio.sleep(3600)

    async def crash() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("bug in the loop")

    async with asyncio.TaskGroup() as tg:
        owning = tg.create_task(owner())
        await opened.wait()
        scope.spawn(crash(), name="probe-loop")
        await until(owning.done)
    assert owning.cancelled()
    with pytest.raises(TaskCrashed, match="probe: background task crashed: RuntimeError") as err:
        await scope.close()
    assert isinstance(err.value.__cause__, RuntimeError)
    assert any("probe: task probe-loop crashed" in r.getMessage() for r in caplog.records)
    await scope.close()  # idempotent
    with pytest.raises(RuntimeError, match="not open"):
        coro = asyncio.sleep(0)
        scope.spawn(coro, name="late")


async def test_a_cancelled_task_is_not_a_crash() -> None:
    scope = TaskScope("probe")
    await scope.open()
    task = scope.spawn(asyncio.sleep(3600), name="sleeper")
    task.cancel()
    await scope.close()
    assert task.cancelled()


async def test_a_crash_of_the_buffer_writer_fails_the_append_and_close_raises_it(
    tmp_path: Path, caplog: Any
) -> None:
    holder: list[Buffer] = []
    opened = asyncio.Event()

    async def owner() -> None:
        holder.append(await Buffer.open(tmp_path / "b.db", plant="p", agent_id="a"))
        opened.set()
        await asyncio.sleep(3600)

    async with asyncio.TaskGroup() as tg:
        owning = tg.create_task(owner())
        await opened.wait()
        buf = holder[0]
        await buf.append("s", [ev(1)])

        def broken(item: Any) -> int:
            raise RuntimeError("size bug")

        buf._writer._size_of = broken  # type: ignore[union-attr]  # inject a bug in the loop
        with pytest.raises(BufferError_, match="buffer writer crashed: size bug; not committed"):
            async with asyncio.timeout(10):  # failed at once, never left waiting
                await buf.append("s", [ev(2)])
        await until(owning.done)
    assert owning.cancelled()  # the owner (Agent.run in the agent) is stopped
    assert any(
        "buffer writer: task buffer-writer crashed" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(TaskCrashed, match="size bug") as err:
        await buf.close()
    assert isinstance(err.value.__cause__, RuntimeError)
    # the file was closed cleanly all the same: what was committed is there
    again = await Buffer.open(tmp_path / "b.db", plant="p", agent_id="a")
    try:
        assert again.stream_state("s")[0] == 1
    finally:
        await again.close()


def _mqtt_config(tmp_path: Path) -> Any:
    return parse_config(
        {
            "agent": {"id": "test-agent", "plant": "test-plant"},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            "metrics": {"enabled": False},
            "sinks": {
                "central": {
                    "type": "mqtt",
                    "url": f"mqtt://127.0.0.1:{free_port()}",  # nothing listens there
                    "reconnect_min": 0.05,
                    "reconnect_max": 0.2,
                    "connect_timeout": 1,
                }
            },
        }
    )


async def test_a_crash_of_a_sink_loop_stops_the_agent_with_exit_1_and_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from adapters.sinks.mqtt.sink import MqttSink

    async def broken_open(self: MqttSink) -> Any:
        await asyncio.sleep(0.2)
        raise RuntimeError("bug while connecting")

    monkeypatch.setattr(MqttSink, "_open", broken_open)
    agent = Agent(_mqtt_config(tmp_path))
    with pytest.raises(BaseException) as raised:  # noqa: PT011 - inspected below
        async with asyncio.timeout(60):
            await agent.run()
    cause = _cause(raised.value)
    assert isinstance(cause, TaskCrashed), repr(raised.value)
    assert "sink central: background task crashed: RuntimeError: bug while connecting" in str(cause)
    assert isinstance(cause.__cause__, RuntimeError)
    with caplog.at_level(logging.ERROR):
        assert _report(cause, ["run"]) == 1  # what `edge-agent run` exits with
    assert any(
        "sink central: task sink-central-mqtt crashed" in r.getMessage() for r in caplog.records
    )


async def test_a_sink_that_cannot_connect_keeps_trying_and_stops_cleanly(tmp_path: Path) -> None:
    """Connection errors are the loop's business: no crash, a clean stop."""
    agent = Agent(_mqtt_config(tmp_path))
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(agent.run())
        await until(lambda: agent._gen is not None and agent.ready.is_set())
        assert agent._gen is not None
        sink = agent._gen.sinks["central"]
        await until(
            lambda: sink.state().state == State.DISCONNECTED and bool(sink.state().last_error)
        )
        await asyncio.sleep(0.5)  # several refused attempts
        assert not run.done()
        agent.request_stop()
    assert run.done() and run.exception() is None
    assert sink.state().state == State.STOPPED

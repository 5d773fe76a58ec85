"""The sd_notify protocol against a real AF_UNIX datagram socket, as systemd would create it.

The last tests run the real agent process (``edge-agent run -c FILE``) with a NOTIFY_SOCKET
and WATCHDOG_USEC and check that READY=1, STATUS=... and WATCHDOG=1 really arrive.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import SystemdNotifier, watchdog_interval
from tests.fixtures.sdnotify import (
    NotifySocket,
    _free_port,
    run_agent_with_notify,
    write_agent_config,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    ns = NotifySocket(str(path), str(path))
    yield ns
    ns.close()


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    ns = NotifySocket(b"\0" + name.encode(), "@" + name)
    yield ns
    ns.close()


def test_no_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = SystemdNotifier()
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_interval is None


async def test_watchdog_returns_at_once_without_watchdog(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = SystemdNotifier()
    await asyncio.wait_for(n.watchdog(), 1)
    assert notify_socket.drain() == []


def test_ready_status_stopping_reloading(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    n = SystemdNotifier()
    assert n.ready()
    assert n.status("forwarding\n3 streams")
    assert n.reloading()
    assert n.stopping()
    n.close()
    ready, status, reloading, stopping = notify_socket.drain()
    assert (ready, status, stopping) == ("READY=1", "STATUS=forwarding 3 streams", "STOPPING=1")
    first, second = reloading.split("\n")
    assert first == "RELOADING=1"
    usec = int(second.removeprefix("MONOTONIC_USEC="))
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000


def test_abstract_socket(abstract_notify_socket: NotifySocket) -> None:
    n = SystemdNotifier(abstract_notify_socket.env_value)
    assert n.ready()
    assert abstract_notify_socket.drain() == ["READY=1"]


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    n = SystemdNotifier(str(tmp_path / "nobody-listens"))
    assert n.enabled
    assert n.ready() is False  # logged once, never raised


def test_watchdog_interval_from_env() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": pid}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_while_loop_is_healthy(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    n = SystemdNotifier()
    task = asyncio.create_task(n.watchdog())
    try:
        await asyncio.sleep(0.4)  # ~8 pings; a loaded CI machine may manage fewer
        healthy = len(notify_socket.drain())
        assert healthy >= 3, notify_socket.messages
        assert set(notify_socket.messages) == {"WATCHDOG=1"}
        # A wedged loop (blocking call) must starve the watchdog: no pings while blocked.
        before = len(notify_socket.drain())
        time.sleep(0.3)  # noqa: ASYNC251 - deliberately blocking the loop
        during = len(notify_socket.drain()) - before
        assert during == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_long_start_up_step_keeps_extending_the_timeout_until_done(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large buffer file is checked before start, which may outlast TimeoutStartSec:
    while the step runs, STATUS says so and EXTEND_TIMEOUT_USEC keeps coming; after it,
    nothing more is asked (the timeout that applies is systemd's own again)."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    n = SystemdNotifier()
    async with n.extending("opening the buffer /x (12 MB): checking the file", every=0.05, by=7):
        await asyncio.sleep(0.4)
    during = list(notify_socket.drain())
    assert during[0] == "STATUS=opening the buffer /x (12 MB): checking the file"
    asks = [m for m in during if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert len(asks) >= 3, during
    assert set(asks) == {"EXTEND_TIMEOUT_USEC=7000000"}
    await asyncio.sleep(0.2)
    assert len(notify_socket.drain()) == len(during)


async def test_extending_does_nothing_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    before = {t.get_name() for t in asyncio.all_tasks()}
    async with n.extending("opening", every=0.01):
        assert {t.get_name() for t in asyncio.all_tasks()} == before  # no task made
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- real agent


def _agent_command() -> list[str]:
    exe = Path(sys.executable).with_name("edge-agent")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("edge-agent")
    if found:
        return [found]
    raise AssertionError(
        "edge-agent console script not found: run `.venv/bin/pip install -e .` in the checkout"
    )


def test_real_agent_sends_ready_status_and_watchdog(
    notify_socket: NotifySocket, tmp_path: Path
) -> None:
    cfg = write_agent_config(tmp_path, _free_port(), _free_port())
    run_agent_with_notify(_agent_command(), cfg, notify_socket, tmp_path, watchdog_usec=1_000_000)

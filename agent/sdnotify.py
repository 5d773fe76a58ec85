"""systemd notification protocol (``sd_notify``) in pure Python.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit started, shows
``STATUS=...`` in ``systemctl status``, and with ``WatchdogSec=`` kills and restarts the
service when ``WATCHDOG=1`` stops arriving. The protocol is one datagram per message on the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace),
so no libsystemd binding is needed.

Outside systemd (no ``NOTIFY_SOCKET``) every method is a no-op, so the runtime calls them
unconditionally.

The watchdog is fed by a coroutine *on the agent's event loop*, not by a thread: a thread
would keep patting the dog while the loop is wedged (a blocking call, a busy loop, a
deadlock), which is exactly the failure the watchdog exists to catch. If the loop stops
turning, the pings stop and systemd restarts the agent after ``WatchdogSec``.

Start-up that may outlast ``TimeoutStartSec`` (opening a large buffer file checks it
first: about 4 s per GB from a cold cache here, minutes for a big backlog on a slow disk,
just when the machine comes back from a power cut) runs inside ``extending(...)``: it
says what it is doing in STATUS and sends ``EXTEND_TIMEOUT_USEC`` from the event loop
while it lasts, so systemd waits instead of killing the agent mid-check and restarting it
into the same check until StartLimitBurst gives up on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator

log = logging.getLogger("edge_agent.sdnotify")

__all__ = ["SystemdNotifier", "watchdog_interval"]

#: while a long start-up step runs: ask for this much more time, this often
EXTEND_BY = 30.0
EXTEND_EVERY = 10.0


def watchdog_interval(env: dict[str, str] | os._Environ[str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None if not configured.

    ``WATCHDOG_PID``, when set, must name this process: systemd sets it so that a child that
    inherited the environment does not feed the parent's watchdog.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() not in _own_pids():
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


def _own_pids() -> set[str]:
    """PIDs that count as "this service's main process".

    A PyInstaller one-file binary runs as two processes: a bootloader (the PID systemd
    started, hence ``WATCHDOG_PID`` and ``MAINPID``) that unpacks the program and runs
    Python in a child. The child is the agent, so its parent's PID counts as its own; the
    unit file sets ``NotifyAccess=all`` so systemd accepts the child's messages.
    """
    pids = {str(os.getpid())}
    if getattr(sys, "frozen", False):
        pids.add(str(os.getppid()))
    return pids


class SystemdNotifier:
    """Sends sd_notify messages; silently does nothing when not started by systemd.

    Sending never raises: a notification that cannot be delivered is logged once at
    warning level and the agent keeps running (systemd will act on the missing READY or
    WATCHDOG itself, which is the right outcome).
    """

    def __init__(self, socket_path: str | None = None) -> None:
        path = os.environ.get("NOTIFY_SOCKET") if socket_path is None else socket_path
        self._address: str | bytes | None = None
        if path:
            # '@name' is the abstract namespace: the kernel address starts with a NUL byte.
            self._address = b"\0" + path[1:].encode() if path.startswith("@") else path
        self._sock: socket.socket | None = None
        self._warned = False
        self._interval = watchdog_interval()

    @property
    def enabled(self) -> bool:
        """True when a NOTIFY_SOCKET is configured."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings, or None when no watchdog is configured."""
        return self._interval if self.enabled else None

    def notify(self, message: str) -> bool:
        """Send one raw message (``KEY=value`` lines). Returns whether it was sent."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify systemd on NOTIFY_SOCKET: %s (is the unit Type=notify with "
                    "NotifyAccess=main?)",
                    exc,
                )
            return False
        return True

    def ready(self) -> bool:
        """The agent is up: buffer open, sinks and sources started."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status`` (newlines are flattened)."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """Shutdown has begun (systemd stops expecting watchdog pings)."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """A config reload has begun; call ``ready()`` again when it is done.

        MONOTONIC_USEC lets systemd >= 253 match the reload to its request.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start-up (or stop) timeout; systemd
        only ever moves the deadline later, and needs the next ask within ``seconds``."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    @contextlib.asynccontextmanager
    async def extending(
        self, status: str, every: float = EXTEND_EVERY, by: float = EXTEND_BY
    ) -> AsyncIterator[None]:
        """Around a start-up step that may take long: STATUS ``status``, and a timeout
        extension every ``every`` seconds until the step is done. Sent by a timer on the
        loop (no task to own: each ask schedules the next), so a wedged loop stops asking
        and systemd's timeout applies again ``by`` seconds later."""
        if not self.enabled:
            yield
            return
        self.status(status)
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def ask() -> None:
            nonlocal handle
            self.extend_timeout(by)
            handle = loop.call_later(every, ask)

        ask()
        try:
            yield
        finally:
            if handle is not None:
                handle.cancel()

    def ping(self) -> bool:
        """One watchdog keep-alive."""
        return self.notify("WATCHDOG=1")

    async def watchdog(self) -> None:
        """Feed the watchdog every ``WATCHDOG_USEC / 2`` until cancelled.

        Runs on the event loop on purpose: pings arrive only while the loop is healthy.
        Returns at once when no watchdog (or no NOTIFY_SOCKET) is configured.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        log.debug("feeding the systemd watchdog every %.3fs", interval)
        while True:
            self.ping()
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Close the socket (idempotent); later sends reopen it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

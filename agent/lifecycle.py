"""The stop budget: one number of seconds for SIGTERM to exit, shared out by phase.

systemd kills the agent ``TimeoutStopSec`` after SIGTERM (systemd/edge-agent.service:
30 s). A kill -9 loses nothing acknowledged, but it skips the clean parts of a stop (the
MQTT sink's retained "offline", the WAL checkpoint) and is logged as a failure. So every
phase of a stop has a share of one budget, the shares add up to STOP_BUDGET, and
STOP_BUDGET plus STOP_MARGIN fits inside TimeoutStopSec (tests/agent/test_stop_budget.py
checks the unit file against this table).

Every component's own stop timeout lies inside its phase's share (the share is also the
hard bound: what has not stopped when it is spent is cancelled again and named in the log):

    sources     6 s  MES HTTP lets requests in flight finish (mes_http.shutdown_timeout,
                     5 s at most) so what it committed is also answered; OPC UA closes
                     its session (2 s grace); Sparkplug publishes STATE offline (3 s)
                     and disconnects; the MQTT source disconnects
    forwarders  1 s  cancelled: a batch on the wire is abandoned; it stays in the buffer
                     and is resent with the same batch id at the next start
    sinks       4 s  all at once: MQTT publishes its retained "offline" (2 s) and
                     disconnects (2 s); NATS closes (2 s); HTTPS closes its pool
    service     1 s  heartbeat, housekeeping, checkpoint, watchdog loops; the metrics
                     server (a scrape in progress gets its share); the last heartbeat
    buffer     10 s  appends still queued are committed (Buffer.close waits 10 s at most),
                     then a WAL checkpoint and close
    -----------------
    budget     22 s  + margin 8 s = TimeoutStopSec 30 s
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("edge_agent.runtime")


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    seconds: float


#: in the order a stop runs them: the reverse of the start order
STOP_PHASES: tuple[Phase, ...] = (
    Phase("sources", 6.0),
    Phase("forwarders", 1.0),
    Phase("sinks", 4.0),
    Phase("service", 1.0),
    Phase("buffer", 10.0),
)
STOP_BUDGET: float = sum(p.seconds for p in STOP_PHASES)
#: what is left of TimeoutStopSec for the interpreter's exit and a loaded machine
STOP_MARGIN: float = 8.0
#: TimeoutStopSec of systemd/edge-agent.service
SYSTEMD_TIMEOUT_STOP: float = 30.0

_SHARES = {p.name: p.seconds for p in STOP_PHASES}


def share(phase: str) -> float:
    """Seconds the named phase may take."""
    return _SHARES[phase]


def deadline(phase: str) -> float:
    """The event-loop time by which ``phase`` must be done, if it starts now: several
    steps of one phase (the service phase: loops, metrics server, last heartbeat) share
    one deadline, so together they take the share, not one share each."""
    return asyncio.get_running_loop().time() + share(phase)


async def stop_tasks(
    phase: str, tasks: Iterable[asyncio.Task[object]], until: float | None = None
) -> bool:
    """Cancel ``tasks`` and wait for them within ``phase``'s share (or until ``until``,
    a :func:`deadline`).

    The tasks belong to a TaskGroup: its exit waits for them in any case. A task still
    running when the share is spent is named in the log and cancelled again (a task
    cancelled while inside a ``finally`` that awaits gets a second cancellation there).
    True when every task ended within the share.
    """
    pending = {t for t in tasks if not t.done()}
    if not pending:
        return True
    started = time.monotonic()
    for t in pending:
        t.cancel()
    budget = share(phase)
    if until is not None:
        budget = max(0.0, until - asyncio.get_running_loop().time())
    _, late = await asyncio.wait(pending, timeout=budget)
    if not late:
        log.debug("stop: %s stopped in %.2f s", phase, time.monotonic() - started)
        return True
    log.warning(
        "stop: %s not stopped within its %.0f s share: %s; cancelling again",
        phase,
        share(phase),
        ", ".join(sorted(t.get_name() for t in late)),
    )
    for t in late:
        t.cancel()
    return False


__all__ = [
    "STOP_BUDGET",
    "STOP_MARGIN",
    "STOP_PHASES",
    "SYSTEMD_TIMEOUT_STOP",
    "Phase",
    "deadline",
    "share",
    "stop_tasks",
]

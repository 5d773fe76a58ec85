"""The two seams of the agent: a Source feeds the buffer, a Sink drains it.

Read this file top to bottom before writing an adapter.

    sources ──append()──▶ Buffer (SQLite, durable) ──Batch──▶ Forwarder ──send()──▶ Sink
       ▲                        │                                 │
       └── ack upstream only ◀──┘ commit done                      └── advance cursor only on ACCEPTED

Rules every adapter follows:

* A Source does no I/O in its constructor. ``run(ingest)`` works until it is cancelled and
  acknowledges upstream (HTTP 2xx, MQTT PUBACK, file moved to processed/) only after
  ``await ingest.append(...)`` has returned: that is the moment the events are on disk.
* A Sink sends one batch and answers with a SendResult. It never decides what happens next
  (retry, bisection, dead-letter): the forwarder does, so every sink behaves the same.
* Never swallow ``asyncio.CancelledError``. Callbacks from library threads (paho, asyncua)
  come back to the loop through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import asyncio

    from agent.buffer.operator import DeadLetter
    from agent.buffer.stats import StreamStats


class NewEvent(NamedTuple):
    """An event as a source hands it over, before the buffer gives it an id and a sequence.

    ``time`` is when it happened at the source (RFC 3339 string or an aware datetime), not
    when it was received. ``data`` must already be valid for ``type`` (sources validate).
    ``source_event_id`` is the upstream's own id (an MES event id), kept for de-duplication
    by the source; it is not part of the envelope.

    Immutable, as a NamedTuple rather than a frozen dataclass for the same reason as
    Committed: one is made per event on the ingest hot path, and the frozen dataclass's
    __init__ (object.__setattr__ per field) cost 3.8 us against 1.3 us (measured with
    timeit, 4 keyword arguments, on the loaded machine of 2026-12-02).
    """

    type: str
    data: Mapping[str, Any]
    time: str | datetime
    subject: str | None = None
    correlationid: str | None = None
    dataschema: str | None = None
    source_event_id: str | None = None


class Committed(NamedTuple):
    """What the buffer says back once an event is durably stored.

    A NamedTuple, not a frozen dataclass: one is made per event on the ingest hot path,
    and a frozen dataclass's __init__ costs several times more.
    """

    stream: str
    sequence: int
    id: str
    #: True when ``source_event_id`` was already committed within the dedupe window: nothing
    #: new was stored and sequence/id are those of the first commit.
    duplicate: bool = False


class Ingest(Protocol):
    """The buffer as sources see it."""

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        marks: Sequence[tuple[str, str]] = (),
    ) -> list[Committed]:
        """Commit ``events`` to ``stream`` in order, durably, and only then return.

        Events with a ``source_event_id`` already committed to this stream within the
        dedupe window are not stored again (``Committed.duplicate``). ``marks`` are
        (namespace, key) pairs stored in the same transaction, so a source can remember
        what it imported (a file's content hash) atomically with the events themselves:
        ``await ingest.has_mark(namespace, key)`` after a crash tells whether it is done.

        Many concurrent callers share one transaction (group commit). Raises
        ``agent.errors.BufferFull`` when the buffer is at ``max_bytes`` under
        ``on_full = "block"``: the source should hold back its upstream (HTTP 503 with
        Retry-After, no PUBACK, leave the file) and try again later.
        """
        ...

    async def has_mark(self, namespace: str, key: str) -> bool:
        """Whether a mark was committed by an earlier append (see ``marks``)."""
        ...

    def has_room(self) -> bool:
        """False while appends would raise BufferFull (``on_full = "block"``)."""
        ...


@dataclass(frozen=True, slots=True)
class Batch:
    """Contiguous events of one stream, in sequence order, under one persisted batch id.

    ``bodies`` are the CloudEvents JSON objects exactly as encoded at commit time, so a
    sink joins bytes instead of re-encoding.
    """

    stream: str
    batch_id: str
    epoch: str
    first_sequence: int
    last_sequence: int
    ids: Sequence[str]
    bodies: Sequence[bytes]
    priority: str = "normal"

    def __len__(self) -> int:
        return len(self.bodies)

    @property
    def payload(self) -> bytes:
        """The batch as the contract's JSON array: one copy of the bodies (the brackets go
        onto the first and last body, not around the joined whole, which copied the ~470
        KB of a full batch twice)."""
        bodies = self.bodies
        if not bodies:
            return b"[]"
        if len(bodies) == 1:
            return b"[" + bodies[0] + b"]"
        parts = list(bodies)
        parts[0] = b"[" + parts[0]
        parts[-1] = parts[-1] + b"]"
        return b",".join(parts)


class BatchStore(Protocol):
    """The buffer as the forwarder sees it: its whole view (agent/forwarder.py uses
    nothing else). agent.buffer.Buffer implements it."""

    @property
    def epoch(self) -> str:
        """The stream epoch of this buffer file (batches carry it)."""
        ...

    @property
    def max_bytes(self) -> int:
        """buffer.max_bytes: the forwarder keeps its batches on the wire well below it."""
        ...

    def wakeup_event(self, stream: str) -> asyncio.Event:
        """Set whenever events are committed to ``stream``."""
        ...

    def stream_state(self, stream: str) -> tuple[int, int]:
        """(last committed sequence, forwarded cursor) as this process knows them."""
        ...

    async def pending_batches(self, stream: str) -> list[Batch]:
        """Batches persisted but not acknowledged (after a crash), to resend as they are."""
        ...

    async def take_batch(
        self, stream: str, after_seq: int, max_events: int, max_bytes: int, priority: str = ...
    ) -> Batch | None:
        """The next contiguous run after ``after_seq`` (or the cursor) under a new batch id
        made durable before it is returned, or None when there is nothing to send."""
        ...

    async def take_batches(
        self,
        stream: str,
        after_seq: int,
        max_events: int,
        max_bytes: int,
        count: int,
        priority: str = ...,
    ) -> list[Batch]:
        """Up to ``count`` next runs, in order, all persisted (one fsync) before they are
        returned; empty when there is nothing to send."""
        ...

    async def split_batch(self, batch: Batch) -> tuple[Batch, Batch]:
        """Replace ``batch`` by its two halves (new ids), atomically."""
        ...

    async def discard_batch(self, batch: Batch) -> None:
        """Forget a persisted batch without advancing the cursor."""
        ...

    async def ack(self, batch: Batch) -> None:
        """Advance the cursor past ``batch``; idempotent, complete even if cancelled."""
        ...

    async def ack_many(self, accepted: list[Batch]) -> None:
        """ack() for consecutive accepted batches of one stream, in one transaction."""
        ...

    async def dead_letter(self, batch: Batch, reason: str, status: int | None) -> None:
        """Move the one event of ``batch`` to the dead letters; the cursor passes it."""
        ...

    async def set_last_error(self, stream: str, error: str | None) -> None: ...

    async def retry_requested(self, stream: str) -> list[DeadLetter]:
        """Dead letters an operator asked to send again."""
        ...

    async def resolve_dead_letter(
        self, stream: str, seq: int, *, delivered: bool, reason: str = ...
    ) -> None: ...

    async def pending_replays(self, stream: str) -> list[tuple[int, int, int]]:
        """Operator-requested replays: (replay_id, from_seq, to_seq)."""
        ...

    async def read_range(
        self, stream: str, after_seq: int, to_seq: int, max_events: int
    ) -> list[tuple[int, str, bytes]]:
        """Kept events ``after_seq < seq <= to_seq`` as (seq, id, body), for replays."""
        ...

    async def finish_replay(self, replay_id: int, progressed_to: int | None = None) -> None: ...

    async def stream_stats(self) -> list[StreamStats]:
        """Every stream's counters (backlog, oldest unsent), for outage summaries."""
        ...


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # every event durably accepted: advance
    RETRY = "retry"  # transient (5xx, 408, 425, 429, network, broker gone): same batch again
    REJECTED = "rejected"  # 400/422: some event is unacceptable: bisect, dead-letter
    TOO_LARGE = "too_large"  # 413 or over the broker's packet size: smaller batches
    AUTH = "auth"  # 401/403, bad credentials, not authorised: keep everything, retry slowly


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    reason: str = ""
    status: int | None = None
    retry_after: float | None = None

    @classmethod
    def accepted(cls, status: int | None = None) -> SendResult:
        return cls(Outcome.ACCEPTED, "", status)

    @classmethod
    def retry(
        cls, reason: str, status: int | None = None, retry_after: float | None = None
    ) -> SendResult:
        return cls(Outcome.RETRY, reason, status, retry_after)

    @classmethod
    def rejected(cls, reason: str, status: int | None = None) -> SendResult:
        return cls(Outcome.REJECTED, reason, status)

    @classmethod
    def too_large(cls, reason: str, status: int | None = None) -> SendResult:
        return cls(Outcome.TOO_LARGE, reason, status)

    @classmethod
    def auth(cls, reason: str, status: int | None = None) -> SendResult:
        return cls(Outcome.AUTH, reason, status)


class State(enum.StrEnum):
    """Every state a source, a sink or a stream's forwarder can be in: one vocabulary.

    str-valued, so the heartbeat, ``status --json`` and the metrics' ``state`` labels keep
    their strings ("connected", not "State.CONNECTED"). Which ones a component uses:

    ============ ================================================== ======
    state        used by                                            up
    ============ ================================================== ======
    starting     sources, sinks (not yet connected, not yet failed) no
    connected    sources, sinks                                     yes
    listening    server sources that wait for peers                 yes
    finished     sources whose work is done (a bounded run)         yes
    idle         forwarders (nothing to send)                       yes
    sending      forwarders (a batch on the wire)                   yes
    retrying     forwarders (the sink said retry, backing off)      no
    disconnected sources, sinks                                     no
    auth_failed  all (the peer refuses our credentials)             no
    error        all                                                no
    stopped      all (the agent stopped it, or is not running)      no
    ============ ================================================== ======
    """

    STARTING = "starting"
    CONNECTED = "connected"
    LISTENING = "listening"
    FINISHED = "finished"
    IDLE = "idle"
    SENDING = "sending"
    RETRYING = "retrying"
    DISCONNECTED = "disconnected"
    AUTH_FAILED = "auth_failed"
    ERROR = "error"
    STOPPED = "stopped"

    @property
    def up(self) -> bool:
        return self.value in UP_STATES


#: The one rule for "up" (metrics' *_connected / forwarder_up, /readyz, the status view's
#: green): a component is up when it does, or has done, its job. A string so a state
#: written by a newer agent (unknown here) is simply not up.
UP_STATES: frozenset[str] = frozenset({"connected", "listening", "finished", "idle", "sending"})


def is_up(state: str | None) -> bool:
    """The one "up" rule, for a state read back as a string (heartbeat, snapshot)."""
    return state in UP_STATES


@dataclass(slots=True)
class ComponentState:
    """What status, metrics and /readyz show for a source, a sink or a forwarder.

    Change it only through :meth:`change` (and :meth:`note_error` / :meth:`clear_error`):
    one rule for ``last_error`` everywhere. An error given replaces it; a move into an
    up state clears it (the trouble is over); any other move keeps it, so "disconnected"
    still says why.
    """

    state: State = State.STARTING
    since: float = 0.0  # unix time of the last state change
    last_error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state = State(self.state)

    @property
    def healthy(self) -> bool:
        return self.state.up

    def change(self, state: State | str, error: str | None = None) -> None:
        """Move to ``state`` (``since`` moves only when it changes)."""
        new = State(state)
        if new is not self.state:
            self.state = new
            self.since = time.time()
            if new.up:
                self.last_error = None
        if error is not None:
            self.last_error = error

    def note_error(self, error: str) -> None:
        """An error that does not change the state (one event refused, one bad request)."""
        self.last_error = error

    def clear_error(self) -> None:
        """The trouble behind ``last_error`` is over while the state stayed up."""
        self.last_error = None


class Sink(abc.ABC):
    """Delivers batches to the central side. One instance may serve many streams."""

    name: str
    #: How many batches of one stream may be on the wire at once. The forwarder applies
    #: acknowledgements in order only; 1 unless the transport keeps order (one MQTT session).
    max_in_flight: int = 1

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections. Must not fail because the peer is down: send() reports that."""

    #: How many batches the forwarder may take and ``prepare`` ahead of the ones on the
    #: wire. A sink whose send has work to do before the first byte leaves (the HTTPS
    #: sink's gzip) sets it to 1: the next batch is read and made ready while the current
    #: one is on the wire, and leaves as soon as it is accepted. Order is unchanged: a
    #: batch is sent only when fewer than max_in_flight batches before it are unsettled.
    read_ahead: int = 0

    async def prepare(self, batch: Batch) -> None:  # noqa: B027 - optional hook
        """Make ``batch`` ready to send (encode, compress) before its turn, off the event
        loop where it can be. Never raise for peer or network trouble; ``send`` may be
        called for a batch that was never prepared, and a prepared one may be dropped."""

    @abc.abstractmethod
    async def send(self, batch: Batch) -> SendResult:
        """Deliver one batch; return how it went. Never raise for peer or network trouble."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Close connections; idempotent."""

    @abc.abstractmethod
    def state(self) -> ComponentState: ...


class Source(abc.ABC):
    """Produces events into one stream (or a few). Cancelled to stop."""

    name: str
    stream: str

    @abc.abstractmethod
    async def run(self, ingest: Ingest) -> None:
        """Work until cancelled. Acknowledge upstream only after ingest.append() returned."""

    @abc.abstractmethod
    def state(self) -> ComponentState: ...

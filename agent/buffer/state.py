"""The buffer's in-memory state, and the deltas that change it.

Database functions run in the writer's thread (agent/buffer/writer.py). They may READ
this state (the writer runs one function at a time, and the event loop applies a delta
only between two of them), but they never change it: each returns a ``Delta``, and the
writer applies it on the event loop before the next function starts and before the
caller's future resolves. A rolled-back transaction simply drops its delta, so there is
nothing to reload.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Settings:
    """What the buffer was opened with; the same for its whole life."""

    path: Path
    plant: str
    agent_id: str
    durability: str
    max_bytes: int
    on_full: str
    keep_forwarded: float
    dedupe_window: float


@dataclass(slots=True)
class StreamState:
    sid: int
    name: str
    last_seq: int
    forwarded_seq: int
    checkpoint_seq: int
    stored_bytes: int
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Delta:
    """What one transaction changed in memory, once it has committed."""

    #: streams created by this transaction: name -> sid
    new_streams: dict[str, int] = field(default_factory=dict)
    #: name -> (last_seq, checkpoint_seq) after the transaction
    seqs: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: name -> change of stored bytes (events + dead letters)
    stored: dict[str, int] = field(default_factory=dict)
    #: name -> forwarded cursor (only ever moves forward)
    forwarded: dict[str, int] = field(default_factory=dict)
    #: change of the bytes acknowledged but not yet deleted
    acked_unreclaimed: int = 0
    #: None: unchanged; else the new value of "an append was refused"
    refusing: bool | None = None
    #: name -> events refused (BufferFull)
    refused: dict[str, int] = field(default_factory=dict)
    #: name -> stored bytes as the file says (an operator changed them from outside)
    reload_stored: dict[str, int] | None = None
    #: the operator generation seen in meta when ``reload_stored`` was read
    operator_generation: str | None = None
    #: a transaction that committed events (the ``commits`` counter)
    committed_events: bool = False

    @property
    def used(self) -> int:
        return sum(self.stored.values())

    def store(self, name: str, nbytes: int) -> None:
        self.stored[name] = self.stored.get(name, 0) + nbytes

    def refuse(self, name: str, events: int) -> None:
        self.refusing = True
        self.refused[name] = self.refused.get(name, 0) + events


@dataclass(slots=True)
class BufferState:
    """Everything the running agent keeps in memory about its buffer file."""

    epoch: str = ""
    streams: dict[str, StreamState] = field(default_factory=dict)
    used: int = 0  # bytes of event bodies stored (events + dead letters)
    acked_unreclaimed: int = 0  # forwarded but not yet deleted
    refusing: bool = False  # an append was refused; cleared when room is freed
    refused_total: int = 0
    refused_by_stream: dict[str, int] = field(default_factory=dict)
    commits: int = 0
    operator_generation: str = ""

    def by_sid(self, sid: int) -> StreamState:
        return next(s for s in self.streams.values() if s.sid == sid)

    def apply(self, delta: Delta) -> None:
        """Publish a committed transaction. Event loop only (see the module docstring)."""
        for name, sid in delta.new_streams.items():
            self.streams[name] = StreamState(sid, name, 0, 0, 0, 0)
        for name, (last, ckpt) in delta.seqs.items():
            s = self.streams[name]
            s.last_seq, s.checkpoint_seq = last, ckpt
        for name, change in delta.stored.items():
            self.streams[name].stored_bytes += change
        for name, cursor in delta.forwarded.items():
            s = self.streams[name]
            s.forwarded_seq = max(s.forwarded_seq, cursor)
        self.acked_unreclaimed = max(0, self.acked_unreclaimed + delta.acked_unreclaimed)
        if delta.reload_stored is not None:
            before = self.used
            for name, stored in delta.reload_stored.items():
                if name in self.streams:
                    self.streams[name].stored_bytes = stored
            if sum(s.stored_bytes for s in self.streams.values()) < before:
                self.refusing = False  # the operator freed room
        if delta.operator_generation is not None:
            self.operator_generation = delta.operator_generation
        self.used = sum(s.stored_bytes for s in self.streams.values())
        if delta.refusing is not None:
            self.refusing = delta.refusing
        for name, n in delta.refused.items():
            self.refused_total += n
            self.refused_by_stream[name] = self.refused_by_stream.get(name, 0) + n
        if delta.committed_events:
            self.commits += 1

    def room(self, settings: Settings, delta: Delta) -> int:
        """Bytes an append may still add, counting what ``delta`` already changed."""
        return (
            settings.max_bytes
            - (self.used + delta.used)
            + (self.acked_unreclaimed + delta.acked_unreclaimed)
        )


#: an events row as inserted: (sid, seq, id, committed_at, size, body, ctl)
EventRow = tuple[int, int, str, float, int, bytes, int]


@dataclass(slots=True)
class Staged:
    """A stream's sequences inside a transaction; published via Delta.seqs after COMMIT."""

    sid: int
    last_seq: int
    checkpoint_seq: int

"""The status snapshot as types: what `status`, `status --check`, /metrics and /readyz read.

:func:`agent.status.build_snapshot` makes a :class:`StatusSnapshot`; ``to_dict()`` is
exactly the schema-1 JSON of ``status --json`` (documented in agent/status.py), and
``from_dict()`` reads one back (a snapshot another version wrote, a test's literal), taking
a missing key as "not known" rather than failing: an operator's status must still print.

States stay strings here, not :class:`agent.interfaces.State`: a heartbeat written by a
newer agent may carry a state this version does not know, and it must be shown, not
dropped. The "up" rule is :func:`agent.interfaces.is_up`, the same for every reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.interfaces import State, is_up

SCHEMA = 1

#: a Unix time, or (in snapshots written by hand or by other tools) an RFC 3339 string
Timestamp = float | str | None


def _int(v: Any, default: int = 0) -> int:
    return default if v is None else int(v)


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True, slots=True)
class AgentInfo:
    id: str = ""
    plant: str = ""
    version: str = ""
    running: bool = False
    pid: int | None = None
    started_at: Timestamp = None
    heartbeat_age_s: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AgentInfo:
        return cls(
            id=str(d.get("id") or ""),
            plant=str(d.get("plant") or ""),
            version=str(d.get("version") or ""),
            running=bool(d.get("running")),
            pid=d.get("pid"),
            started_at=d.get("started_at"),
            heartbeat_age_s=_float(d.get("heartbeat_age_s")),
        )


@dataclass(frozen=True, slots=True)
class BufferInfo:
    path: str = ""
    file_bytes: int = 0
    used_bytes: int = 0
    max_bytes: int = 0
    on_full: str = ""
    durability: str = ""
    epoch: str | None = None
    ingest_rate_eps: float = 0.0
    full_in_s: float | None = None
    refused_total: int = 0
    last_write_error: str | None = None
    #: False while appends are refused (full under on_full = block, disk full); None when
    #: the agent is not running
    accepting: bool | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BufferInfo:
        return cls(
            path=str(d.get("path") or ""),
            file_bytes=_int(d.get("file_bytes")),
            used_bytes=_int(d.get("used_bytes")),
            max_bytes=_int(d.get("max_bytes")),
            on_full=str(d.get("on_full") or ""),
            durability=str(d.get("durability") or ""),
            epoch=d.get("epoch"),
            ingest_rate_eps=float(d.get("ingest_rate_eps") or 0.0),
            full_in_s=_float(d.get("full_in_s")),
            refused_total=_int(d.get("refused_total")),
            last_write_error=d.get("last_write_error"),
            accepting=d.get("accepting"),
        )


@dataclass(frozen=True, slots=True)
class StreamStatus:
    stream: str
    sink: str = ""
    priority: str = "normal"
    last_sequence: int = 0
    forwarded_sequence: int = 0
    backlog_events: int = 0
    backlog_bytes: int = 0
    oldest_unsent_age_s: float | None = None
    last_forwarded_at: Timestamp = None
    last_error: str | None = None
    #: the forwarder's state; "stopped" while the agent is not running, None when the
    #: running agent has no forwarder for it yet
    state: str | None = None
    dead_letters: int = 0
    ingested_total: int = 0
    forwarded_total: int = 0
    dropped_total: int = 0
    dead_lettered_total: int = 0
    refused_total: int = 0

    @property
    def up(self) -> bool:
        return is_up(self.state)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StreamStatus:
        return cls(
            stream=str(d.get("stream") or ""),
            sink=str(d.get("sink") or ""),
            priority=str(d.get("priority") or "normal"),
            last_sequence=_int(d.get("last_sequence")),
            forwarded_sequence=_int(d.get("forwarded_sequence")),
            backlog_events=_int(d.get("backlog_events")),
            backlog_bytes=_int(d.get("backlog_bytes")),
            oldest_unsent_age_s=_float(d.get("oldest_unsent_age_s")),
            last_forwarded_at=d.get("last_forwarded_at"),
            last_error=d.get("last_error"),
            state=d.get("state"),
            dead_letters=_int(d.get("dead_letters")),
            ingested_total=_int(d.get("ingested_total")),
            forwarded_total=_int(d.get("forwarded_total")),
            dropped_total=_int(d.get("dropped_total")),
            dead_lettered_total=_int(d.get("dead_lettered_total")),
            refused_total=_int(d.get("refused_total")),
        )


@dataclass(frozen=True, slots=True)
class SinkStatus:
    name: str
    type: str = ""
    state: str = State.STARTING.value
    since: Timestamp = None
    last_error: str | None = None

    @property
    def up(self) -> bool:
        return is_up(self.state)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SinkStatus:
        return cls(
            name=str(d.get("name") or ""),
            type=str(d.get("type") or ""),
            state=str(d.get("state") or ""),
            since=d.get("since"),
            last_error=d.get("last_error"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class SourceStatus:
    name: str
    type: str = ""
    stream: str = ""
    state: str = State.STARTING.value
    since: Timestamp = None
    last_error: str | None = None
    #: adapter-specific figures (items monitored, accepted, rejected by reason, ...)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return is_up(self.state)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceStatus:
        detail = d.get("detail")
        return cls(
            name=str(d.get("name") or ""),
            type=str(d.get("type") or ""),
            stream=str(d.get("stream") or ""),
            state=str(d.get("state") or ""),
            since=d.get("since"),
            last_error=d.get("last_error"),
            detail=dict(detail) if isinstance(detail, Mapping) else {},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Readiness:
    """What /readyz answers: ready when every sink is up or still starting (a sink that
    has not failed yet does not make a fresh agent unready) and every source is up."""

    ready: bool
    sinks: dict[str, str]
    sources: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "sources": self.sources}


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    agent: AgentInfo = field(default_factory=AgentInfo)
    buffer: BufferInfo = field(default_factory=BufferInfo)
    streams: tuple[StreamStatus, ...] = ()
    sinks: tuple[SinkStatus, ...] = ()
    sources: tuple[SourceStatus, ...] = ()
    schema: int = SCHEMA

    def readiness(self) -> Readiness:
        sinks = {s.name: s.state for s in self.sinks}
        sources = {s.name: s.state for s in self.sources}
        ok = all(is_up(v) or v == State.STARTING for v in sinks.values()) and all(
            is_up(v) for v in sources.values()
        )
        return Readiness(ok, sinks, sources)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StatusSnapshot:
        return cls(
            agent=AgentInfo.from_dict(d.get("agent") or {}),
            buffer=BufferInfo.from_dict(d.get("buffer") or {}),
            streams=tuple(StreamStatus.from_dict(s) for s in d.get("streams") or ()),
            sinks=tuple(SinkStatus.from_dict(s) for s in d.get("sinks") or ()),
            sources=tuple(SourceStatus.from_dict(s) for s in d.get("sources") or ()),
            schema=int(d.get("schema") or SCHEMA),
        )

    @classmethod
    def of(cls, snap: StatusSnapshot | Mapping[str, Any]) -> StatusSnapshot:
        """``snap`` as a StatusSnapshot (readers take either, tests pass literals)."""
        return snap if isinstance(snap, StatusSnapshot) else cls.from_dict(snap)

    def to_dict(self) -> dict[str, Any]:
        """The schema-1 JSON object of ``status --json``, key for key."""
        a, b = self.agent, self.buffer
        return {
            "schema": self.schema,
            "agent": {
                "id": a.id,
                "plant": a.plant,
                "version": a.version,
                "running": a.running,
                "pid": a.pid,
                "started_at": a.started_at,
                "heartbeat_age_s": a.heartbeat_age_s,
            },
            "buffer": {
                "path": b.path,
                "file_bytes": b.file_bytes,
                "used_bytes": b.used_bytes,
                "max_bytes": b.max_bytes,
                "on_full": b.on_full,
                "durability": b.durability,
                "epoch": b.epoch,
                "ingest_rate_eps": b.ingest_rate_eps,
                "full_in_s": b.full_in_s,
                "refused_total": b.refused_total,
                "last_write_error": b.last_write_error,
                "accepting": b.accepting,
            },
            "streams": [
                {
                    "stream": s.stream,
                    "sink": s.sink,
                    "priority": s.priority,
                    "last_sequence": s.last_sequence,
                    "forwarded_sequence": s.forwarded_sequence,
                    "backlog_events": s.backlog_events,
                    "backlog_bytes": s.backlog_bytes,
                    "oldest_unsent_age_s": s.oldest_unsent_age_s,
                    "last_forwarded_at": s.last_forwarded_at,
                    "last_error": s.last_error,
                    "state": s.state,
                    "dead_letters": s.dead_letters,
                    "ingested_total": s.ingested_total,
                    "forwarded_total": s.forwarded_total,
                    "dropped_total": s.dropped_total,
                    "dead_lettered_total": s.dead_lettered_total,
                    "refused_total": s.refused_total,
                }
                for s in self.streams
            ],
            "sinks": [s.to_dict() for s in self.sinks],
            "sources": [s.to_dict() for s in self.sources],
        }


__all__ = [
    "AgentInfo",
    "BufferInfo",
    "Readiness",
    "SinkStatus",
    "SourceStatus",
    "StatusSnapshot",
    "StreamStatus",
]

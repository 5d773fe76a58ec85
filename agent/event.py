"""The CloudEvents envelope, encoded once at commit time.

The forwarder and every sink send these bytes as they are (joined into a JSON array), so
what the central side receives is exactly what was committed: the same id, sequence and
epoch on every retry and replay.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import orjson

from agent.interfaces import NewEvent
from agent.vocabulary import TYPES, dataschema

SPECVERSION = "1.0"


def source_uri(plant: str, stream: str) -> str:
    return f"edge-agent://{plant}/{stream}"


def format_sequence(seq: int) -> str:
    """20-digit zero padded, so string order equals numeric order."""
    return str(seq).zfill(20)


def format_time(t: str | datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a Z, e.g. 2026-11-23T10:15:02.123Z."""
    if isinstance(t, str):
        return t
    return _format_datetime(t)


@functools.lru_cache(maxsize=256)
def _format_datetime(t: datetime) -> str:
    # cached: samples of one OPC UA server tick share their timestamp
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    return format_time(datetime.now(UTC))


def encode(
    ev: NewEvent, *, id: str, source: str, seq: int, epoch: str, plant: str, agent_id: str
) -> bytes:
    """The envelope as compact JSON, keys in the contract's order: byte for byte what
    orjson.dumps of the whole envelope dict gives (encode_reference; tests/agent/test_event.py
    holds it to that). One event; a group commit uses an Encoder for the many of a stream."""
    return encoder(source, epoch, plant, agent_id).encode(ev, id, seq)


@functools.lru_cache(maxsize=16)
def encoder(source: str, epoch: str, plant: str, agent_id: str) -> Encoder:
    """The Encoder of a stream, kept across group commits (its caches fill once)."""
    return Encoder(source=source, epoch=epoch, plant=plant, agent_id=agent_id)


class Encoder:
    """encode() for the events of one stream (one source, epoch, plant and agent id).

    The envelope is joined from fragments around one orjson call for the data (and one
    for the id, one for a correlationid): the per-stream constants are looked
    up once, here, not per event; each event type's fragment and each distinct time's JSON
    string are made once and kept (the samples of one OPC UA tick, or of one Sparkplug
    payload, share their timestamp), and so is each subject's. The join is ONE bytes
    %-format. Measured with timeit on a 9-key OPC UA signal event, both in one sitting on
    the loaded machine of 2026-12-02: 6.2 us an event before (a list join, the fragments
    looked up per event), 4.1 us this way; orjson.dumps of the data is about 1/3 of it.
    """

    __slots__ = ("_stream", "_subjects", "_tail", "_times", "_types")

    #: distinct times (and subjects) kept at most (then forgotten, all at once)
    TIMES_MAX = 4096
    SUBJECTS_MAX = 16384

    def __init__(self, *, source: str, epoch: str, plant: str, agent_id: str) -> None:
        self._stream = _stream_fragment(source)
        self._tail = _tail_fragment(epoch, plant, agent_id)
        self._types: dict[tuple[str, str | None], bytes] = {}
        self._times: dict[str | datetime, bytes] = {}
        self._subjects: dict[str, bytes] = {}

    def encode(self, ev: NewEvent, id: str, seq: int) -> bytes:
        key = (ev.type, ev.dataschema)
        head = self._types.get(key)
        if head is None:
            head = self._types[key] = _type_fragment(ev.type, ev.dataschema)
        t = ev.time
        when = self._times.get(t)
        if when is None:
            if len(self._times) >= self.TIMES_MAX:
                self._times.clear()
            when = self._times[t] = _dumps(format_time(t))
        subject = ev.subject
        if subject is None:
            extra = b""
        else:  # a source's subjects repeat (one per node or metric): each made once
            extra = self._subjects.get(subject, b"")
            if not extra:
                if len(self._subjects) >= self.SUBJECTS_MAX:
                    self._subjects.clear()
                extra = self._subjects[subject] = b',"subject":' + _dumps(subject)
        if ev.correlationid is not None:
            extra += b',"correlationid":' + _dumps(ev.correlationid)
        return b'{"specversion":"1.0","id":%s%s%s%s,"sequence":"%020d%s%s,"data":%s}' % (
            orjson.dumps(id), self._stream, head, when, seq, self._tail, extra,
            orjson.dumps(ev.data, option=orjson.OPT_NON_STR_KEYS),
        )  # fmt: skip


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


@functools.lru_cache(maxsize=1024)
def _stream_fragment(source: str) -> bytes:
    return b',"source":' + _dumps(source) + b',"type":'


def _schema_urn(type_: str, schema: str | None) -> str:
    # the vocabulary's versioned URN; sources validate types before appending, but an
    # unknown one must never fail the whole group commit it shares with other events
    return schema or (dataschema(type_) if type_ in TYPES else f"urn:edge-agent:schema:{type_}:1")


@functools.lru_cache(maxsize=1024)
def _type_fragment(type_: str, schema: str | None) -> bytes:
    return (
        _dumps(type_) + b',"dataschema":' + _dumps(_schema_urn(type_, schema))
        + b',"datacontenttype":"application/json","time":'
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _tail_fragment(epoch: str, plant: str, agent_id: str) -> bytes:
    return (
        b'","streamepoch":' + _dumps(epoch) + b',"plant":' + _dumps(plant)
        + b',"agentid":' + _dumps(agent_id)
    )  # fmt: skip


def encode_reference(
    ev: NewEvent, *, id: str, source: str, seq: int, epoch: str, plant: str, agent_id: str
) -> bytes:
    """The plain form of encode(): one dict, one orjson call. Kept as its specification."""
    envelope: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id,
        "source": source,
        "type": ev.type,
        "dataschema": _schema_urn(ev.type, ev.dataschema),
        "datacontenttype": "application/json",
        "time": format_time(ev.time),
        "sequence": format_sequence(seq),
        "streamepoch": epoch,
        "plant": plant,
        "agentid": agent_id,
    }
    if ev.subject is not None:
        envelope["subject"] = ev.subject
    if ev.correlationid is not None:
        envelope["correlationid"] = ev.correlationid
    envelope["data"] = ev.data
    return orjson.dumps(envelope, option=orjson.OPT_NON_STR_KEYS)

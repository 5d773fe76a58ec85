"""From OPC UA data changes to events: the raw signal and the business events.

A :class:`Sample` is one data-change notification as received. :class:`NodeMapper` turns the
samples of one node into ``NewEvent`` objects:

* ``mfg.signal.sampled`` always carries the value with its status code (bad and uncertain
  values are forwarded as they are, never dropped or faked as good) and both timestamps;
* a counter node yields ``mfg.production.counted`` with the *increment*, coping with a reset
  (the counter starts again near 0) and a rollover (it wraps at ``counter_max``);
* a state node yields ``mfg.machine.state_changed`` through the configured value-to-state
  table, only when the mapped state changes;
* a boolean or enum node yields ``mfg.quality.hold_placed`` / ``hold_released`` on the
  transitions into and out of ``hold_values``.

Business events are derived only from good values: a bad counter reading says nothing about
production. The mappers keep their last value across reconnects, so what was produced while
the connection was down is still counted (as one increment) after it comes back.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from asyncua import ua
from asyncua.ua import status_codes

from agent import vocabulary
from agent.interfaces import NewEvent

from .config import NodeConfig

SIGNAL = "mfg.signal.sampled"
COUNTED = "mfg.production.counted"
STATE_CHANGED = "mfg.machine.state_changed"
HOLD_PLACED = "mfg.quality.hold_placed"
HOLD_RELEASED = "mfg.quality.hold_released"

#: StatusCode info bits: "this is a data value" + "the server's item queue overflowed"
_OVERFLOW_BITS = 0x0480

#: OPC UA Part 6, 5.2.2.5: a DateTime at or before 1601-01-01 is the null value and one at or
#: after 9999-12-31 the max value; both mean "unknown", so they are never forwarded as dates
_UNKNOWN_BEFORE = datetime(1601, 1, 1, 0, 0, 1, tzinfo=UTC)
_UNKNOWN_FROM = datetime(9999, 12, 31, tzinfo=UTC)

#: known timestamps outside this window are forwarded as sent but not believed for the
#: envelope time (a PLC whose clock was never set starts at 1970 or 2000)
_SANE_FROM = datetime(1990, 1, 1, tzinfo=UTC)
_SANE_AHEAD = timedelta(days=1)

#: which clock an event's envelope time comes from (`data.time_basis`)
TimeBasis = Literal["source", "server", "received"]


@dataclasses.dataclass(slots=True)
class Sample:
    """One data-change notification, as received from the server."""

    value: Any
    status_code: int
    source_timestamp: datetime | None
    server_timestamp: datetime | None
    received: datetime


@functools.lru_cache(maxsize=512)
def status_name(code: int) -> str:
    """Symbolic name of the code's severity/sub-code part ('Good', 'BadSensorFailure')."""
    name, _ = status_codes.get_name_and_doc(code & 0xFFFF0000)
    return name


@functools.lru_cache(maxsize=512)
def _status_object(code: int) -> dict[str, Any]:
    """{"code", "name"} of a status code, built once per code instead of once per sample.
    Shared between events: nothing changes event data after it is made (it is encoded
    once, at commit)."""
    return {"code": code, "name": status_name(code)}


#: _status_object of the codes nearly every sample has, without the lru_cache call
_STATUS: dict[int, dict[str, Any]] = {0: _status_object(0)}
_new_event = tuple.__new__
assert NewEvent._fields[:4] == ("type", "data", "time", "subject") and len(NewEvent._fields) == 7


def is_good(code: int) -> bool:
    return (code & 0xC0000000) == 0


def overflowed(code: int) -> bool:
    return (code & _OVERFLOW_BITS) == _OVERFLOW_BITS


def _aware(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def known(t: datetime | None) -> datetime | None:
    """The timestamp as an aware datetime, or None where OPC UA says it is unknown (null or
    max DateTime): such a value is left out of the event, never sent as 1601 or 9999."""
    t = _aware(t)
    if t is None or t < _UNKNOWN_BEFORE or t >= _UNKNOWN_FROM:
        return None
    return t


def sane(t: datetime | None, now: datetime) -> bool:
    return t is not None and _SANE_FROM <= t <= now + _SANE_AHEAD


def event_time(sample: Sample) -> tuple[datetime, TimeBasis]:
    """When it happened, and by which clock: the source timestamp, else the server's, else
    when we received it."""
    return _when(sample.source_timestamp, sample.server_timestamp, sample.received)


class _AheadOf:
    """``received + _SANE_AHEAD``, remembered for the last ``received``: the items of one
    PublishResponse share it (a timedelta addition per sample otherwise)."""

    __slots__ = ("_last", "_limit")

    def __init__(self) -> None:
        self._last: datetime | None = None
        self._limit = _SANE_FROM

    def __call__(self, received: datetime) -> datetime:
        if received is not self._last:
            self._limit = received + _SANE_AHEAD
            self._last = received
        return self._limit


_ahead_of = _AheadOf()


def _when(
    src: datetime | None, srv: datetime | None, received: datetime
) -> tuple[datetime, TimeBasis]:
    """event_time() of a sample's parts (what sane() says, with the bound computed once)."""
    limit = _ahead_of(received)
    if src is not None and _SANE_FROM <= src <= limit:
        return src, "source"
    if srv is not None and _SANE_FROM <= srv <= limit:
        return srv, "server"
    return received, "received"


def rfc3339(t: datetime | None) -> str | None:
    """UTC with microseconds and Z."""
    if t is None:
        return None
    return _format(t)


@functools.lru_cache(maxsize=256)
def _format(t: datetime) -> str:
    # cached: the items of one server tick share their timestamps, and formatting them is a
    # large part of the per-sample cost
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _LastFormatted:
    """rfc3339() remembering its last answer. The items of one server tick share their
    timestamps, but each decoded DataValue has its own datetime objects: the lru_cache
    must hash each (a utcoffset() call, a sixth of the mapping's CPU in py-spy), while
    two aware datetimes with the same tzinfo compare equal field by field. One for the
    source and one for the server timestamps, so they do not evict each other."""

    __slots__ = ("_last", "_text")

    def __init__(self) -> None:
        self._last: datetime | None = None
        self._text = ""

    def __call__(self, t: datetime) -> str:
        if t is not self._last and t != self._last:
            self._text = _format(t)
            self._last = t
        return self._text


_source_text = _LastFormatted()
_server_text = _LastFormatted()


def sample_from_datavalue(dv: ua.DataValue, received: datetime) -> Sample:
    value = dv.Value.Value if dv.Value is not None else None
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    return Sample(
        value=value,
        status_code=code,
        source_timestamp=known(dv.SourceTimestamp),
        server_timestamp=known(dv.ServerTimestamp),
        received=received,
    )


def to_json(value: Any) -> Any:
    """An OPC UA value as plain JSON (what orjson can encode and a gateway can read)."""
    kind = type(value)  # exact-type fast path: nearly every sample is one of these
    if kind is float:
        return value if math.isfinite(value) else None
    if value is None or kind is int or kind is bool or kind is str:
        return value
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return rfc3339(known(value))  # a null or max DateTime value is unknown: null
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.QualifiedName):
        return value.to_string()
    if isinstance(value, ua.NodeId):
        return value.to_string()
    if isinstance(value, ua.StatusCode):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)


def _key(value: Any) -> str:
    """A value as the key of a state table: true/false, integral floats as integers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, ua.LocalizedText):
        return str(value.Text)
    return str(value)


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Counter:
    """Increments of a monotonically counting node, across resets and rollovers."""

    def __init__(self, counter_max: int | None) -> None:
        self.counter_max = counter_max
        self.last: float | int | None = None
        self.resets = 0
        self.rollovers = 0

    def feed(self, value: float | int) -> float | int | None:
        """The increment since the last value, or None for none (first value, no change)."""
        last, self.last = self.last, value
        if last is None or value == last:
            return None
        if value > last:
            return value - last
        # The counter went down: a wrap at counter_max when it was near the top and is
        # near the bottom again, otherwise a reset to 0 (shift change, PLC restart).
        if self.counter_max is not None and last - value > self.counter_max / 2:
            self.rollovers += 1
            return (self.counter_max - last) + 1 + value
        self.resets += 1
        return value if value > 0 else None


_LOCATED = ("plant", "line", "work_center", "machine")


class NodeMapper:
    """Turns the samples of one configured node into events.

    Signal data is built in the exact shape of ``agent.vocabulary.SignalSampled`` without a
    validation call per sample (that would cost more CPU than receiving it; a test holds
    the shape to the model). Business events are rare and go through ``validate_data``.
    """

    def __init__(
        self,
        node: NodeConfig,
        *,
        node_id: str,
        browse_path: str | None,
        attributes: Mapping[str, str],
    ) -> None:
        self.node = node
        self.node_id = node_id
        self.browse_path = browse_path
        self.subject = node.name or node_id
        self.attributes = dict(attributes)
        self.located = {k: v for k, v in attributes.items() if k in _LOCATED}
        self.extra = {k: v for k, v in attributes.items() if k not in _LOCATED}
        self.counter = Counter(node.counter_max) if node.event == COUNTED else None
        self.state: str | None = None
        self.held: bool | None = None
        self.unmapped = 0
        self.last_error: str | None = None
        #: last sample turned into events: a re-sent initial value after a reconnect
        #: (same source timestamp, value and status) is not emitted twice
        self._last: tuple[datetime | None, Any, int] | None = None
        self._hold_keys = {_key(v) for v in node.hold_values}
        self._signal_only = node.event == SIGNAL
        self._static: dict[str, Any] = {"node_id": node_id}
        if browse_path:
            self._static["browse_path"] = browse_path
        self._static.update(self.located)
        if self.extra:
            self._static["attributes"] = dict(self.extra)

    @property
    def last_source_timestamp(self) -> datetime | None:
        """Source timestamp of the last sample turned into events (the backfill start)."""
        return self._last[0] if self._last is not None else None

    def is_repeat(self, sample: Sample) -> bool:
        if sample.source_timestamp is None:
            return False
        return self._last == (sample.source_timestamp, sample.value, sample.status_code)

    def map(self, sample: Sample, data_type: str | None = None) -> list[NewEvent]:
        return self.map_values(
            sample.value,
            sample.status_code,
            sample.source_timestamp,
            sample.server_timestamp,
            sample.received,
            data_type,
        )

    def map_values(
        self,
        value: Any,
        code: int,
        src: datetime | None,
        srv: datetime | None,
        received: datetime,
        data_type: str | None = None,
    ) -> list[NewEvent]:
        """map() of a Sample's fields (timestamps already through known()), without making
        the Sample: the source's hot path, one call per notification. A plain signal node
        takes the short way: its one event built in place (same data, same key order)."""
        last = (src, value, code)
        if src is not None and self._last == last:  # is_repeat
            return []
        self._last = last
        when, basis = _when(src, srv, received)
        if self._signal_only:
            return [self._signal_of(value, code, src, srv, when, basis, data_type)]
        sample = Sample(value, code, src, srv, received)
        out: list[NewEvent] = []
        if self.node.event == SIGNAL or self.node.raw:
            out.append(self._signal(sample, when, basis, data_type))
        if self.node.event != SIGNAL and is_good(sample.status_code):
            try:
                business = self._business(sample, when)
            except vocabulary.VocabularyError as exc:
                # e.g. a reason code longer than the vocabulary allows: the raw signal still
                # goes out; the mapping problem is counted and shown, not fatal
                self.unmapped += 1
                self.last_error = f"{self.subject}: {exc}"
                business = None
            if business is not None:
                out.append(business)
        return out

    def _signal(
        self, s: Sample, when: datetime, basis: TimeBasis, data_type: str | None
    ) -> NewEvent:
        return self._signal_of(
            s.value, s.status_code, s.source_timestamp, s.server_timestamp, when, basis, data_type
        )

    def _signal_of(
        self,
        value: Any,
        code: int,
        src: datetime | None,
        srv: datetime | None,
        when: datetime,
        basis: TimeBasis,
        data_type: str | None,
    ) -> NewEvent:
        data = self._static.copy()
        kind = type(value)  # to_json's own fast path, without the call
        if kind is float:
            data["value"] = value if math.isfinite(value) else None
        elif value is None or kind is int or kind is bool or kind is str:
            data["value"] = value
        else:
            data["value"] = to_json(value)
        if data_type:
            data["data_type"] = data_type
        status = _STATUS.get(code)
        data["status_code"] = status if status is not None else _status_object(code)
        if src is not None:
            data["source_timestamp"] = _source_text(src)
        if srv is not None:
            data["server_timestamp"] = _server_text(srv)
        data["time_basis"] = basis
        # positional: a NamedTuple's keyword __new__ costs twice as much
        return _new_event(NewEvent, (SIGNAL, data, when, self.subject, None, None, None))

    def _business(self, s: Sample, when: datetime) -> NewEvent | None:
        n = self.node
        data: dict[str, Any] | None = None
        kind: str = n.event
        if n.event == COUNTED:
            assert self.counter is not None
            number = _number(s.value)
            if number is None:
                self.unmapped += 1
                return None
            inc = self.counter.feed(number)
            if inc is None:
                return None
            data = {
                **self.located,
                "work_order": n.work_order,
                "item": self.attributes.get("item"),
                "lot": n.lot,
                n.quantity_kind: {"value": inc, "uom": n.unit},
            }
        elif n.event == STATE_CHANGED:
            key = _key(s.value)
            state = n.states.get(key)
            if state is None:
                self.unmapped += 1
                return None
            if state == self.state:
                return None
            previous, self.state = self.state, state
            data = {**self.located, "state": state, "previous_state": previous, "reason_code": key}
        elif n.event == "mfg.quality.hold":
            held = _key(s.value) in self._hold_keys
            was, self.held = self.held, held
            if held == was or (was is None and not held):
                return None
            kind = HOLD_PLACED if held else HOLD_RELEASED
            reason = n.reason or (
                f"OPC UA hold signal {self.subject} = {_key(s.value)}" if held else None
            )
            data = {
                **self.located,
                "item": self.attributes.get("item"),
                "lot": n.lot,
                "location": n.location,
                "reason": reason,
            }
        if data is None:
            return None
        extra = {k: v for k, v in self.extra.items() if k != "item"}
        if extra:
            data["attributes"] = extra
        data = vocabulary.validate_data(kind, {k: v for k, v in data.items() if v is not None})
        return NewEvent(type=kind, data=data, time=when, subject=self.subject)

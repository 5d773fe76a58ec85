"""One MES record -> one validated NewEvent, or an error naming every bad field.

Shared by every MES channel, so an event is judged the same whether it was posted over
HTTP, dropped as a file or published on the plant's MQTT broker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from adapters.sources.mes_common.fast import fast_event, fast_events
from adapters.sources.mes_common.mapping import FieldMapping, apply_mapping
from agent.errors import EdgeAgentError
from agent.interfaces import NewEvent
from agent.vocabulary import (
    MES_TYPES,
    TYPES,
    VocabularyError,
    agent_made,
    dataschema,
    default_subject,
    errors_of,
    validate_data,
)

Id = Annotated[str, Field(min_length=1, max_length=200)]


class MesEvent(BaseModel):
    """What an MES sends for one event (after field mapping).

    ``id`` is the MES's own event id: optional, but when given a retry of the same event is
    recognised and not stored twice. The CloudEvents attributes ``specversion``, ``source``,
    ``datacontenttype`` and ``dataschema`` are tolerated so an MES may post CloudEvents it
    already produces; the agent sets its own ``source``.
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, str_strip_whitespace=True)

    type: str
    time: AwareDatetime
    data: dict[str, Any]
    subject: Id | None = None
    correlationid: Id | None = None
    id: Id | None = None
    specversion: Literal["1.0"] | None = None
    source: str | None = None
    datacontenttype: Literal["application/json"] | None = None
    dataschema: str | None = None


class MesInputError(EdgeAgentError):
    """An MES record is not a valid event. ``errors`` lists every (field_path, message);
    ``field_path``/``message`` are the first. Paths are canonical ("data.good.uom"), or
    the MES's own field name followed by the canonical one when a mapping renamed it."""

    def __init__(
        self, field_path: str, message: str, errors: list[tuple[str, str]] | None = None
    ) -> None:
        self.field_path = field_path
        self.message = message
        self.errors = errors or [(field_path, message)]
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in self.errors))


_TIME_HINT = "must be an RFC 3339 time with a UTC offset, e.g. 2026-11-23T10:15:02.123Z"


def _envelope_errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for path, msg in errors_of(exc, MesEvent):
        if path == "time" and msg != "required field is missing":
            msg = _TIME_HINT
        elif path == "data" and msg != "required field is missing":
            msg = "must be a JSON object"
        elif msg.startswith("unknown field"):
            msg = (
                "unknown field (an event has type, time, data and optionally subject, "
                "correlationid, id; map other MES fields in the source's mapping)"
            )
        out.append((path, msg))
    return out


def _name(path: str, mapping: FieldMapping | None) -> str:
    if mapping is None:
        return path
    src = mapping.source_of(path)
    return f"{src} ({path})" if src and src != path else path


def parse_mes_payload(
    obj: Any,
    mapping: FieldMapping | None = None,
    *,
    constants: Mapping[str, Any] | None = None,
    extra_uom_codes: Iterable[str] = (),
    drop_empty: bool = False,
) -> NewEvent:
    """Map, validate and normalise one MES record into a NewEvent for ``ingest.append``.

    ``constants`` are canonical fields fixed by the caller at run time (the type an MQTT
    topic implies); ``drop_empty`` treats "" as absent (CSV cells). The event's ``data`` is
    the normalised dict of agent.vocabulary; ``dataschema`` is set; ``subject`` defaults to
    the business object (work order, lot, node id); ``source_event_id`` is the MES id.
    Raises MesInputError listing every problem found.
    """
    if not isinstance(obj, Mapping):
        raise MesInputError("", "an event must be a JSON object")
    # A plainly valid record (the common case) needs no pydantic: fast.py, which returns
    # None whenever only the detailed checks judge it. Without a mapping the record is its
    # canonical object (fast_event does not change it, and refuses the dotted keys
    # apply_mapping would expand), so it is not even copied.
    extra = frozenset(extra_uom_codes)
    plain = not constants and not drop_empty and (mapping is None or mapping.is_identity)
    if plain and type(obj) is dict:
        fast = fast_event(obj, extra)
        if fast is not None:
            return fast
    canonical, errors = apply_mapping(obj, mapping, constants, drop_empty=drop_empty)
    if not errors and not plain:
        fast = fast_event(canonical, extra)
        if fast is not None:
            return fast
    return parse_detailed(canonical, errors, mapping, extra)


def parse_mes_batch(
    items: Sequence[Any],
    mapping: FieldMapping | None = None,
    *,
    extra_uom_codes: Iterable[str] = (),
) -> tuple[list[NewEvent], list[tuple[int, MesInputError]]]:
    """parse_mes_payload of every record of a request: (events, [(index, error)]).

    Without a mapping the fast pass runs over the whole list in one loop (the HTTP push's
    500-event bodies); a record it refuses goes through parse_mes_payload alone."""
    extra = frozenset(extra_uom_codes)
    if mapping is None or mapping.is_identity:
        fast = fast_events(items, extra)
    else:
        fast = [None] * len(items)
    events: list[NewEvent] = []
    errors: list[tuple[int, MesInputError]] = []
    for i, ev in enumerate(fast):
        if ev is None:
            try:
                ev = parse_mes_payload(items[i], mapping, extra_uom_codes=extra)
            except MesInputError as exc:
                errors.append((i, exc))
                continue
        events.append(ev)
    return events, errors


def parse_detailed(
    canonical: dict[str, Any],
    errors: list[tuple[str, str]],
    mapping: FieldMapping | None,
    extra: frozenset[str],
) -> NewEvent:
    """The pydantic path: validates the mapped record and names every bad field.
    ``errors`` are the mapping's conflicts. Every record the fast pass refuses comes here
    (tests/adapters/test_mes_fast.py compares the two on the records both accept)."""
    event: MesEvent | None = None
    try:
        event = MesEvent.model_validate(canonical)
    except ValidationError as exc:
        errors += _envelope_errors(exc)
    type_ = canonical.get("type")
    data = canonical.get("data")
    valid_data: dict[str, Any] | None = None
    type_problem = None
    if type_ is not None and not isinstance(type_, str):
        type_problem = "must be a string naming a canonical type, e.g. mfg.production.completed"
    elif isinstance(type_, str):
        type_ = type_.strip()
        if (who := agent_made(type_)) is not None:
            type_problem = f"{type_} events are {who}; an MES cannot send them"
        elif type_ not in TYPES:
            type_problem = f"unknown event type '{type_}' (one of: {', '.join(MES_TYPES)})"
    if type_problem:
        errors = [e for e in errors if e[0] != "type"] + [("type", type_problem)]
    elif isinstance(type_, str) and isinstance(data, Mapping):
        try:
            valid_data = validate_data(type_, data, extra_uom_codes=extra)
        except VocabularyError as exc:
            errors += [(f"data.{p}" if p else "data", m) for p, m in exc.errors]
        if canonical.get("dataschema") not in (None, dataschema(type_)):
            errors.append(
                ("dataschema", f"must be {dataschema(type_)} for {type_} (or leave it out)")
            )
    if errors or event is None or valid_data is None:
        named = [(_name(p, mapping), m) for p, m in errors] or [("", "invalid event")]
        raise MesInputError(named[0][0], named[0][1], named)
    return NewEvent(
        type=event.type,
        data=valid_data,
        time=event.time,
        subject=event.subject or default_subject(event.type, valid_data),
        correlationid=event.correlationid,
        dataschema=dataschema(event.type),
        source_event_id=event.id,
    )

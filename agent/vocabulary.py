"""The canonical event vocabulary: one pydantic model per CloudEvents ``type`` for its ``data``.

Every source validates what it collects here before handing it to the buffer, so the central
side only ever sees data that matches the published JSON Schemas (docs/schemas/, generated
from these models by ``python -m agent.vocabulary --write docs/schemas``; a test fails when
the committed files are stale). A breaking change to a model bumps its ``SCHEMA_VERSION``
entry and therefore its ``dataschema`` URN.

    TYPES            type name -> model of its data
    validate_data()  raw mapping -> normalised JSON-ready dict, or VocabularyError
    dataschema()     "urn:edge-agent:schema:<type>:<version>"
    json_schema()    JSON Schema of one type's data; envelope_schema() for the CloudEvent

Quantities always carry a unit of measure: a UN/CEFACT Recommendation 20 code from
``UOM_CODES`` (or the ``extra_uom_codes`` an operator configures). Inputs are read leniently
where plant systems differ harmlessly (a CSV "12.5" for a number, a numeric work order id),
and written out canonically (numbers as numbers, identifiers as strings, times in UTC).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from agent.errors import EdgeAgentError

# --------------------------------------------------------------------------- units of measure

#: Built-in UN/CEFACT Recommendation 20 codes: the common units of discrete and process
#: manufacturing. Extend per site with ``extra_uom_codes`` rather than editing this list.
UOM_CODES: Mapping[str, str] = {
    # count
    "EA": "each",
    "C62": "one (unit)",
    "H87": "piece",
    "PR": "pair",
    "SET": "set",
    "DZN": "dozen",
    "NAR": "number of articles",
    "NPR": "number of pairs",
    "NMP": "number of packs",
    # mass
    "MGM": "milligram",
    "GRM": "gram",
    "KGM": "kilogram",
    "TNE": "tonne (metric ton)",
    "LBR": "pound",
    "ONZ": "ounce",
    # length
    "MMT": "millimetre",
    "CMT": "centimetre",
    "DMT": "decimetre",
    "MTR": "metre",
    "KMT": "kilometre",
    "INH": "inch",
    "FOT": "foot",
    "YRD": "yard",
    # area
    "MMK": "square millimetre",
    "CMK": "square centimetre",
    "MTK": "square metre",
    "INK": "square inch",
    "FTK": "square foot",
    # volume
    "MLT": "millilitre",
    "LTR": "litre",
    "HLT": "hectolitre",
    "CMQ": "cubic centimetre",
    "MTQ": "cubic metre",
    "GLL": "US gallon",
    "FTQ": "cubic foot",
    # time
    "SEC": "second",
    "MIN": "minute",
    "HUR": "hour",
    "DAY": "day",
    # energy and power
    "WHR": "watt hour",
    "KWH": "kilowatt hour",
    "MWH": "megawatt hour",
    "KWT": "kilowatt",
    # packaging (Recommendation 21 codes as carried in Recommendation 20)
    "XBX": "box",
    "XCT": "carton",
    "XCS": "case",
    "XPK": "package",
    "XPX": "pallet",
    "XBG": "bag",
    "XDR": "drum",
    "XRO": "roll",
    # ratio
    "P1": "percent",
}

#: Frequent non-codes and the code meant, for a helpful rejection message.
_UOM_HINTS: Mapping[str, str] = {
    "KG": "KGM",
    "G": "GRM",
    "GR": "GRM",
    "MG": "MGM",
    "T": "TNE",
    "TON": "TNE",
    "LB": "LBR",
    "LBS": "LBR",
    "OZ": "ONZ",
    "M": "MTR",
    "MM": "MMT",
    "CM": "CMT",
    "KM": "KMT",
    "IN": "INH",
    "FT": "FOT",
    "M2": "MTK",
    "M3": "MTQ",
    "L": "LTR",
    "LT": "LTR",
    "ML": "MLT",
    "PC": "H87 or EA",
    "PCS": "H87 or EA",
    "PCE": "H87 or EA",
    "ST": "H87 or EA",
    "STK": "H87 or EA",
    "S": "SEC",
    "H": "HUR",
    "HR": "HUR",
    "KW": "KWT",
    "%": "P1",
}

#: Shape of a Recommendation 20 code (upper-case letters and digits, 2 or 3 characters).
UOM_PATTERN = r"^[A-Z0-9]{2,3}$"


def check_uom(code: str, extra: Iterable[str] = ()) -> str:
    """Return ``code`` if it is a known unit, else raise ValueError naming the fix."""
    if code in UOM_CODES or code in extra:
        return code
    upper = code.strip().upper()
    if upper in UOM_CODES or upper in extra:
        hint = f"codes are upper case: use '{upper}'"
    elif upper in _UOM_HINTS:
        hint = f"use the UN/CEFACT rec. 20 code {_UOM_HINTS[upper]}"
    else:
        hint = (
            "use a UN/CEFACT rec. 20 code such as EA, KGM, MTR, LTR; "
            "add site codes with extra_uom_codes"
        )
    raise ValueError(f"'{code}' is not a known unit of measure ({hint})")


# --------------------------------------------------------------------------- field types


def _no_bool(v: Any) -> Any:
    # JSON true is not a number; pydantic's lax mode would read it as 1.
    if isinstance(v, bool):
        raise ValueError("expected a number, got a boolean")
    return v


def _seq(v: Any) -> Any:
    # Sequences are numbers in data, but the envelope writes them as 20-digit strings:
    # accept both forms so an agent's own events can be built from either.
    if isinstance(v, bool):
        raise ValueError("expected a sequence number, got a boolean")
    if isinstance(v, str) and v.isdigit():
        return int(v)
    return v


def _utc(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


Number = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
Sequence_ = Annotated[int, BeforeValidator(_seq), Field(ge=0)]
Count = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
Id = Annotated[str, Field(min_length=1, max_length=200)]
Text = Annotated[str, Field(max_length=2000)]
Timestamp = Annotated[
    AwareDatetime,
    PlainSerializer(_utc, return_type=str, when_used="json"),
    Field(description="RFC 3339 timestamp with an offset; written in UTC"),
]
JsonScalar = str | int | float | bool


class _Base(BaseModel):
    """Strict about shape (unknown fields are errors), lenient about harmless encodings."""

    model_config = ConfigDict(
        extra="forbid",
        coerce_numbers_to_str=True,
        str_strip_whitespace=True,
        allow_inf_nan=False,
    )


class Quantity(_Base):
    """An amount with its unit: ``{"value": 12, "uom": "EA"}``. A bare number is rejected."""

    value: Number = Field(description="the amount")
    uom: str = Field(
        description="UN/CEFACT Recommendation 20 unit code (EA, KGM, MTR, ...)",
        pattern=UOM_PATTERN,
        examples=["EA", "KGM", "MTR"],
    )

    @model_validator(mode="before")
    @classmethod
    def _object_only(cls, v: Any) -> Any:
        if isinstance(v, int | float | str) and not isinstance(v, bool):
            raise ValueError(
                'a quantity needs a unit of measure: write {"value": ..., "uom": "EA"}'
            )
        return v

    @field_validator("uom", mode="before")
    @classmethod
    def _known_uom(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, str):
            return v  # the str type check reports it
        extra = (info.context or {}).get("extra_uom_codes", ())
        return check_uom(v, extra)


class _Located(_Base):
    """Where it happened, as far as the source knows: static attributes from config or MES."""

    plant: Id | None = Field(default=None, description="plant or site")
    area: Id | None = Field(default=None, description="area / hall")
    line: Id | None = Field(default=None, description="production line")
    work_center: Id | None = Field(default=None, description="work center (ERP term)")
    machine: Id | None = Field(default=None, description="machine / equipment id")
    attributes: dict[str, JsonScalar] | None = Field(
        default=None,
        description="site-specific extra attributes (flat, scalar values); not interpreted",
    )


# --------------------------------------------------------------------------- the types


class StatusCode(_Base):
    """An OPC UA StatusCode: the 32-bit value and its symbolic name."""

    code: int = Field(ge=0, le=0xFFFFFFFF, description="StatusCode as unsigned 32-bit integer")
    name: Id = Field(description="symbolic name, e.g. Good, BadCommunicationError")


class SparkplugOrigin(_Base):
    """Where a Sparkplug B metric came from (adapters/sources/sparkplug, docs/sparkplug.md)."""

    group_id: Id
    edge_node_id: Id
    device_id: Id | None = Field(default=None, description="absent for a node-level metric")
    metric: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="metric name as born; Template members as template/member"
    )
    alias: int | None = Field(default=None, ge=0, le=2**64 - 1)
    seq: int | None = Field(default=None, ge=0, le=255, description="payload seq it came in")
    bd_seq: int | None = Field(default=None, ge=0, description="bdSeq of the node's birth")
    message: Literal["NBIRTH", "DBIRTH", "NDATA", "DDATA"] = Field(
        description="message type that carried the value"
    )


class SignalSampled(_Located):
    """mfg.signal.sampled: one value of a signal as received: an OPC UA data change, or a
    Sparkplug B metric value (then ``protocol`` is ``sparkplug`` and ``sparkplug`` says
    where it came from)."""

    node_id: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="the signal's address at its source: an OPC UA NodeId string "
        "(ns=2;s=Line1.Counter), or for Sparkplug B group/edge_node[/device]/metric"
    )
    browse_path: Text | None = Field(
        default=None, description="browse path, e.g. /Objects/Line1/Counter"
    )
    value: Any = Field(description="the value as JSON (numbers, strings, booleans, arrays, null)")
    data_type: Id | None = Field(
        default=None,
        description="the source's type name: OPC UA built-in type or Sparkplug datatype, e.g. Double",
    )
    status_code: StatusCode
    source_timestamp: Timestamp | None = Field(
        default=None, description="when the value changed at its source; absent when unknown"
    )
    server_timestamp: Timestamp | None = Field(
        default=None, description="when the OPC UA server saw it; absent when unknown"
    )
    time_basis: Literal["source", "server", "received"] | None = Field(
        default=None,
        description="which clock the envelope time is from: the source timestamp, else the "
        "server timestamp, else when the agent received the value",
    )
    protocol: Literal["opcua", "sparkplug", "mqtt"] | None = Field(
        default=None,
        description="where the signal came from (mqtt: a unified namespace value topic); "
        "absent means opcua",
    )
    quality: Literal["good", "uncertain", "bad"] | None = Field(
        default=None, description="the status in one word (Sparkplug: from the Quality property)"
    )
    historical: bool | None = Field(
        default=None,
        description="true for a value the source stored and sent late (Sparkplug is_historical)",
    )
    uom: Id | None = Field(
        default=None,
        description="UN/CEFACT Rec. 20 code when the source's engineering unit matched one",
    )
    engineering_unit: Id | None = Field(
        default=None, description="the engineering unit as the source wrote it"
    )
    sparkplug: SparkplugOrigin | None = None

    @field_validator("value")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("NaN and infinity cannot be sent as JSON; send null with a Bad status")
        return v


MachineState = Literal["running", "idle", "down", "setup"]


class MachineStateChanged(_Located):
    """mfg.machine.state_changed: a machine or work center changed its state."""

    state: MachineState
    previous_state: MachineState | None = None
    reason_code: Id | None = Field(default=None, description="site reason code, e.g. M-104")
    reason: Text | None = Field(default=None, description="free text")

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["machine"]}, {"required": ["work_center"]}]}
    )

    @model_validator(mode="after")
    def _who(self) -> MachineStateChanged:
        if self.machine is None and self.work_center is None:
            raise ValueError("name the machine or the work_center whose state changed")
        return self


class _Production(_Located):
    work_order: Id
    item: Id = Field(description="material / part number produced")
    lot: Id | None = Field(default=None, description="lot or batch number")
    operation: Id | None = Field(default=None, description="routing operation, e.g. 0020")
    good: Quantity | None = None
    scrap: Quantity | None = None

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["good"]}, {"required": ["scrap"]}]}
    )

    @model_validator(mode="after")
    def _some(self) -> _Production:
        if self.good is None and self.scrap is None:
            raise ValueError("give a good or a scrap quantity (or both)")
        return self


class ProductionCounted(_Production):
    """mfg.production.counted: an increment counted during production (per cycle, per box)."""


class ProductionCompleted(_Production):
    """mfg.production.completed: a confirmed output (operation or order completion)."""


class MaterialConsumed(_Located):
    """mfg.material.consumed: a component issued to a work order."""

    component_item: Id
    lot: Id | None = None
    quantity: Quantity
    work_order: Id
    location: Id | None = Field(default=None, description="storage location it came from")


WorkOrderStatus = Literal["released", "started", "held", "completed", "closed"]


class WorkOrderStatusChanged(_Located):
    """mfg.workorder.status_changed: the work order moved through its life cycle."""

    work_order: Id
    status: WorkOrderStatus
    previous_status: WorkOrderStatus | None = None
    item: Id | None = None
    reason: Text | None = None


class QualityHoldPlaced(_Located):
    """mfg.quality.hold_placed: material is blocked from use or shipment."""

    item: Id
    lot: Id | None = None
    location: Id | None = None
    reason: Text = Field(min_length=1)
    hold_id: Id | None = None
    quantity: Quantity | None = None


class QualityHoldReleased(_Located):
    """mfg.quality.hold_released: a hold is lifted."""

    item: Id
    lot: Id | None = None
    location: Id | None = None
    reason: Text | None = None
    hold_id: Id | None = None
    disposition: Id | None = Field(default=None, description="e.g. use_as_is, rework, scrap")


class InventoryMoved(_Located):
    """mfg.inventory.moved: stock moved between locations."""

    item: Id
    lot: Id | None = None
    from_location: Id
    to_location: Id
    quantity: Quantity
    work_order: Id | None = None
    transfer_id: Id | None = None


class SparkplugStateChanged(_Base):
    """mfg.sparkplug.state_changed: a Sparkplug B edge node or device went online or offline."""

    group_id: Id
    edge_node_id: Id
    device_id: Id | None = Field(
        default=None, description="absent when the edge node itself changed"
    )
    state: Literal["online", "offline"]
    reason: Literal["birth", "rebirth", "death", "node_death"] = Field(
        description="birth: NBIRTH/DBIRTH; rebirth: a birth while already online; death: "
        "NDEATH (bdSeq matched) or DDEATH; node_death: a device whose edge node died"
    )
    bd_seq: int | None = Field(default=None, ge=0, description="the node's bdSeq")
    metrics: Count | None = Field(default=None, description="metrics declared by the birth")


class AgentCheckpoint(_Base):
    """mfg.agent.checkpoint: a stream's high-water mark, so the central side can reconcile.

    It covers the sequences since the previous checkpoint: first_sequence..last_sequence,
    all of which the central side must have received or seen explained by a gap event.
    """

    stream: Id | None = None
    streamepoch: Id
    first_sequence: Sequence_ = Field(
        description="first sequence after the previous checkpoint event "
        "(1 for the stream's first checkpoint)"
    )
    last_sequence: Sequence_ = Field(
        description="last sequence committed before this checkpoint event"
    )
    count: Count = Field(
        description="events since the previous checkpoint: last_sequence - first_sequence + 1 "
        "(the previous checkpoint event itself not counted)"
    )


class AgentGap(_Base):
    """mfg.agent.gap: the agent itself dropped events; the explanation of a sequence gap."""

    stream: Id | None = None
    streamepoch: Id
    first_sequence: Sequence_ = Field(description="first sequence dropped")
    last_sequence: Sequence_ = Field(description="last sequence dropped")
    count: Count = Field(description="events dropped in first_sequence..last_sequence")
    reason: Text = Field(
        min_length=1,
        description="why: buffer_full_drop_oldest (buffer full under on_full = drop_oldest) "
        "or purge (an operator purged the stream)",
    )

    @model_validator(mode="after")
    def _order(self) -> AgentGap:
        if self.last_sequence < self.first_sequence:
            raise ValueError("last_sequence must be >= first_sequence")
        return self


TYPES: dict[str, type[BaseModel]] = {
    "mfg.signal.sampled": SignalSampled,
    "mfg.machine.state_changed": MachineStateChanged,
    "mfg.production.counted": ProductionCounted,
    "mfg.production.completed": ProductionCompleted,
    "mfg.material.consumed": MaterialConsumed,
    "mfg.workorder.status_changed": WorkOrderStatusChanged,
    "mfg.quality.hold_placed": QualityHoldPlaced,
    "mfg.quality.hold_released": QualityHoldReleased,
    "mfg.inventory.moved": InventoryMoved,
    "mfg.sparkplug.state_changed": SparkplugStateChanged,
    "mfg.agent.checkpoint": AgentCheckpoint,
    "mfg.agent.gap": AgentGap,
}

#: Types that parts of the agent make from what they observe, never an MES's to send (a
#: type prefix -> who makes them, for the error an MES gets): the agent's reconciliation
#: and gap events, and a Sparkplug edge node or device going online or offline, which
#: only the sparkplug source sees (an MES sending one would be believed by the receiver).
AGENT_MADE: dict[str, str] = {
    "mfg.agent.": "the agent's own",
    "mfg.sparkplug.": "made by the sparkplug source from what edge nodes publish",
}


def agent_made(type_: str) -> str | None:
    """Who makes events of ``type_`` when it is an AGENT_MADE type, else None."""
    for prefix, who in AGENT_MADE.items():
        if type_.startswith(prefix):
            return who
    return None


#: the canonical types an MES may send
MES_TYPES: tuple[str, ...] = tuple(t for t in TYPES if agent_made(t) is None)

#: Bump a type's version on any breaking change to its model (removed/renamed field,
#: new required field, narrower values); adding an optional field is not breaking.
SCHEMA_VERSION: dict[str, int] = {t: 1 for t in TYPES}

#: The data field that makes a good CloudEvents ``subject`` when the source gives none.
_SUBJECT_FIELDS: dict[str, tuple[str, ...]] = {
    "mfg.signal.sampled": ("node_id",),
    "mfg.machine.state_changed": ("machine", "work_center"),
    "mfg.production.counted": ("work_order",),
    "mfg.production.completed": ("work_order",),
    "mfg.material.consumed": ("work_order",),
    "mfg.workorder.status_changed": ("work_order",),
    "mfg.quality.hold_placed": ("lot", "item"),
    "mfg.quality.hold_released": ("lot", "item"),
    "mfg.inventory.moved": ("lot", "item"),
    "mfg.sparkplug.state_changed": ("edge_node_id",),
    "mfg.agent.checkpoint": ("stream",),
    "mfg.agent.gap": ("stream",),
}


# --------------------------------------------------------------------------- API


class VocabularyError(EdgeAgentError):
    """Data does not match its type. ``errors`` lists every (field_path, message) found;
    ``field_path``/``message`` are the first. Paths are relative to ``data`` ("good.uom")."""

    def __init__(
        self, field_path: str, message: str, errors: list[tuple[str, str]] | None = None
    ) -> None:
        self.field_path = field_path
        self.message = message
        self.errors = errors or [(field_path, message)]
        text = "; ".join(f"{p}: {m}" if p else m for p, m in self.errors)
        super().__init__(text)


def dataschema(type_: str) -> str:
    """The versioned schema URN of ``type_`` for the envelope's ``dataschema``."""
    if type_ not in TYPES:
        raise VocabularyError("type", _unknown_type(type_))
    return f"urn:edge-agent:schema:{type_}:{SCHEMA_VERSION[type_]}"


def _unknown_type(type_: str) -> str:
    return f"unknown event type '{type_}' (one of: {', '.join(TYPES)})"


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _message(err: Mapping[str, Any], model: type[BaseModel]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field (see docs/vocabulary.md for the fields of this type)"
    if kind == "string_too_short" and err.get("ctx", {}).get("min_length") == 1:
        return "must not be empty (leave an optional field out instead)"
    if kind == "literal_error":
        return str(err["msg"]).replace("Input should be", "must be")
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def errors_of(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """(field_path, message) for each problem pydantic found, in document order."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        out.append((_path(loc), _message(err, model)))
    return out


def validate_data(type_: str, data: Any, *, extra_uom_codes: Iterable[str] = ()) -> dict[str, Any]:
    """Validate ``data`` for ``type_``; return it normalised and ready for JSON.

    Absent optional fields are left out, but a required field that may be null stays:
    a Bad OPC UA sample is sent as ``"value": null``, not without its value. Raises
    VocabularyError listing every bad field.
    """
    model = TYPES.get(type_)
    if model is None:
        raise VocabularyError("type", _unknown_type(type_))
    if not isinstance(data, Mapping):
        raise VocabularyError("", f"data must be a JSON object, got {_json_kind(data)}")
    ctx = {"extra_uom_codes": frozenset(extra_uom_codes)}
    try:
        obj = model.model_validate(data, context=ctx)
    except ValidationError as exc:
        errors = errors_of(exc, model)
        raise VocabularyError(errors[0][0], errors[0][1], errors) from None
    dumped = obj.model_dump(mode="json", exclude_none=True)
    out: dict[str, Any] = {}
    for name, field in type(obj).model_fields.items():  # field order, as without nulls
        key = field.serialization_alias or field.alias or name
        if key in dumped:
            out[key] = dumped.pop(key)
        elif field.is_required() and getattr(obj, name) is None:
            out[key] = None
    out.update(dumped)  # anything a model allows beyond its fields
    return out


def default_subject(type_: str, data: Mapping[str, Any]) -> str | None:
    """A sensible CloudEvents ``subject`` from validated data (work order, tag, lot)."""
    for name in _SUBJECT_FIELDS.get(type_, ()):
        v = data.get(name)
        if v is not None and v != "":
            return str(v)
    return None


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):
        return "an array"
    return type(v).__name__


# --------------------------------------------------------------------------- JSON Schema

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _WireSchema(GenerateJsonSchema):
    """Describe data as it is sent: validate_data drops absent optional fields, so an
    optional field is simply not required (no ``null`` branch, no ``default: null``), and
    property titles pydantic derives from names add nothing for readers."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema(type_: str) -> dict[str, Any]:
    """The JSON Schema of ``type_``'s data, with ``$id`` = its dataschema URN."""
    model = TYPES[type_]
    body = model.model_json_schema(mode="validation", schema_generator=_WireSchema)
    body.pop("title", None)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": dataschema(type_),
        "title": type_,
        **body,
    }


ENVELOPE_SCHEMA_ID = "urn:edge-agent:schema:cloudevent:1"


def envelope_schema() -> dict[str, Any]:
    """JSON Schema of one forwarded CloudEvent (structured mode) with the contract's
    extensions; ``data`` is checked against the type's schema, embedded under ``$defs``."""
    defs: dict[str, Any] = {}
    branches: list[dict[str, Any]] = []
    for t in TYPES:
        # Each embedded schema keeps its $id, so it is its own resource: its internal
        # "#/$defs/..." references still resolve, and the branch below can $ref the URN.
        s = json_schema(t)
        s.pop("$schema", None)
        defs[t] = s
        branches.append(
            {
                "if": {"properties": {"type": {"const": t}}, "required": ["type"]},
                "then": {
                    "properties": {
                        "data": {"$ref": dataschema(t)},
                        "dataschema": {"const": dataschema(t)},
                    }
                },
            }
        )
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": ENVELOPE_SCHEMA_ID,
        "title": "edge-agent CloudEvent (structured mode, JSON)",
        "description": (
            "One event as the central gateway receives it: CloudEvents 1.0 plus the "
            "extensions sequence, streamepoch, plant, agentid and correlationid. A batch is a "
            "JSON array of these, one stream, contiguous sequences."
        ),
        "type": "object",
        "required": [
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "datacontenttype",
            "dataschema",
            "sequence",
            "streamepoch",
            "plant",
            "agentid",
            "data",
        ],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {
                "type": "string",
                "minLength": 1,
                "description": "ULID (or UUIDv7) given at first commit; never changes on retry",
            },
            "source": {
                "type": "string",
                "pattern": "^edge-agent://[^/]+/.+$",
                "description": "edge-agent://<plant>/<stream>",
            },
            "type": {"enum": list(TYPES)},
            "time": {"type": "string", "format": "date-time"},
            "subject": {"type": "string"},
            "datacontenttype": {"const": "application/json"},
            "dataschema": {"type": "string", "pattern": "^urn:edge-agent:schema:"},
            "sequence": {
                "type": "string",
                "pattern": "^[0-9]{20}$",
                "description": "position in the stream, 20-digit zero-padded",
            },
            "streamepoch": {"type": "string", "minLength": 1},
            "plant": {"type": "string", "minLength": 1},
            "agentid": {"type": "string", "minLength": 1},
            "correlationid": {"type": "string"},
            "data": {"type": "object"},
        },
        "allOf": branches,
        "$defs": defs,
    }


def _schema_files() -> dict[str, dict[str, Any]]:
    files = {f"{t}.v{SCHEMA_VERSION[t]}.schema.json": json_schema(t) for t in TYPES}
    files["cloudevent.v1.schema.json"] = envelope_schema()
    return files


def render_schemas() -> dict[str, str]:
    """File name -> exact text of every published schema (what --write produces)."""
    return {
        name: json.dumps(body, indent=2, ensure_ascii=False) + "\n"
        for name, body in _schema_files().items()
    }


def write_schemas(directory: Path) -> list[Path]:
    """(Re)write docs/schemas; returns the files written. Stale *.schema.json are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    rendered = render_schemas()
    for old in directory.glob("*.schema.json"):
        if old.name not in rendered:
            old.unlink()
    out = []
    for name, text in rendered.items():
        p = directory / name
        p.write_text(text, encoding="utf-8")
        out.append(p)
    return out


def stale_schemas(directory: Path) -> list[str]:
    """Names of schema files in ``directory`` that differ from the models (or are missing)."""
    rendered = render_schemas()
    stale = []
    for name, text in rendered.items():
        p = directory / name
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            stale.append(name)
    stale += [p.name for p in directory.glob("*.schema.json") if p.name not in rendered]
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.vocabulary",
        description="Generate or check the published JSON Schemas of the canonical vocabulary.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="DIR", type=Path, help="write the schemas into DIR")
    group.add_argument("--check", metavar="DIR", type=Path, help="exit 1 if DIR is out of date")
    args = parser.parse_args(argv)
    if args.write:
        for p in write_schemas(args.write):
            print(p)
        return 0
    stale = stale_schemas(args.check)
    if stale:
        print(
            f"{args.check}: out of date: {', '.join(stale)} "
            f"(run: python -m agent.vocabulary --write {args.check})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

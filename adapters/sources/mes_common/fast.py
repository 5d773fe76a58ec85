"""The fast pass: one MES record that is plainly valid -> its NewEvent, without pydantic.

Why: pydantic validation (the envelope model, then the type's data model with its Python
validators, then model_dump and the field-order pass of agent.vocabulary.validate_data)
cost about 22 us an event in the HTTP push, against 1 us for orjson.loads of the body;
MES push reached 0.2-0.3 of Buffer.append (issue 16, docs/performance.md). Most records an
MES sends are already canonical: strings without surrounding blanks, known units,
RFC 3339 times. For those, direct dict checks give the same NewEvent, field for field.

The fast pass only ever ACCEPTS. Anything it is not certain of (a number where a string
is expected, blanks to strip, a field kind it does not know, an unknown key, any doubt
about the time) makes it return None, and parse.py runs the detailed pydantic path, which
accepts or names every bad field exactly as before. So the contract (4xx naming the
field) cannot change; tests/adapters/test_mes_fast.py holds the fast pass to giving the
very NewEvent the detailed path gives, on fixed and on generated records.

The checkers are derived from the vocabulary's models when this module is imported, for
the field kinds below only; a model with any other required field kind, a non-None
default, an alias or a validator not listed here gets no fast pass at all.
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from annotated_types import MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agent.interfaces import NewEvent
from agent.vocabulary import (
    MES_TYPES,
    TYPES,
    UOM_CODES,
    UOM_PATTERN,
    Quantity,
    dataschema,
    default_subject,
)

#: the envelope keys MesEvent knows (extra="forbid": any other key is an error)
_ENVELOPE = frozenset(
    {
        "type",
        "time",
        "data",
        "subject",
        "correlationid",
        "id",
        "specversion",
        "source",
        "datacontenttype",
        "dataschema",
    }
)
#: the unit pattern without its anchors, for fullmatch (``$`` would let a final newline by)
_UOM = re.compile(UOM_PATTERN.removeprefix("^").removesuffix("$"))
#: ASCII digits only (\d would match other scripts' digits, which pydantic refuses)
_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_MISSING: Any = object()

# The field kinds the fast pass knows, as (kind, a, b) specs read by _data in one loop
# (no call per field): a string of a..b characters without surrounding blanks, one of a
# set of strings, a Quantity; UNKNOWN: only the detailed path can judge it.
STR, LITERAL, QUANTITY, UNKNOWN = range(4)
Spec = tuple[int, Any, Any]
_UNKNOWN: Spec = (UNKNOWN, None, None)
#: more characters than any string the vocabulary allows
_NO_LIMIT = 1 << 62


def _plain(s: str) -> bool:
    """No blanks for str_strip_whitespace to strip (and no doubt about what a blank is:
    pydantic and str.strip() disagree on a few control and non-ASCII characters)."""
    if not s:
        return True
    a, b = s[0], s[-1]
    return " " < a < "\x7f" and " " < b < "\x7f" or s == s.strip() and s.isascii()


@functools.lru_cache(maxsize=1024)
def fast_time(s: str) -> datetime | None:
    """An RFC 3339 time with an offset, as the detailed path would read it, or None."""
    if not _TIME.fullmatch(s):
        return None
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _units(extra: frozenset[str]) -> frozenset[str]:
    """The unit codes Quantity accepts unchanged: known or site codes, of the pattern."""
    return frozenset(c for c in (*UOM_CODES, *extra) if _UOM.fullmatch(c))


def _spec(annotation: Any, metadata: Iterable[Any]) -> tuple[Spec, bool] | None:
    """(spec, None allowed) for one field's annotation, or None: not a known kind."""
    optional = False
    meta = list(metadata)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1 or len(args) == len(typing.get_args(annotation)):
            return None
        optional = True
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        for m in extra:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        origin = typing.get_origin(annotation)
    if annotation is Quantity and not meta:
        return (QUANTITY, None, None), optional
    if origin is Literal and not meta:
        values = typing.get_args(annotation)
        if not all(type(x) is str for x in values):
            return None
        return (LITERAL, frozenset(values), None), optional
    if annotation is str:
        lo, hi = 0, _NO_LIMIT
        for m in meta:
            if isinstance(m, MinLen):
                lo = max(lo, m.min_length)
            elif isinstance(m, MaxLen):
                hi = min(hi, m.max_length)
            else:
                return None  # a pattern, a validator: the detailed path judges
        return (STR, lo, hi), optional
    return None


#: model validators whose rule the fast pass knows: name -> fields of which one must be set
_KNOWN_MODEL_RULES: dict[str, tuple[str, str]] = {
    "_some": ("good", "scrap"),
    "_who": ("machine", "work_center"),
}


class _DataCheck:
    """What the fast pass knows of one vocabulary model: its fields' specs and order."""

    __slots__ = ("index", "one_of", "required", "schema", "specs", "type")

    def __init__(
        self,
        type_: str,
        fields: list[tuple[str, Spec, bool]],
        one_of: list[tuple[str, str]],
    ) -> None:
        self.type = type_
        self.schema = dataschema(type_)
        # name -> (position, kind, a, b), in the model's field order
        self.specs = {name: (i, *spec) for i, (name, spec, _) in enumerate(fields)}
        self.index = {name: i for i, (name, _, _) in enumerate(fields)}
        self.required = frozenset(name for name, _, req in fields if req)
        self.one_of = one_of


def _data_check(type_: str, model: type[BaseModel]) -> _DataCheck | None:
    decorators = model.__pydantic_decorators__
    if (
        decorators.field_validators
        or decorators.validators
        or decorators.root_validators
        or decorators.field_serializers
        or decorators.model_serializers
        or decorators.computed_fields
        or model.model_config.get("extra") != "forbid"
    ):
        return None
    one_of = []
    for name, dec in decorators.model_validators.items():
        rule = _KNOWN_MODEL_RULES.get(name)
        if rule is None or dec.info.mode != "after":
            return None
        one_of.append(rule)
    fields: list[tuple[str, Spec, bool]] = []
    for name, info in model.model_fields.items():
        if info.alias is not None or info.serialization_alias is not None:
            return None
        if info.default_factory is not None:
            return None
        required = info.is_required()
        if not required and info.default is not None:
            return None
        kind = _spec(info.annotation, info.metadata)
        if kind is None:
            if required:
                return None
            fields.append((name, _UNKNOWN, False))
            continue
        spec, optional = kind
        if required and optional:
            return None  # a required field that may be null stays in data as null
        fields.append((name, spec, required))
    return _DataCheck(type_, fields, one_of)


#: the fast pass per MES event type (the types the agent makes are never accepted from an
#: MES: vocabulary.AGENT_MADE)
DATA_CHECKS: dict[str, _DataCheck] = {
    t: c for t in MES_TYPES if (c := _data_check(t, TYPES[t])) is not None
}
#: the envelope keys nearly every record has; the others are checked only when present
_COMMON = frozenset({"type", "time", "data", "subject", "correlationid", "id"})
#: NewEvent(...) without the keyword handling of a NamedTuple's __new__ (the same tuple)
_new_event = tuple.__new__


def _bad_id(v: Any) -> bool:
    """Not what MesEvent's optional Id (1 to 200 characters, stripped) gives unchanged."""
    return v is not None and (type(v) is not str or not 0 < len(v) <= 200 or not _plain(v))


def _data(check: _DataCheck, data: dict[str, Any], units: frozenset[str]) -> dict[str, Any] | None:
    """The normalised data, as validate_data gives it (field order, no nulls), or None."""
    specs = check.specs
    out: dict[str, Any] = {}
    last = -1
    ordered = True
    for name, v in data.items():
        spec = specs.get(name)
        if spec is None:
            return None  # an unknown field: the detailed path names it
        if v is None:
            continue  # left out, as model_dump(exclude_none) does; required: see below
        i, kind, a, b = spec
        if kind == STR:
            if type(v) is not str or not a <= len(v) <= b:
                return None
            if v and not (" " < v[0] < "\x7f" and " " < v[-1] < "\x7f") and not _plain(v):
                return None
        elif kind == QUANTITY:
            if type(v) is not dict or len(v) != 2:
                return None
            value = v.get("value")
            uom = v.get("uom")
            if type(value) is int:
                value = float(value)  # Number is a float: 480 is written 480.0
            elif type(value) is not float or not math.isfinite(value):
                return None
            if type(uom) is not str or uom not in units:
                return None
            v = {"value": value, "uom": uom}
        elif kind == LITERAL:
            if type(v) is not str or v not in a:
                return None
        else:
            return None
        out[name] = v
        if i < last:
            ordered = False
        last = i
    if not check.required <= out.keys():
        return None
    for x, y in check.one_of:
        if x not in out and y not in out:
            return None
    if not ordered:
        index = check.index
        out = {k: out[k] for k in sorted(out, key=index.__getitem__)}
    return out


def fast_events(items: Iterable[Any], extra_uom_codes: frozenset[str]) -> list[NewEvent | None]:
    """fast_event of each record (None where only the detailed path can say), in one loop."""
    units = _units(extra_uom_codes)
    checks = DATA_CHECKS
    out: list[NewEvent | None] = []
    append = out.append
    for c in items:
        append(_one(c, checks, units))
    return out


def fast_event(c: Any, extra_uom_codes: frozenset[str]) -> NewEvent | None:
    """The NewEvent of canonical record ``c``, or None when only the detailed path can say."""
    return _one(c, DATA_CHECKS, _units(extra_uom_codes))


def _one(c: Any, checks: dict[str, _DataCheck], units: frozenset[str]) -> NewEvent | None:
    if type(c) is not dict:
        return None
    keys = c.keys()
    if not keys <= _ENVELOPE:
        return None
    type_ = c.get("type")
    if type(type_) is not str:
        return None
    check = checks.get(type_)
    if check is None:
        return None
    t = c.get("time")
    when = fast_time(t) if type(t) is str else None
    data = c.get("data")
    if when is None or type(data) is not dict:
        return None
    eid = c.get("id")
    subject = c.get("subject")
    correlationid = c.get("correlationid")
    if eid is not None and not (
        type(eid) is str
        and 0 < len(eid) <= 200
        and " " < eid[0] < "\x7f"
        and " " < eid[-1] < "\x7f"
    ):  # the usual MES id in one expression; anything else as MesEvent reads it
        if _bad_id(eid):
            return None
    if subject is not None and _bad_id(subject):
        return None
    if correlationid is not None and _bad_id(correlationid):
        return None
    if not keys <= _COMMON:
        # the tolerated CloudEvents attributes, as MesEvent reads them (the agent sets
        # its own source)
        if c.get("specversion") not in (None, "1.0"):
            return None
        if c.get("datacontenttype") not in (None, "application/json"):
            return None
        source = c.get("source")
        if source is not None and type(source) is not str:
            return None
        schema = c.get("dataschema")
        if schema is not None and schema != check.schema:
            return None
    valid = _data(check, data, units)
    if valid is None:
        return None
    if subject is None:
        subject = default_subject(type_, valid)
    return _new_event(NewEvent, (type_, valid, when, subject, correlationid, check.schema, eid))

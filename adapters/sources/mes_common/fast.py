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
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Literal

from annotated_types import MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agent.interfaces import NewEvent
from agent.vocabulary import (
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

#: a checker takes the value and the extra unit codes; it returns the normalised value or
#: _MISSING when the fast pass is not certain
Check = Callable[[Any, frozenset[str]], Any]


def _plain(s: str) -> bool:
    """No blanks for str_strip_whitespace to strip (and no doubt about what a blank is)."""
    if not s:
        return True
    a, b = s[0], s[-1]
    return a > " " and b > " " and a < "\x7f" and b < "\x7f" or s == s.strip() and s.isascii()


@functools.lru_cache(maxsize=1024)
def fast_time(s: str) -> datetime | None:
    """An RFC 3339 time with an offset, as the detailed path would read it, or None."""
    if not _TIME.fullmatch(s):
        return None
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        return None


def _id_like(lo: int, hi: int | None) -> Check:
    def check(v: Any, _extra: frozenset[str]) -> Any:
        if type(v) is not str or not _plain(v):
            return _MISSING
        n = len(v)
        if n < lo or (hi is not None and n > hi):
            return _MISSING
        return v

    return check


def _literal(values: tuple[Any, ...]) -> Check | None:
    if not all(type(x) is str for x in values):
        return None
    allowed = frozenset(values)

    def check(v: Any, _extra: frozenset[str]) -> Any:
        return v if type(v) is str and v in allowed else _MISSING

    return check


def _quantity(v: Any, extra: frozenset[str]) -> Any:
    if type(v) is not dict or len(v) != 2:
        return _MISSING
    value = v.get("value", _MISSING)
    uom = v.get("uom", _MISSING)
    if type(value) is int:
        value = float(value)
    elif type(value) is not float or not math.isfinite(value):
        return _MISSING
    if type(uom) is not str or not (uom in UOM_CODES or uom in extra) or not _UOM.fullmatch(uom):
        return _MISSING
    return {"value": value, "uom": uom}


def _checker(annotation: Any, metadata: Iterable[Any]) -> tuple[Check, bool] | None:
    """(checker, None allowed) for one field's annotation, or None: not a known kind."""
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
        return _quantity, optional
    if origin is Literal and not meta:
        lit = _literal(typing.get_args(annotation))
        return (lit, optional) if lit else None
    if annotation is str:
        lo, hi = 0, None
        for m in meta:
            if isinstance(m, MinLen):
                lo = max(lo, m.min_length)
            elif isinstance(m, MaxLen):
                hi = m.max_length if hi is None else min(hi, m.max_length)
            else:
                return None  # a pattern, a validator: the detailed path judges
        return _id_like(lo, hi), optional
    return None


#: model validators whose rule the fast pass knows: name -> fields of which one must be set
_KNOWN_MODEL_RULES: dict[str, tuple[str, str]] = {
    "_some": ("good", "scrap"),
    "_who": ("machine", "work_center"),
}


class _DataCheck:
    """The fast pass of one vocabulary model's data.

    It walks the record's keys (a few) rather than the model's fields (a dozen); the
    output keeps the model's field order, as model_dump would write it."""

    __slots__ = ("index", "one_of", "required", "specs")

    def __init__(
        self,
        fields: list[tuple[str, Check | None, bool]],
        one_of: list[tuple[str, str]],
    ) -> None:
        # name -> (position, checker or None: a kind only the detailed path knows)
        self.specs = {name: (i, check) for i, (name, check, _) in enumerate(fields)}
        self.index = {name: i for i, (name, _, _) in enumerate(fields)}
        self.required = frozenset(name for name, _, req in fields if req)
        self.one_of = one_of

    def __call__(self, data: dict[str, Any], extra: frozenset[str]) -> dict[str, Any] | None:
        specs = self.specs
        out: dict[str, Any] = {}
        last = -1
        ordered = True
        for name, v in data.items():
            spec = specs.get(name)
            if spec is None:
                return None  # an unknown field: the detailed path names it
            if v is None:
                continue  # left out, as model_dump(exclude_none) does; required: see below
            i, check = spec
            if check is None:
                return None
            v = check(v, extra)
            if v is _MISSING:
                return None
            out[name] = v
            if i < last:
                ordered = False
            last = i
        if not self.required <= out.keys():
            return None
        for a, b in self.one_of:
            if a not in out and b not in out:
                return None
        if not ordered:
            index = self.index
            out = {k: out[k] for k in sorted(out, key=index.__getitem__)}
        return out


def _data_check(model: type[BaseModel]) -> _DataCheck | None:
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
    fields: list[tuple[str, Check | None, bool]] = []
    for name, info in model.model_fields.items():
        if info.alias is not None or info.serialization_alias is not None:
            return None
        if info.default_factory is not None:
            return None
        required = info.is_required()
        if not required and info.default is not None:
            return None
        kind = _checker(info.annotation, info.metadata)
        if kind is None:
            if required:
                return None
            fields.append((name, None, False))
            continue
        check, optional = kind
        if required and optional:
            return None  # a required field that may be null stays in data as null
        fields.append((name, check, required))
    return _DataCheck(fields, one_of)


#: the fast pass per MES event type (the agent's own types are never accepted from outside)
DATA_CHECKS: dict[str, _DataCheck] = {
    t: c
    for t, m in TYPES.items()
    if not t.startswith("mfg.agent.") and (c := _data_check(m)) is not None
}
_SCHEMAS = {t: dataschema(t) for t in DATA_CHECKS}
#: the envelope keys nearly every record has; the others are checked only when present
_COMMON = frozenset({"type", "time", "data", "subject", "correlationid", "id"})
#: NewEvent(...) without the keyword parsing of a NamedTuple's __new__ (same tuple)
_new_event = tuple.__new__


def _bad_id(v: Any) -> bool:
    """Not what MesEvent's optional Id (1 to 200 characters, stripped) gives unchanged."""
    return v is not None and (type(v) is not str or not 0 < len(v) <= 200 or not _plain(v))


def fast_event(c: dict[str, Any], extra_uom_codes: frozenset[str]) -> NewEvent | None:
    """The NewEvent of canonical record ``c``, or None when only the detailed path can say."""
    keys = c.keys()
    if not keys <= _ENVELOPE:
        return None
    type_ = c.get("type")
    if type(type_) is not str:
        return None
    check = DATA_CHECKS.get(type_)
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
    if _bad_id(eid) or _bad_id(subject) or _bad_id(correlationid):
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
        if schema is not None and schema != _SCHEMAS[type_]:
            return None
    valid = check(data, extra_uom_codes)
    if valid is None:
        return None
    if subject is None:
        subject = default_subject(type_, valid)
    return _new_event(NewEvent, (type_, valid, when, subject, correlationid, _SCHEMAS[type_], eid))

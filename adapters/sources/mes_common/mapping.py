"""Per-channel field mapping: an MES's own field names -> the canonical event fields.

One model serves every MES channel: the HTTP endpoint (JSON objects), the drop folder (a CSV
row is a flat object keyed by column name) and the MQTT source (a JSON payload, with the
event type often implied by the topic: pass it as a run-time constant). See README.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator

from agent.config import Model
from agent.vocabulary import MES_TYPES

#: Canonical top-level fields a mapping may write, besides anything under "data.".
ENVELOPE_FIELDS = ("type", "time", "subject", "correlationid", "id")

_MISSING: Any = object()


def check_target(path: str) -> str:
    """A mapping target must be an envelope field or a path under ``data``."""
    if path in ENVELOPE_FIELDS:
        return path
    if path.startswith("data.") and all(path[5:].split(".")):
        return path
    raise ValueError(
        f"'{path}' is not a canonical field (use one of {', '.join(ENVELOPE_FIELDS)} "
        "or data.<field>, e.g. data.work_order, data.good.uom)"
    )


class FieldMapping(Model):
    """How one channel's MES records become canonical events (all keys optional).

    ``fields``     MES field (dotted path, or a CSV column name) -> canonical path
    ``constants``  canonical path -> value set on every event (overrides the input)
    ``values``     canonical path -> {MES value: canonical value}, e.g. state codes
    ``unmapped``   "keep": fields not named in ``fields`` are taken as already canonical
                   (so an MES that already speaks the vocabulary needs no mapping), and
                   unknown ones are rejected; "drop": they are ignored.
    """

    fields: dict[str, str] = Field(default_factory=dict)
    constants: dict[str, Any] = Field(default_factory=dict)
    values: dict[str, dict[str, Any]] = Field(default_factory=dict)
    unmapped: Literal["keep", "drop"] = "keep"

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for src, dst in v.items():
            if not src:
                raise ValueError("an empty MES field name cannot be mapped")
            check_target(dst)
            if dst in seen:
                raise ValueError(
                    f"'{seen[dst]}' and '{src}' both map to '{dst}' (map each target once)"
                )
            seen[dst] = src
        return v

    @field_validator("constants", "values")
    @classmethod
    def _targets(cls, v: dict[str, Any]) -> dict[str, Any]:
        for dst in v:
            check_target(dst)
        return v

    @field_validator("constants")
    @classmethod
    def _type_constant(cls, v: dict[str, Any]) -> dict[str, Any]:
        t = v.get("type")
        if t is not None and t not in MES_TYPES:
            names = ", ".join(MES_TYPES)
            raise ValueError(f"type '{t}' is not a canonical MES event type (one of: {names})")
        return v

    @property
    def is_identity(self) -> bool:
        """True when records are already canonical: nothing renamed, translated or set."""
        return not (self.fields or self.values or self.constants) and self.unmapped == "keep"

    def source_of(self, canonical: str) -> str | None:
        """The MES field that feeds ``canonical`` (or one of its parents), for messages."""
        rev = {dst: src for src, dst in self.fields.items()}
        path = canonical
        while path:
            if path in rev:
                rest = canonical[len(path) :]
                return rev[path] + rest
            path = path.rpartition(".")[0]
        return None


_IDENTITY = FieldMapping()

# --------------------------------------------------------------------------- dotted paths


def get_path(obj: Any, path: str) -> Any:
    """Value at ``path`` in nested objects, or _MISSING. An exact key wins over nesting, so
    a CSV column literally named "a.b" is found; list items by number ("lines.0.qty")."""
    if isinstance(obj, Mapping):
        if path in obj:
            return obj[path]
        head, dot, rest = path.partition(".")
        while dot:
            if head in obj:
                found = get_path(obj[head], rest)
                if found is not _MISSING:
                    return found
            nxt, dot, rest = rest.partition(".")
            head = f"{head}.{nxt}"
        return _MISSING
    if isinstance(obj, list):
        head, _, rest = path.partition(".")
        if head.isdigit() and int(head) < len(obj):
            return obj[int(head)] if not rest else get_path(obj[int(head)], rest)
    return _MISSING


def set_path(obj: dict[str, Any], path: str, value: Any) -> str | None:
    """Set ``path`` creating objects on the way; returns an error message on a conflict."""
    parts = path.split(".")
    node = obj
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            return f"cannot set {path}: {'.'.join(parts[: i + 1])} is not an object"
        node = nxt
    node[parts[-1]] = value
    return None


def _delete_path(obj: Any, path: str) -> None:
    if not isinstance(obj, dict):
        return
    if path in obj:
        del obj[path]
        return
    head, dot, rest = path.partition(".")
    while dot:
        if head in obj and isinstance(obj[head], dict):
            _delete_path(obj[head], rest)
            if not obj[head]:
                del obj[head]  # a parent emptied by mapping is not an unknown field
            return
        nxt, dot, rest = rest.partition(".")
        head = f"{head}.{nxt}"


def apply_mapping(
    obj: Mapping[str, Any],
    mapping: FieldMapping | None,
    constants: Mapping[str, Any] | None = None,
    *,
    drop_empty: bool = False,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Build the canonical object from an MES record. Returns (object, conflicts).

    Order: unmapped fields (if kept; top-level keys with dots such as a CSV column
    "data.good.uom" are expanded), then mapped fields, then value translations, then
    ``mapping.constants``, then run-time ``constants`` (e.g. the type from an MQTT topic).
    ``drop_empty`` treats "" as absent (CSV cells).
    """
    m = mapping or _IDENTITY
    if (
        not (m.fields or m.values or m.constants or constants)
        and m.unmapped == "keep"
        and not any("." in k for k in obj)
    ):
        # Already canonical (the common case for HTTP): nothing is written into nested
        # objects, so a shallow copy suffices and the input is never mutated.
        if drop_empty:
            return {k: v for k, v in obj.items() if v != ""}, []
        return dict(obj), []
    errors: list[tuple[str, str]] = []
    out: dict[str, Any] = {}

    def put(path: str, value: Any, where: str) -> None:
        if drop_empty and value == "":
            return
        problem = set_path(out, path, value)
        if problem:
            errors.append((where, problem))

    if m.unmapped == "keep":
        rest: dict[str, Any] = copy.deepcopy(dict(obj))
        for src in m.fields:
            _delete_path(rest, src)
        for key, value in rest.items():
            if "." in key:
                put(key, value, key)
            elif drop_empty and value == "":
                continue
            elif isinstance(out.get(key), dict) and isinstance(value, dict):
                out[key].update(value)
            else:
                out[key] = value
    for src, dst in m.fields.items():
        value = get_path(obj, src)
        if value is not _MISSING:
            put(dst, copy.deepcopy(value), src)
    for dst, table in m.values.items():
        value = get_path(out, dst)
        if value is not _MISSING and isinstance(value, str | int | float | bool):
            key = str(value).lower() if isinstance(value, bool) else str(value)
            if key in table:
                put(dst, table[key], dst)
    for dst, value in m.constants.items():
        put(dst, copy.deepcopy(value), dst)
    for dst, value in (constants or {}).items():
        put(dst, copy.deepcopy(value), dst)
    return out, errors

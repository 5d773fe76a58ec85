"""Unified namespace (ISA-95 topic tree) value payloads -> ``mfg.signal.sampled``.

A subscription with ``topic_template = "{enterprise}/{site}/{area}/{line}/{cell}/{tag}"``
names the levels of the topics it receives. Each message is one value of one signal:

* payload ``{"value": 1.2, "timestamp": 1764590400123, "unit": "°C", "quality": "good"}``
  (``timestamp`` also ``time``/``ts``: epoch ms, epoch s, or RFC 3339; ``unit`` also
  ``uom``; ``quality`` good/uncertain/bad), or a bare JSON value (``1.2``, ``"RUN"``,
  ``true``), or text that is not JSON (kept as a string);
* ``subject`` and ``node_id`` = the topic; ``time`` = the payload's timestamp, else the
  time of receipt;
* the named levels fill the event's location: ``site``/``plant`` -> plant, ``area``,
  ``line``, ``cell``/``work_center`` -> work_center, ``machine``; every other name
  (``enterprise``, ``tag``, ...) goes to ``attributes``;
* ``stream = "{site}.{line}"`` on the subscription puts its events in a stream named from
  the levels (characters a stream name cannot have become ``-``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson

from adapters.units import uom_code
from agent.interfaces import NewEvent
from agent.vocabulary import VocabularyError, validate_data

_LOCATION = {
    "site": "plant",
    "plant": "plant",
    "area": "area",
    "line": "line",
    "cell": "work_center",
    "work_center": "work_center",
    "machine": "machine",
}
_STATUS = {
    "good": {"code": 0, "name": "Good"},
    "uncertain": {"code": 0x40000000, "name": "Uncertain"},
    "bad": {"code": 0x80000000, "name": "Bad"},
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STREAM_BAD = re.compile(r"[^A-Za-z0-9_.-]")


class UnsError(Exception):
    def __init__(self, reason: str, text: str) -> None:
        self.reason, self.text = reason, text
        super().__init__(text)


def check_template(template: str) -> list[str | None]:
    """The level names of a template (None for a literal level); ValueError if malformed."""
    names: list[str | None] = []
    for level in template.split("/"):
        m = _PLACEHOLDER.fullmatch(level)
        if m:
            if m.group(1) in names:
                raise ValueError(f"level name {{{m.group(1)}}} is used twice")
            names.append(m.group(1))
        elif "{" in level or "}" in level or level in ("+", "#"):
            raise ValueError(f"level {level!r}: write a whole level as {{name}}, or a literal")
        else:
            names.append(None)
    if not any(names):
        raise ValueError("name at least one level, e.g. {site}/{line}/{tag}")
    return names


def levels(template: str, topic: str) -> dict[str, str]:
    """Name the topic's levels; the last named level takes the rest of a longer topic."""
    names = template.split("/")
    parts = topic.split("/")
    if len(parts) < len(names):
        raise UnsError(
            "template_mismatch", f"topic has {len(parts)} levels, the template {len(names)}"
        )
    if len(parts) > len(names):
        parts = [*parts[: len(names) - 1], "/".join(parts[len(names) - 1 :])]
    out: dict[str, str] = {}
    for name, part in zip(names, parts, strict=True):
        m = _PLACEHOLDER.fullmatch(name)
        if m:
            out[m.group(1)] = part
        elif name != part:
            raise UnsError("template_mismatch", f"level {part!r} is not {name!r} of the template")
    return out


def stream_name(template: str, named: dict[str, str]) -> str:
    try:
        raw = template.format(**named)
    except KeyError as exc:
        raise UnsError("template_mismatch", f"stream names level {exc} the topic lacks") from None
    return _STREAM_BAD.sub("-", raw)[:64].lstrip("-._") or "uns"


def _time(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        seconds = v / 1000 if v > 1e11 else v
        return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise UnsError("bad_timestamp", f"timestamp {v!r} is not RFC 3339 or epoch") from None
        if dt.tzinfo is None:
            raise UnsError("bad_timestamp", f"timestamp {v!r} has no UTC offset")
        return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")
    raise UnsError("bad_timestamp", "timestamp must be a number or RFC 3339 text")


def value_event(template: str, topic: str, payload: bytes, received: datetime) -> NewEvent:
    named = levels(template, topic)
    try:
        body: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            body = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UnsError("not_utf8", "payload is neither JSON nor UTF-8 text") from None
    when, quality, unit = None, "good", None
    if isinstance(body, dict):
        if "value" not in body:
            raise UnsError("no_value", 'a JSON object payload needs "value"')
        for key in ("timestamp", "time", "ts"):
            if key in body:
                when = _time(body[key])
                break
        q = body.get("quality")
        if q is not None:
            if not isinstance(q, str) or q.lower() not in _STATUS:
                raise UnsError("bad_quality", "quality must be good, uncertain or bad")
            quality = q.lower()
        u = body.get("unit", body.get("uom"))
        unit = u if isinstance(u, str) and u.strip() else None
        value = body["value"]
    else:
        value = body
    data: dict[str, Any] = {
        "node_id": topic,
        "value": value,
        "status_code": _STATUS[quality],
    }
    if when:
        data["source_timestamp"] = when
        data["time_basis"] = "source"
    else:
        when = received.astimezone(UTC).isoformat().replace("+00:00", "Z")
        data["time_basis"] = "received"
    data |= {
        "protocol": "mqtt",
        "quality": quality,
    }
    if unit:
        code = uom_code(unit)
        if code:
            data["uom"] = code
        data["engineering_unit"] = unit
    attributes: dict[str, str] = {}
    for name, part in named.items():
        field = _LOCATION.get(name)
        if field is not None and field not in data:
            data[field] = part
        else:
            attributes[name] = part
    if attributes:
        data["attributes"] = attributes
    try:
        clean = validate_data("mfg.signal.sampled", data)
    except VocabularyError as exc:
        raise UnsError("invalid", str(exc)) from None
    return NewEvent("mfg.signal.sampled", clean, when, subject=topic)

"""Config files written for people: `config sample` and `config show`.

The sample is assembled from the files that already document every key, so it cannot
drift from them: config/example.toml for the core sections, each adapter's sample.toml
for its table. `show` prints the validated model, so every default is visible, and a
secret only as "**********".
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

from agent import registry
from agent.config import Config
from agent.errors import ConfigError, EdgeAgentError

#: where config/example.toml's own sink and source tables start
_SINKS_MARK = (
    "## ---------------------------------------------------------------------------- sinks"
)
DEFAULT_TYPES = ("sink:https", "source:mes_http")


def _example() -> str:
    here = Path(__file__).resolve().parent.parent / "config" / "example.toml"
    try:
        return here.read_text(encoding="utf-8")
    except OSError as exc:
        raise EdgeAgentError(
            f"cannot read {here}, the source of the sample ({exc.strerror}): this install "
            "lacks config/example.toml"
        ) from None


def _sample_of(kind: str, type_: str) -> str:
    package = registry.module(kind, type_).__name__
    return (importlib.resources.files(package) / "sample.toml").read_text(encoding="utf-8")


def _resolve(name: str) -> tuple[str, str]:
    """'opcua' -> ('sources', 'opcua'); 'sink:mqtt' -> ('sinks', 'mqtt')."""
    kind_word, _, type_ = name.rpartition(":")
    kinds = {"sink": "sinks", "sinks": "sinks", "source": "sources", "sources": "sources"}
    if kind_word:
        if kind_word not in kinds:
            raise ConfigError("", f"'{name}': say sink:TYPE or source:TYPE")
        kind = kinds[kind_word]
        if type_ not in registry.known(kind):
            raise ConfigError(
                "", f"no {kind[:-1]} type '{type_}' (one of: {', '.join(registry.known(kind))})"
            )
        return kind, type_
    found = [k for k in ("sinks", "sources") if name in registry.known(k)]
    if not found:
        every = sorted({*registry.known("sinks"), *registry.known("sources")})
        raise ConfigError("", f"no adapter type '{name}' (one of: {', '.join(every)})")
    if len(found) > 1:
        raise ConfigError("", f"'{name}' is a sink and a source: say sink:{name} or source:{name}")
    return found[0], name


def sample(types: tuple[str, ...] | list[str]) -> str:
    """A complete commented config with a table for each adapter type named."""
    chosen = [_resolve(t) for t in (types or DEFAULT_TYPES)]
    if not any(kind == "sinks" for kind, _ in chosen):
        chosen.insert(0, ("sinks", "https"))  # a config without a sink does not run
    core = _example().split(_SINKS_MARK, 1)[0].rstrip() + "\n"
    parts = [core]
    taken: set[str] = set()
    for kind in ("sinks", "sources"):
        heading = "sink" if kind == "sinks" else "source"
        parts.append(f"\n## {'-' * 76} {kind}\n")
        for k, type_ in dict.fromkeys(chosen):
            if k != kind:
                continue
            text = _sample_of(kind, type_)
            for name in dict.fromkeys(re.findall(rf"^\[+{kind}\.([A-Za-z0-9_-]+)", text, re.M)):
                if f"{kind}.{name}" in taken:  # two samples use the same table name
                    new = f"{name}_{type_}"
                    text = re.sub(rf"^(\[+{kind}\.){name}\b", rf"\g<1>{new}", text, flags=re.M)
                    name = new
                taken.add(f"{kind}.{name}")
            parts.append(f"\n## {heading} type {type_!r}\n{text.rstrip()}\n")
    return "".join(parts)


# ---------------------------------------------------------------------------- show


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value).__name__)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit(table: dict[str, Any], path: str, out: list[str]) -> None:
    subtables = []
    for k, v in table.items():
        if isinstance(v, dict) or _is_table_list(v):
            subtables.append((k, v))
        elif v is None:
            out.append(f"# {_key(k)} is not set")
        else:
            out.append(f"{_key(k)} = {_toml_value(v)}")
    for k, v in subtables:
        sub = f"{path}.{_key(k)}" if path else _key(k)
        if isinstance(v, list):
            for item in v:
                out.append(f"\n[[{sub}]]")
                _emit(item, sub, out)
        else:
            only_tables = v and all(isinstance(x, dict) or _is_table_list(x) for x in v.values())
            if not only_tables:  # [sinks] above [sinks.central] says nothing
                out.append(f"\n[{sub}]")
            _emit(v, sub, out)


def effective(cfg: Config, *, as_json: bool = False) -> str:
    """The validated config with every default, secrets shown as "**********"."""
    doc = cfg.model_dump(mode="json")
    doc["sinks"] = {n: s.model_dump(mode="json") for n, s in cfg.sinks.items()}
    doc["sources"] = {n: s.model_dump(mode="json") for n, s in cfg.sources.items()}
    if as_json:
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    out = [
        "## The effective config: every key with its value, defaults filled in; durations in",
        "## seconds, sizes in bytes. Secrets are shown as **********.",
    ]
    _emit(doc, "", out)
    return "\n".join(out).lstrip("\n") + "\n"

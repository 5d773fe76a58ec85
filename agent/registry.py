"""Which adapter a ``type = "..."`` names, and which commands live beside the adapters.

The core never imports ``adapters`` (or the reference ``gateway``): the distributions
that provide them declare entry points, and this module only reads those declarations.
So ``agent`` depends on nothing but its own interfaces, an adapter can live in another
distribution without touching the core, and there is no import cycle (the adapters import
``agent``, never the reverse). The entry-point groups, declared in pyproject.toml:

    edge_agent.sources    type -> a package exporting ``Config`` and ``build(name, config, ctx)``
    edge_agent.sinks      the same for sinks
    edge_agent.commands   name -> a click command, ``edge-agent NAME`` (``module:attribute``)

Packages are imported only when a config names them, so an agent that uses only HTTPS
never imports asyncua. The PyInstaller binary ships the distribution's metadata (the
entry points) and every adapter module as a hidden import (packaging/edge-agent.spec).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.errors import ConfigError, EdgeAgentError

GROUPS: dict[str, str] = {
    "sources": "edge_agent.sources",
    "sinks": "edge_agent.sinks",
    "commands": "edge_agent.commands",
}


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What every adapter may need from the agent besides its own config."""

    agent_id: str
    plant: str
    #: directory next to the buffer file for adapter state (PKI, certificates)
    state_dir: Path
    version: str
    #: the forwarder's longest pauses between retries (a sink that deduplicates within a
    #: window, like NATS JetStream, checks the window covers them)
    backoff_max: float = 15.0
    auth_retry_interval: float = 60.0


@functools.cache
def _installed() -> tuple[EntryPoint, ...]:
    """The entry points of our groups, read once: each read walks every distribution's
    metadata (tens of milliseconds), and a config load needs two groups."""
    everything = entry_points()
    return tuple(ep for group in GROUPS.values() for ep in everything.select(group=group))


@functools.cache
def _table(group: str) -> dict[str, EntryPoint]:
    """Name -> entry point, sorted by name; the first distribution on sys.path wins a name."""
    found: dict[str, EntryPoint] = {}
    for ep in (ep for ep in _installed() if ep.group == GROUPS[group]):
        found.setdefault(ep.name, ep)
    if group != "commands" and not found:
        raise EdgeAgentError(
            f"no {group[:-1]} adapters are installed (no entry points in group "
            f"{GROUPS[group]!r}): reinstall edge-agent (pip install -e . in a checkout)"
        )
    return dict(sorted(found.items()))


def known(kind: str) -> list[str]:
    """The adapter types of a kind ("sources" or "sinks"), sorted."""
    return list(_table(kind))


def module(kind: str, type_: str, path: str = "") -> ModuleType:
    table = _table(kind)
    if type_ not in table:
        raise ConfigError(
            f"{path}.type" if path else "type",
            f"unknown {kind[:-1]} type '{type_}' (one of: {', '.join(table)})",
        )
    return importlib.import_module(table[type_].value)


def config_model(kind: str, type_: str, path: str = "") -> Any:
    return module(kind, type_, path).Config


def build(kind: str, name: str, config: Any, ctx: AdapterContext) -> Any:
    return module(kind, config.type).build(name, config, ctx)


def command_names() -> list[str]:
    """The ``edge-agent`` commands that adapters (and the reference gateway) provide."""
    return list(_table("commands"))


def command(name: str) -> Any | None:
    """The click command of that name, imported now; None when no distribution has it."""
    ep = _table("commands").get(name)
    return None if ep is None else ep.load()

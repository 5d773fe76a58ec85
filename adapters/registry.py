"""Which adapter a ``type = "..."`` names.

Each adapter is a package exporting ``Config`` (a pydantic model subclassing
``agent.config.SourceConfig`` or ``SinkConfig``) and ``build(name, config, ctx)``
returning a Source or a Sink. Packages are imported only when a config names them,
so an agent that uses only HTTPS never imports asyncua.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.errors import ConfigError

SOURCES: dict[str, str] = {
    "simulator": "adapters.sources.simulator",
    "opcua": "adapters.sources.opcua",
    "mes_http": "adapters.sources.mes_http",
    "drop_folder": "adapters.sources.drop_folder",
    "mqtt": "adapters.sources.mqtt",
    "sparkplug": "adapters.sources.sparkplug",
}

SINKS: dict[str, str] = {
    "https": "adapters.sinks.https",
    "mqtt": "adapters.sinks.mqtt",
    "nats": "adapters.sinks.nats",
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


def known(kind: str) -> list[str]:
    return list((SOURCES if kind == "sources" else SINKS).keys())


def module(kind: str, type_: str, path: str = "") -> ModuleType:
    table = SOURCES if kind == "sources" else SINKS
    if type_ not in table:
        raise ConfigError(
            f"{path}.type" if path else "type",
            f"unknown {kind[:-1]} type '{type_}' (one of: {', '.join(table)})",
        )
    return importlib.import_module(table[type_])


def config_model(kind: str, type_: str, path: str = "") -> Any:
    return module(kind, type_, path).Config


def build(kind: str, name: str, config: Any, ctx: AdapterContext) -> Any:
    return module(kind, config.type).build(name, config, ctx)

"""HTTPS sink: POSTs each batch to the central gateway (the contract's HTTPS binding)."""

from __future__ import annotations

from adapters.sinks.https.config import HttpsSinkConfig as Config
from adapters.sinks.https.sink import HttpsSink
from agent.registry import AdapterContext

__all__ = ["Config", "HttpsSink", "build"]


def build(name: str, config: Config, ctx: AdapterContext) -> HttpsSink:
    return HttpsSink(name, config)

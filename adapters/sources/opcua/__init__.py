"""OPC UA source: subscriptions to a server's nodes, committed to the buffer in groups.

Config   the [sources.NAME] table (type = "opcua"), see sample.toml
build()  the Source for the runtime
cli      ``edge-agent opcua endpoints|browse|read|test|trust|gen-cert``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Config

if TYPE_CHECKING:
    from agent.registry import AdapterContext

    from .source import OpcUaSource

__all__ = ["Config", "build"]


def build(name: str, config: Config, ctx: AdapterContext) -> OpcUaSource:
    from .source import OpcUaSource

    return OpcUaSource(name, config, stream=config.stream or name, state_dir=ctx.state_dir)

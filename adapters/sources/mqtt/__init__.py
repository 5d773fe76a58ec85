"""MQTT source: the plant's local broker (unified namespace) into canonical MES events.

QoS 1 with manual acknowledgement: the PUBACK leaves only after the events are committed,
and a persistent session keeps what arrives while the agent is down. See README.md.
"""

from __future__ import annotations

from agent.registry import AdapterContext

from .config import Config
from .source import MqttSource

__all__ = ["Config", "MqttSource", "build"]


def build(name: str, config: Config, ctx: AdapterContext) -> MqttSource:
    return MqttSource(name, config, ctx)

"""Simulated production line: the demo's source, and a source of known rate for tests."""

from __future__ import annotations

from adapters.sources.simulator.config import SimulatorConfig as Config
from adapters.sources.simulator.source import SimulatorSource
from agent.registry import AdapterContext

__all__ = ["Config", "SimulatorSource", "build"]


def build(name: str, config: Config, ctx: AdapterContext) -> SimulatorSource:
    return SimulatorSource(name, config.stream or name, config)

"""Sparkplug B 3.0 primary host application: ``[sources.NAME]`` with ``type = "sparkplug"``.

Births, data and deaths from the plant's broker into ``mfg.signal.sampled`` and
``mfg.sparkplug.state_changed`` events; STATE offline while the buffer refuses events.
See docs/sparkplug.md.
"""

from __future__ import annotations

from agent.registry import AdapterContext

from .config import Config
from .source import SparkplugSource

__all__ = ["Config", "SparkplugSource", "build"]


def build(name: str, config: Config, ctx: AdapterContext) -> SparkplugSource:
    return SparkplugSource(name, config, ctx)

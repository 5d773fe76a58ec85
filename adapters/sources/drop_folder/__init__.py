"""Drop folder source: JSON Lines and CSV files an MES drops into a directory.

A file is imported whole or not at all, then moved to processed/ (or to rejected/ with a
report naming each bad line). See README.md and sample.toml.
"""

from __future__ import annotations

from agent.registry import AdapterContext

from .config import Config
from .source import DropFolderSource

__all__ = ["Config", "DropFolderSource", "build"]


def build(name: str, config: Config, ctx: AdapterContext) -> DropFolderSource:
    return DropFolderSource(name, config, ctx)

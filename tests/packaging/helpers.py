"""Shared by the packaging tests (kept out of conftest.py so tests can import it)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def require_tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found: install it with `{install}`")
    return path

"""The core does not import the adapters, nor the reference gateway.

``agent/`` is the core; ``adapters/`` (sources and sinks) and ``gateway/`` (a separate
program for the central side) build on it. The core finds adapters and their commands
through the entry points pyproject.toml declares (agent/registry.py), never by importing
them, so there is no cycle. This walks the syntax tree of every agent/**/*.py: an import
at any depth (inside a function too), or a module path written as a string for a dynamic
import, is a failure. The second half checks that the entry points name every adapter in
the tree, and that each loads.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from agent import registry

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_THE_CORE = ("adapters", "gateway")
#: "adapters.sources.opcua", "gateway.cli:gateway", "adapters:x": module paths in strings
MODULE_PATH = re.compile(r"^(adapters|gateway)((\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?|:[A-Za-z_]\w*)$")
DYNAMIC_IMPORTS = {"import_module", "__import__", "find_spec"}


def _outside(name: str) -> bool:
    return name.split(".")[0] in OUTSIDE_THE_CORE


def _is_module(dotted: str) -> bool:
    """Whether "a.b.c" (before any ":attr") is a module of this tree, not "gateway.sqlite3"."""
    path = ROOT.joinpath(*dotted.partition(":")[0].split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(source: str, filename: str) -> Iterator[str]:
    """Every place in one module's source that imports adapters/ or gateway/."""
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _outside(alias.name):
                    yield f"{where}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and _outside(node.module):
                yield f"{where}: from {node.module} import ..."
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if MODULE_PATH.match(node.value) and _is_module(node.value):
                yield f"{where}: module path {node.value!r} as a string (a dynamic import)"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                name in DYNAMIC_IMPORTS
                and isinstance(first, ast.Constant)
                and first.value in OUTSIDE_THE_CORE
            ):
                yield f"{where}: {name}({first.value!r})"


def test_no_core_module_imports_the_adapters_or_the_gateway() -> None:
    files = sorted((ROOT / "agent").rglob("*.py"))
    assert len(files) > 20, files  # the walk really sees the core
    found = [
        v
        for path in files
        for v in violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert not found, "the core must not import adapters/ or gateway/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import adapters.sources.opcua",
        "from adapters import registry",
        "from gateway.cli import gateway",
        "def f():\n    if True:\n        from adapters.sinks.https import build\n",
        "class C:\n    def m(self):\n        import gateway\n",
        "TABLE = {'opcua': 'adapters.sources.opcua.cli:opcua'}",
        "import importlib\nimportlib.import_module('adapters')",
        "__import__('gateway')",
    ],
)
def test_the_check_sees_every_form_of_import(source: str) -> None:
    assert list(violations(source, "x.py")), source


@pytest.mark.parametrize(
    "source",
    [
        "from agent import registry",
        "from . import errors",
        '"""Adapters live in adapters/<kind>/<type>/ and are found by ``agent.registry``."""',
        "SINK_NAME = 'gateway'",
        "DB = 'gateway.sqlite3'",
    ],
)
def test_the_check_passes_what_is_not_an_import(source: str) -> None:
    assert not list(violations(source, "x.py")), source


def _declared() -> dict[str, dict[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = project["entry-points"]
    return {kind: groups[group] for kind, group in registry.GROUPS.items()}


@pytest.mark.parametrize("kind", ["sources", "sinks"])
def test_every_adapter_in_the_tree_has_an_entry_point(kind: str) -> None:
    """An adapter package is one with a sample.toml (docs/ARCHITECTURE.md: every adapter has
    the same shape); each must be declared, and nothing else."""
    in_tree = {p.parent.name for p in (ROOT / "adapters" / kind).glob("*/sample.toml")}
    declared = _declared()[kind]
    assert set(declared) == in_tree
    for type_, target in declared.items():
        assert target == f"adapters.{kind}.{type_}", (type_, target)
    # the installed metadata is the pyproject's (a stale install would hide a new adapter)
    assert registry.known(kind) == sorted(declared)


@pytest.mark.parametrize("kind", ["sources", "sinks"])
def test_each_adapter_entry_point_loads_a_config_and_a_build(kind: str) -> None:
    for type_ in registry.known(kind):
        mod = registry.module(kind, type_)
        assert callable(mod.build), type_
        assert registry.config_model(kind, type_).model_fields["type"], type_


def test_the_commands_beside_the_adapters_are_click_commands() -> None:
    assert registry.command_names() == sorted(_declared()["commands"])
    assert set(registry.command_names()) >= {"gateway", "opcua", "sparkplug"}
    for name in registry.command_names():
        assert isinstance(registry.command(name), click.Command), name
    assert registry.command("no-such-command") is None


# ------------------------------------------------------------------------- the tests' own

#: programs under tests/ that are neither tests nor helpers: dev.py runs the first two to
#: install the interop peers; the third runs in the mqtt-spb-wrapper venv they make
PEER_PROGRAMS = {
    "tests/interop/ensure_node_opcua.py",
    "tests/interop/ensure_sparkplug_client.py",
    "tests/interop/sparkplug/spb_wrapper_node.py",
}


def _test_sources() -> list[Path]:
    skip = {"node_modules", ".venv", "__pycache__"}
    return sorted(
        p for p in (ROOT / "tests").rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)
    )


def test_test_helpers_live_in_fixtures() -> None:
    """Outside tests/fixtures/ a module is a test module, a conftest or a peer's program."""
    stray = [
        rel
        for p in _test_sources()
        if not (rel := p.relative_to(ROOT).as_posix()).startswith("tests/fixtures/")
        and not p.name.startswith("test_")
        and p.name not in ("conftest.py", "__init__.py")
        and rel not in PEER_PROGRAMS
    ]
    assert not stray, f"helpers belong in tests/fixtures/: {stray}"


def test_no_test_module_imports_another() -> None:
    """A test module imports helpers from tests.fixtures, never from another test module."""
    found = []
    for path in _test_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                if name.startswith("tests.") and not name.startswith("tests.fixtures"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, "import helpers from tests.fixtures:\n" + "\n".join(found)

"""No task outside a task group (issue 11, item 4).

Every task of agent/, adapters/ and gateway/ is created by an asyncio.TaskGroup (``async with
asyncio.TaskGroup() as tg``, a parameter or attribute typed ``asyncio.TaskGroup``) or by an
agent.tasks.TaskScope (``spawn``). A bare ``asyncio.create_task``, ``asyncio.ensure_future``,
``loop.create_task`` or ``asyncio.Task(...)`` makes a task nobody waits for: a crash in it
is silent and it may outlive its component's stop. ``asyncio.shield`` is reported too
(its task outlives a cancelled caller); ``asyncio.wait_for`` is not (it waits for or
cancels its task before it returns).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "adapters", "gateway")

#: (module path, function name) -> why a task outside a group must stay there.
ALLOWED: dict[tuple[str, str], str] = {
    ("adapters/sources/sparkplug/source.py", "run"): (
        "asyncio.shield(to_thread(close)): paho's close runs in a thread that cannot be "
        "interrupted; a second cancellation of the stop must not leave the client half "
        "closed, and the shielded task ends with the thread (paho's disconnect is bounded)"
    ),
}

_SPAWNERS = {"create_task", "ensure_future"}


def _is_taskgroup(node: ast.AST | None) -> bool:
    """An annotation or a call naming TaskGroup (asyncio.TaskGroup, TaskGroup | None, ...)."""
    if node is None:
        return False
    return any(
        (isinstance(n, ast.Attribute) and n.attr in {"TaskGroup", "TaskScope"})
        or (isinstance(n, ast.Name) and n.id in {"TaskGroup", "TaskScope"})
        or (isinstance(n, ast.Constant) and isinstance(n.value, str) and "TaskGroup" in n.value)
        for n in ast.walk(node)
    )


def _target_name(node: ast.AST) -> str | None:
    """``tg`` or ``self.tasks`` as a string, for a Name or an attribute chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _target_name(node.value)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def _group_names(tree: ast.Module) -> set[str]:
    """Names and attributes of the module that are bound to a TaskGroup."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncWith | ast.With):
            for item in node.items:
                if item.optional_vars is not None and _is_taskgroup(item.context_expr):
                    name = _target_name(item.optional_vars)
                    if name:
                        names.add(name)
        elif isinstance(node, ast.AnnAssign) and _is_taskgroup(node.annotation):
            name = _target_name(node.target)
            if name:
                names.add(name)
        elif isinstance(node, ast.Assign) and _is_taskgroup(node.value):
            for t in node.targets:
                name = _target_name(t)
                if name:
                    names.add(name)
        elif isinstance(node, ast.arg) and _is_taskgroup(node.annotation):
            names.add(node.arg)
    return names


def stray_tasks(
    source: str, rel: str, allowed_seen: set[tuple[str, str]] | None = None
) -> list[str]:
    """Lines of module ``rel`` that create a task outside a TaskGroup or TaskScope."""
    tree = ast.parse(source, filename=rel)
    groups = _group_names(tree)
    found: list[str] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = func
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
            if isinstance(child, ast.Call):
                problem = _problem(child, groups)
                if problem and (rel, name) in ALLOWED:
                    if allowed_seen is not None:
                        allowed_seen.add((rel, name))
                elif problem:
                    found.append(f"{rel}:{child.lineno} in {name}(): {problem}")
            visit(child, name)

    visit(tree, "<module>")
    return found


def _problem(call: ast.Call, groups: set[str]) -> str | None:
    f = call.func
    if isinstance(f, ast.Name) and f.id in _SPAWNERS | {"Task"}:
        return f"bare {f.id}()"
    if not isinstance(f, ast.Attribute):
        return None
    receiver = _target_name(f.value)
    if f.attr == "Task" and receiver == "asyncio":
        return "asyncio.Task() constructed directly"
    if f.attr == "shield" and receiver == "asyncio":
        return "asyncio.shield() (its inner task outlives a cancelled caller)"
    if f.attr not in _SPAWNERS:
        return None
    if receiver == "asyncio":
        return f"asyncio.{f.attr}()"
    if f.attr == "ensure_future":
        return f"{receiver}.ensure_future()"
    if receiver in groups:
        return None
    # loop.create_task, asyncio.get_running_loop().create_task, anything not a group
    return f"{receiver or ast.unparse(f.value)}.create_task() on something not a TaskGroup"


def _modules() -> list[Path]:
    out: list[Path] = []
    for pkg in PACKAGES:
        out.extend(sorted((ROOT / pkg).rglob("*.py")))
    return out


def test_no_task_outside_a_task_group() -> None:
    modules = _modules()
    assert len(modules) > 20, "the packages were not found: the scan would prove nothing"
    seen: set[tuple[str, str]] = set()
    stray = [
        line
        for path in modules
        for line in stray_tasks(
            path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix(), seen
        )
    ]
    assert not stray, "tasks created outside a TaskGroup/TaskScope:\n" + "\n".join(stray)
    assert seen == set(ALLOWED), f"allow-list entries no longer needed: {set(ALLOWED) - seen}"


def test_the_scan_catches_each_kind() -> None:
    """The check itself: every bare form is reported, the grouped forms are not."""
    bad = (
        "import asyncio\n"
        "from asyncio import create_task\n"
        "async def f(loop):\n"
        "    asyncio.create_task(g())\n"
        "    asyncio.ensure_future(g())\n"
        "    loop.create_task(g())\n"
        "    asyncio.get_running_loop().create_task(g())\n"
        "    create_task(g())\n"
        "    asyncio.Task(g())\n"
        "    await asyncio.shield(g())\n"
    )
    good = (
        "import asyncio\n"
        "class C:\n"
        "    def __init__(self):\n"
        "        self.tasks: asyncio.TaskGroup | None = None\n"
        "    async def f(self, tg: asyncio.TaskGroup, scope: TaskScope):\n"
        "        tg.create_task(g())\n"
        "        self.tasks.create_task(g())\n"
        "        scope.spawn(g(), name='x')\n"
        "        async with asyncio.TaskGroup() as inner:\n"
        "            inner.create_task(g())\n"
    )
    found = stray_tasks(bad, "adapters/probe.py")
    assert [line.split(":")[1].split(" ")[0] for line in found] == [
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "10",
    ]
    assert stray_tasks(good, "adapters/probe.py") == []

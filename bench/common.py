"""Shared helpers: the benchmark event, buffer filling, timing, process cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: the checkout whose peers (reference gateway, test fixtures) every figure measures against;
#: REPO itself, except under ``python -m bench.compare``, where REPO holds only the harness
#: and agent/ and adapters/ come from the revision being measured
HARNESS = Path(os.environ.get("EDGE_BENCH_HARNESS") or REPO)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.interfaces import NewEvent  # noqa: E402


@dataclass
class Ctx:
    """What a figure gets: the scratch directory and whether this is a --quick run."""

    workdir: Path
    quick: bool
    #: figures measured earlier in this run (a figure may reuse another's raw limit)
    results: dict[str, Any] = field(default_factory=dict)

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def dir(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def event(i: int) -> NewEvent:
    """A production count like the simulator's: about 317 bytes once enveloped."""
    return NewEvent(
        type="mfg.production.counted",
        data={
            "good": i,
            "scrap": 0,
            "unit": "EA",
            "work_order": "WO-4711",
            "item": "PART-100",
            "line": "line-1",
        },
        time="2026-11-23T10:15:02.123Z",
        subject="WO-4711",
    )


EVENTS_1000 = [event(i) for i in range(1000)]


async def fill(path: Path, n: int, stream: str = "line1", durability: str = "os") -> None:
    """A backlog of n events in a fresh buffer file (not measured)."""
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability=durability, max_bytes=8 << 30)
    try:
        for start in range(0, n, 1000):
            await buf.append(stream, EVENTS_1000[: min(1000, n - start)])
    finally:
        await buf.close()


def copy_db(src: Path, dst: Path) -> None:
    for ext in ("", "-wal", "-shm"):
        s = src.parent / (src.name + ext)
        if s.exists():
            shutil.copy(s, dst.parent / (dst.name + ext))


def db_size(path: Path) -> int:
    return sum(
        (path.parent / (path.name + ext)).stat().st_size
        for ext in ("", "-wal")
        if (path.parent / (path.name + ext)).exists()
    )


class Deadline:
    """Every load loop is bounded in time: ``while not dl.over()``."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def over(self) -> bool:
        return time.monotonic() > self.end

    def check(self, what: str) -> None:
        if self.over():
            raise TimeoutError(f"benchmark step did not finish in time: {what}")


async def wait_until(pred: Any, limit: float, what: str, interval: float = 0.005) -> None:
    dl = Deadline(limit)
    while not pred():
        dl.check(what)
        await asyncio.sleep(interval)


def ratio(value: float, raw: float) -> float:
    return round(value / raw, 3) if raw else 0.0


def figure(
    *,
    value: float,
    unit: str,
    raw: float | None = None,
    raw_label: str = "",
    target: str = "",
    met: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {"value": round(value, 1 if abs(value) >= 100 else 3), "unit": unit}
    if raw is not None:
        out["raw"] = round(raw, 1)
        out["raw_label"] = raw_label
        out["ratio"] = ratio(value, raw)
    if target:
        out["target"] = target
    if met is not None:
        out["met"] = met
    out.update(extra)
    return out


_children: list[subprocess.Popen[Any]] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """Start a child in OUR process group (so killing the group stops everything)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(kw.pop("env", {}) or {})
    p = subprocess.Popen(cmd, cwd=kw.pop("cwd", REPO), env=env, **kw)
    _children.append(p)
    return p


def kill_children() -> None:
    for p in _children:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(5)
    _children.clear()


def adapter_context_class() -> Any:
    """AdapterContext wherever the revision keeps it (issue 11 may move it out of
    adapters/registry.py, so a comparison must find it on both sides)."""
    import importlib

    for mod in ("adapters.registry", "agent.interfaces", "agent.registry", "agent.adapters"):
        try:
            return importlib.import_module(mod).AdapterContext
        except (ImportError, AttributeError):
            continue
    raise ImportError("AdapterContext is in none of adapters.registry, agent.interfaces, ...")

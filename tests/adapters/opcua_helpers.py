"""Helpers shared by the OPC UA tests: run a source against the real Buffer, read back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from adapters.registry import AdapterContext
from adapters.sources.opcua import Config, build
from adapters.sources.opcua.source import OpcUaSource
from agent.buffer import Buffer

NS = "urn:edge-agent:test-server"


def node(name: str, **kw: Any) -> dict[str, Any]:
    return {"node_id": f"nsu={NS};s=Line1.{name}", "sampling_interval": "0ms", **kw}


def make_config(endpoint: str, nodes: list[dict[str, Any]], **kw: Any) -> Config:
    body = {
        "type": "opcua",
        "endpoint": endpoint,
        "publishing_interval": "100ms",
        "liveness_timeout": "3s",
        "reconnect_initial": "200ms",
        "reconnect_max": "1s",
        "connect_timeout": "5s",
        "line": "L1",
        "nodes": nodes,
        **kw,
    }
    return Config.model_validate(body)


async def read_events(buf: Buffer, stream: str) -> list[dict[str, Any]]:
    rows = await buf.read_next(stream, 0, 1_000_000, 1 << 40)
    return [orjson.loads(body) for _, _, body in rows]


@contextlib.asynccontextmanager
async def running_source(
    cfg: Config, tmp: Path, *, name: str = "line1"
) -> AsyncIterator[tuple[OpcUaSource, Buffer]]:
    buf = await Buffer.open(tmp / "buffer.db", plant="p1", agent_id="a1", on_full="block")
    ctx = AdapterContext(agent_id="a1", plant="p1", state_dir=tmp / "state", version="test")
    src = build(name, cfg, ctx)
    task = asyncio.create_task(src.run(buf))
    try:
        yield src, buf
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await buf.close()


async def wait_for(
    pred: Callable[[], Any], within: float, what: str, src: OpcUaSource | None = None
) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    state = src.state() if src is not None else None
    raise AssertionError(f"timed out after {within}s waiting for {what}; source state: {state}")


async def signals(buf: Buffer, stream: str, node_suffix: str) -> list[dict[str, Any]]:
    return [
        e
        for e in await read_events(buf, stream)
        if e["type"] == "mfg.signal.sampled" and e["data"]["node_id"].endswith(node_suffix)
    ]

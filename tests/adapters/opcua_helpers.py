"""Helpers shared by the OPC UA tests: run a source against the real Buffer, read back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from adapters.sources.opcua import Config, build
from adapters.sources.opcua.source import OpcUaSource
from agent.buffer import Buffer
from agent.registry import AdapterContext

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
    cfg: Config, tmp: Path, *, name: str = "line1", max_bytes: int = 1 << 30
) -> AsyncIterator[tuple[OpcUaSource, Buffer]]:
    buf = await Buffer.open(
        tmp / "buffer.db", plant="p1", agent_id="a1", on_full="block", max_bytes=max_bytes
    )
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


class CutProxy:
    """A TCP proxy in front of a server whose link a test can cut and restore: the server
    keeps running (and keeps history) while the agent cannot reach it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.is_cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    async def start(self) -> CutProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.is_cut = True
        for w in list(self._writers):
            w.transport.abort()

    def restore(self) -> None:
        self.is_cut = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

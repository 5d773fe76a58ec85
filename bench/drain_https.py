"""Figure 2: drain a backlog to the reference gateway over HTTPS (StreamForwarder +
HttpsSink) vs raw httpx posting the same 1000-event batches, gzip level 1, same gateway."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Ctx, Deadline, figure, fill, ratio, wait_until


def start_gateway(d: Path) -> Any:
    """The reference gateway as a subprocess with a trustme certificate (TLS)."""
    from tests.fixtures.gateway import GatewayProcess

    return GatewayProcess(d, tls=True, control=False).start()


async def read_batches(path: Path, stream: str) -> list[Any]:
    """The batches the agent would form, read up front so the raw client only sends."""
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="os", max_bytes=8 << 30)
    out, after = [], 0
    try:
        while True:
            rows = await buf.read_next(stream, after, 1000, 1 << 20)
            if not rows:
                return out
            b = await buf.open_batch(stream, rows)
            assert b is not None  # nothing drops here
            out.append(b)
            after = b.last_sequence
    finally:
        await buf.close()


async def raw_httpx(gw: Any, batches: list[Any], level: int) -> float:
    from adapters.sinks.https.sink import CONTENT_TYPE, gzip_bytes
    from agent.event import format_sequence

    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    n = sum(len(b) for b in batches)
    async with httpx.AsyncClient(verify=ctx, timeout=30) as c:
        t = time.perf_counter()
        for b in batches:
            body = gzip_bytes(b.payload, level)
            r = await c.post(
                gw.url,
                content=body,
                headers={
                    "Content-Type": CONTENT_TYPE,
                    "Content-Encoding": "gzip",
                    "Idempotency-Key": b.batch_id,
                    "X-Edge-Stream": b.stream,
                    "X-Edge-First-Sequence": format_sequence(b.first_sequence),
                    "X-Edge-Last-Sequence": format_sequence(b.last_sequence),
                    "X-Edge-Stream-Epoch": b.epoch,
                },
            )
            if r.status_code // 100 != 2:
                raise RuntimeError(f"gateway refused a raw batch: {r.status_code} {r.text[:200]}")
        return n / (time.perf_counter() - t)


async def agent_drain(gw: Any, path: Path, stream: str, n: int, level: int) -> float:
    from adapters.sinks.https import Config, HttpsSink
    from agent.buffer import Buffer
    from agent.forwarder import ForwarderSettings, StreamForwarder

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    sink = HttpsSink("central", Config(url=gw.url, ca_file=gw.ca_file, gzip_level=level))
    await sink.start()
    fw = StreamForwarder(buf, stream, sink, ForwarderSettings())
    t = time.perf_counter()
    task = asyncio.create_task(fw.run())
    try:
        await wait_until(lambda: buf.stream_state(stream)[1] >= n, 600, "HTTPS drain")
        el = time.perf_counter() - t
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.stop()
        await buf.close()
    return n / el


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("drain_https")
    n = ctx.n(200_000, 50_000)
    asyncio.run(fill(d / "agent.db", n, "line1"))
    asyncio.run(fill(d / "raw.db", n, "raw1"))
    batches = asyncio.run(read_batches(d / "raw.db", "raw1"))
    gw = start_gateway(d / "gw")
    try:
        Deadline(1)  # loops below are bounded by their own deadlines
        raw = asyncio.run(raw_httpx(gw, batches, 1))
        agent = asyncio.run(agent_drain(gw, d / "agent.db", "line1", n, 1))
        from gateway.store import received_count

        got = received_count(gw.db_path, "line1")
    finally:
        gw.stop()
    return {
        "drain_https": figure(
            value=agent,
            unit="events/s",
            raw=raw,
            raw_label="httpx POSTing the same 1000-event batches, gzip 1, TLS",
            target=">= 0.6",
            met=ratio(agent, raw) >= 0.6,
            detail=f"{n:,} event backlog, gateway stored {got:,} of them; fsync buffer",
        )
    }

"""JetStream drain: a backlog through StreamForwarder + NatsSink into a real 3-node cluster
(replicas 3, file storage), vs raw nats-py publishing the same batches with the same headers
(Nats-Msg-Id and the contract's) to the same cluster in the same run.

The raw side is nats-py's ``js.publish`` one batch at a time, each awaiting its PubAck:
what the contract's order needs (one batch of a stream in flight). Pipelined raw publishing
(``publish_async``, 64 in flight, order not guaranteed after a failure) is measured beside
it as the transport's ceiling.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import Ctx, figure, fill, ratio, wait_until
from bench.drain_mqtt import read_rate


async def _raw(cluster: Any, stream: str, batches: list[Any], n: int, pipelined: bool) -> float:
    from adapters.sinks.nats.sink import CONTENT_TYPE
    from agent.event import format_sequence

    nc = await cluster.connect(max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=30)
        subject = f"{stream.lower()}.p.raw1"
        msgs = [
            (
                b.payload,
                {
                    "Nats-Msg-Id": b.batch_id + ("P" if pipelined else ""),
                    "Nats-Expected-Stream": stream,
                    "Content-Type": CONTENT_TYPE,
                    "Idempotency-Key": b.batch_id,
                    "X-Edge-Stream": b.stream,
                    "X-Edge-First-Sequence": format_sequence(b.first_sequence),
                    "X-Edge-Last-Sequence": format_sequence(b.last_sequence),
                    "X-Edge-Stream-Epoch": b.epoch,
                },
            )
            for b in batches
        ]
        t = time.perf_counter()
        if pipelined:
            futs = [await js.publish_async(subject, p, headers=h) for p, h in msgs]
            await asyncio.gather(*futs)
        else:
            for p, h in msgs:
                await js.publish(subject, p, headers=h)
        return n / (time.perf_counter() - t)
    finally:
        await nc.close()


async def _batches(path: Path, stream: str) -> list[Any]:
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="os", max_bytes=8 << 30)
    out = []
    after = 0
    try:
        while (b := await buf.take_batch(stream, after, 1000, 1 << 20)) is not None:
            out.append(b)
            after = b.last_sequence
    finally:
        await buf.close()
    return out


async def agent_drain(cluster: Any, stream: str, path: Path, d: Path, n: int) -> float:
    from pydantic import SecretStr

    from adapters.sinks.nats import Config, NatsSink
    from agent.buffer import Buffer
    from agent.forwarder import ForwarderSettings, StreamForwarder
    from agent.registry import AdapterContext
    from tests.fixtures.nats_cluster import ADMIN, ADMIN_PASSWORD

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    cfg = Config(
        url=cluster.url, stream=stream, subject_prefix=stream.lower(), username=ADMIN,
        password=SecretStr(ADMIN_PASSWORD), ack_timeout=30,
    )  # fmt: skip
    sink = NatsSink("central", cfg, AdapterContext("a", "p", d, "bench"))
    await sink.start()
    task = None
    try:
        await wait_until(lambda: sink.state().state == "connected", 20, "NATS connect")
        fw = StreamForwarder(buf, "line1", sink, ForwarderSettings())
        t = time.perf_counter()
        task = asyncio.create_task(fw.run())
        await wait_until(lambda: buf.stream_state("line1")[1] >= n, 600, "JetStream drain")
        return n / (time.perf_counter() - t)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await sink.stop()
        await buf.close()


def run(ctx: Ctx) -> dict[str, Any]:
    from tests.fixtures.nats_cluster import NatsCluster

    d = ctx.dir("drain_nats")
    n = ctx.n(200_000, 50_000)
    asyncio.run(fill(d / "agent.db", n, "line1"))
    asyncio.run(fill(d / "raw.db", n, "raw1"))
    rr, payloads = asyncio.run(read_rate(d / "raw.db", "raw1"))
    batches = asyncio.run(_batches(d / "raw.db", "raw1"))
    cluster = NatsCluster(d / "cluster", max_payload=8 * 1024 * 1024).start()
    try:
        asyncio.run(cluster.add_stream("BENCH", ["bench.>"], duplicate_window=300))
        raw = asyncio.run(_raw(cluster, "BENCH", batches, n, pipelined=False))
        agent = asyncio.run(agent_drain(cluster, "BENCH", d / "agent.db", d, n))
        raw_pipe = asyncio.run(_raw(cluster, "BENCH", batches, n, pipelined=True))
    finally:
        cluster.kill()
    kb = sum(map(len, payloads)) / len(payloads) / 1000
    return {
        "drain_nats": figure(
            value=agent,
            unit="events/s",
            raw=raw,
            raw_label="nats-py js.publish of the same batches and headers, one PubAck at a time",
            target=">= 0.5",
            met=ratio(agent, raw) >= 0.5,
            detail=(
                f"{n:,} event backlog, ~{kb:.0f} KB batches, 3-node cluster, replicas 3, file "
                f"storage; pipelined raw (publish_async) {raw_pipe:,.0f}/s = ceiling, "
                f"agent/pipelined {ratio(agent, raw_pipe)}"
            ),
        ),
    }

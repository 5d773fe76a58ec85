"""Figure 5: end-to-end latency at 1,000 events/s online: from the source acknowledgement
(Buffer.append returned: durable, fsync) to the gateway acknowledgement (the batch's 2xx),
with the agent's default forwarder settings (linger 5 ms), HTTPS, reference gateway."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import Ctx, event, figure, wait_until
from bench.drain_https import start_gateway


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def measure(
    gw: Any, path: Any, seconds: float, rate: int, linger_ms: int | None = None
) -> list[float]:
    """Latencies (ms) of ``seconds`` at ``rate`` single-event appends; ``linger_ms`` None
    is the agent's default forwarder settings."""
    from adapters.sinks.https import Config, HttpsSink
    from agent.buffer import Buffer
    from agent.forwarder import ForwarderSettings, StreamForwarder
    from agent.interfaces import Outcome

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync")
    sink = HttpsSink("central", Config(url=gw.url, ca_file=gw.ca_file))
    await sink.start()
    acked_at: dict[int, float] = {}
    durable_at: dict[int, float] = {}
    send = sink.send

    async def timed_send(batch: Any) -> Any:
        res = await send(batch)
        if res.outcome is Outcome.ACCEPTED:
            now = time.perf_counter()
            for s in range(batch.first_sequence, batch.last_sequence + 1):
                acked_at.setdefault(s, now)
        return res

    sink.send = timed_send  # type: ignore[method-assign]
    base = (await buf.append("line1", [event(-1)]))[0].sequence  # the stream must exist
    settings = ForwarderSettings() if linger_ms is None else ForwarderSettings(linger_ms=linger_ms)
    fw = StreamForwarder(buf, "line1", sink, settings)
    task = asyncio.create_task(fw.run())
    pending: set[asyncio.Task[Any]] = set()

    async def one(ev: Any) -> None:
        res = await buf.append("line1", [ev])
        durable_at[res[0].sequence] = time.perf_counter()

    try:
        total = int(seconds * rate)
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(one(event(i)))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        await wait_until(lambda: buf.stream_state("line1")[1] >= total + base, 60, "latency drain")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.stop()
        await buf.close()
    warm = int(rate * 1.0)  # the first second warms connections up
    return [(acked_at[s] - durable_at[s]) * 1000 for s in sorted(durable_at) if s > base + warm]


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("latency")
    gw = start_gateway(d / "gw")
    try:
        lat = asyncio.run(measure(gw, d / "lat.db", ctx.n(30, 10), 1000))
        # the floor: nothing waits for more events (linger 0); what is left is the batch
        # row's fsync, gzip, TLS, the POST and the gateway's own commit
        floor = asyncio.run(measure(gw, d / "floor.db", ctx.n(15, 5), 1000, linger_ms=0))
    finally:
        gw.stop()
    p50, p99 = pct(lat, 50), pct(lat, 99)
    f50, f99 = pct(floor, 50), pct(floor, 99)
    return {
        "latency": figure(
            value=p99,
            unit="ms p99",
            p50=round(p50, 1),
            p99=round(p99, 1),
            max=round(max(lat), 1),
            events=len(lat),
            target="p99 <= 15 ms",
            met=p99 <= 15,
            detail=(
                f"{len(lat):,} single-event appends at 1,000/s, fsync, default linger 5 ms, "
                f"HTTPS gzip 1; max {max(lat):.0f} ms; with linger 0 (the floor) "
                f"p50 {f50:.1f} ms, p99 {f99:.1f} ms"
            ),
        ),
        "latency_floor": figure(
            value=f99,
            unit="ms p99",
            p50=round(f50, 1),
            p99=round(f99, 1),
            max=round(max(floor), 1),
            events=len(floor),
            detail=(
                f"{len(floor):,} single-event appends at 1,000/s, linger 0: the batch row's "
                "fsync, gzip, TLS, the POST and the gateway's commit, nothing waiting"
            ),
        ),
    }

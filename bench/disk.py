"""Figure 7: buffer bytes on disk per event, and the file size over a soak of fill/drain
cycles (forwarding acknowledged through the buffer's own API, then housekeeping as the
runtime runs it): the file must not grow without bound."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench.common import EVENTS_1000, Ctx, db_size, figure


async def soak(
    path: Path, per_cycle: int, cycles: int
) -> tuple[float, float, list[int], list[int]]:
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    sizes: list[int] = []
    mains: list[int] = []
    per_event = body = 0.0
    try:
        for c in range(cycles):
            for _ in range(per_cycle // 1000):
                await buf.append("line1", EVENTS_1000)
            if c == 0:
                await buf.checkpoint_wal()
                per_event = db_size(path) / per_cycle
                first = await buf.read_range("line1", 0, 1000, 1000)
                body = sum(len(r[2]) for r in first) / len(first)
            after = buf.stream_state("line1")[1]
            for _ in range(per_cycle):  # bounded: one batch per step
                b = await buf.take_batch("line1", after, 1000, 1 << 20)
                if b is None:
                    break
                await buf.ack(b)
                after = b.last_sequence
            for _ in range(1000):
                if not await buf.housekeeping():
                    break
            sizes.append(db_size(path))
            mains.append(path.stat().st_size)  # noqa: ASYNC240 (a stat between measurements)
    finally:
        await buf.close()
    return per_event, body, sizes, mains


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("disk")
    per_cycle = ctx.n(100_000, 30_000)
    cycles = ctx.n(12, 5)
    per_event, body, sizes, mains = asyncio.run(soak(d / "soak.db", per_cycle, cycles))
    first, last, top = sizes[0], sizes[-1], max(sizes)
    bounded = last <= max(first, sizes[len(sizes) // 2]) * 1.1 + (4 << 20)
    return {
        "disk": figure(
            value=per_event,
            unit="bytes/event",
            detail=f"{per_cycle:,} events in the file (WAL checkpointed); event bodies are {body:.0f} bytes",
        ),
        "disk_soak": figure(
            value=last / 1e6,
            unit="MB after the last cycle",
            target="bounded",
            met=bounded,
            sizes_mb=[round(s / 1e6, 1) for s in sizes],
            detail=(
                f"{cycles} cycles of fill {per_cycle:,} / forward / housekeeping: file+WAL after "
                f"each cycle {', '.join(f'{s / 1e6:.1f}' for s in sizes)} MB (max {top / 1e6:.1f}); main file alone {mains[-1] / 1e6:.1f} MB, the rest is the WAL"
            ),
        ),
    }

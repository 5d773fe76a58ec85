"""Figure 4 (issue 4): HTTP push of 500-event batches to the mes_http source (real buffer,
fsync) from a client process, vs the raw buffer commit rate (500-event appends) same run.

Both sides run under the garbage-collector settings ``edge-agent run`` applies at start
(agent/gc_tuning.py: start-up frozen, gen 0 at 20,000), as bench/opcua_path.py does, and
only for this figure. Without them the bench process, unlike the agent, rescans every
module object of pydantic, aiohttp and httpx in each full collection: py-spy (issue 16,
docs/performance.md) found the collector in 25% of the push's event-loop thread, a cost
the agent does not have and Buffer.append alone (few allocations) hardly pays.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from bench.common import Ctx, figure, ratio, spawn, wait_until
from bench.ingest import agent_batches


async def serve_and_push(ctx: Ctx, n: int, conc: int) -> tuple[float, int]:
    from adapters.sources.mes_http import Config, build
    from agent.buffer import Buffer
    from agent.registry import AdapterContext

    d = ctx.dir("push")
    buf = await Buffer.open(d / "push.db", plant="p", agent_id="a", durability="fsync")
    src = build("mes", Config(listen="127.0.0.1:0"), AdapterContext("a", "p", d, "bench"))
    task = asyncio.create_task(src.run(buf))
    try:
        await wait_until(lambda: src.bound_address is not None, 20, "mes_http listening")
        url = f"http://{src.bound_address}/v1/events"
        client = spawn(
            [sys.executable, "-m", "bench.push_client", url, str(n), "500", str(conc)],
            stdout=subprocess.PIPE,
        )
        out = await asyncio.to_thread(client.communicate, timeout=400)
        if client.returncode != 0:
            raise RuntimeError(f"push client failed (exit {client.returncode})")
        accepted, rate = out[0].split()
        return float(rate), buf.commits
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buf.close()


@contextlib.contextmanager
def agent_gc() -> Iterator[None]:
    """The agent's start-up GC settings for the duration of the block, then the old ones."""
    import adapters.sources.mes_http  # noqa: F401  (start-up's imports, frozen as in the agent)
    from agent.gc_tuning import tune_for_ingest

    old = gc.get_threshold()
    tune_for_ingest()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("push")
    n = ctx.n(100_000, 20_000)
    with agent_gc():
        raw, _ = asyncio.run(agent_batches(d / "raw.db", n, 500, 4))
        rate, commits = asyncio.run(serve_and_push(ctx, n, 4))
    return {
        "push": figure(
            value=rate,
            unit="events/s",
            raw=raw,
            raw_label="Buffer.append of 500-event lists x4 tasks, fsync",
            target=">= 0.6",
            met=ratio(rate, raw) >= 0.6,
            detail=(
                f"{n:,} events, 4 concurrent POSTs of 500 events each; {commits} commits; "
                "the agent's GC settings (agent/gc_tuning.py) on both sides"
            ),
        )
    }

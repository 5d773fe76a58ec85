"""The OPC UA source's cost per notification, and its one-core ceiling, without a server.

``python -m bench.opcua_path [TICKS] [--default-gc]``: TICKS PublishResponses of 10,000
Double items are encoded once; then (raw side) asyncua decodes them
(``struct_from_binary(PublishResponse)``, what asyncua's UaSession.publish does), which is
all a bare client does with them, and (agent side) the source's decode of the same bytes
(lean_publish, which its session's publish uses; asyncua's decode for a revision without
it) followed by the source's own path: the publish callback, the pending queue, mapping to
events and the real Buffer append (fsync). Prints microseconds of CPU per notification for
both and their ratio. No sockets: this isolates the part the source adds; the end-to-end
figure with a server is bench/opcua.py.

CPU is the process's (all threads: the buffer's SQL thread too). The raw decode runs in a
fresh process of its own (``--raw``), once before and once after the agent side, averaged:
a bare client is a process of its own, and a decode measured in the agent's process under
CPython's default GC pays for collecting the agent's heap too. The agent side runs with the
garbage-collector settings that ``edge-agent run`` applies at start (agent/gc_tuning.py)
unless ``--default-gc``; ``cpu_multiple`` divides by the fresh process's decode (CPython's
defaults, as the bare client of bench/opcua.py runs), and ``cpu_multiple_same_gc`` by the
decode in the agent's process under the agent's settings (the stricter reading).

``python -m bench.opcua_path --ceiling [N,N,...] [--seconds S] [--cpu C]``: the one-core
ceiling. For each N, a fresh process pinned to CPU C (``taskset -c C``, default 1) feeds the
source N items at 1 Hz: every 500 ms (the bench's publishing interval) one recorded
PublishResponse with half the items, each changing once a second, decoded and handed to
the source as its session's publish loop does, for S seconds (default 15). It keeps up when
no response was handed over late (a full queue holds the publish loop back, as it would
hold back the server), the backlog (produced, not yet committed, at each response) grew by
no more than half a tick from the first third of the run to the last, and everything
produced was committed within a tick (1 s) of the last response. ``--batch-max B`` runs
with the source's ``batch_max`` at B (default 5,000). The asyncua server cannot produce
more than about 10,000 changes/s on this 2-core machine, hence the recorded responses;
what is not measured here is the socket and chunk work, which a real session adds (to the
bare client's cost as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.utils import Buffer as UaBuffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

N = 10_000
DEFAULT_GC_THRESHOLD = gc.get_threshold()
CEILING_NS = [10_000, 20_000, 25_000, 30_000, 35_000, 40_000, 50_000]
#: this module's name for its child processes (a copy run under another name calls itself)
SELF = __spec__.name if __spec__ is not None else "bench.opcua_path"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def response(tick: int, n: int = N, first: int = 0) -> bytes:
    """One PublishResponse: items first..first+n-1 (handles from first+1), all at one time."""
    ts = datetime.now(UTC)
    items = [
        ua.MonitoredItemNotification(
            ClientHandle=i + 1,
            Value=ua.DataValue(
                ua.Variant(float(tick), ua.VariantType.Double),
                SourceTimestamp=ts,
                ServerTimestamp=ts,
            ),
        )
        for i in range(first, first + n)
    ]
    msg = ua.NotificationMessage(
        SequenceNumber=tick + 1,
        PublishTime=ts,
        NotificationData=[ua.DataChangeNotification(MonitoredItems=items)],
    )
    result = ua.PublishResult(SubscriptionId=1, NotificationMessage=msg)
    return struct_to_binary(ua.PublishResponse(Parameters=result))


def source_decode() -> Callable[[UaBuffer], ua.PublishResponse]:
    try:  # the source's own decode; a revision without one decoded with asyncua's
        from adapters.sources.opcua.lean_publish import decode_publish_response

        return decode_publish_response
    except ImportError:
        return lambda b: struct_from_binary(ua.PublishResponse, b)


async def open_source(n: int, **options: Any) -> tuple[Any, Any]:
    """The source with n items as _subscribe leaves it, and a real fsync Buffer."""
    from adapters.sources.opcua import Config, build
    from adapters.sources.opcua.mapping import NodeMapper
    from agent.buffer import Buffer
    from agent.registry import AdapterContext

    cfg = Config.model_validate(
        {
            "endpoint": "opc.tcp://127.0.0.1:1",
            "nodes": [
                {"node_id": f"nsu=urn:bench;s=V{i}", "sampling_interval": 0, "queue_size": 5}
                for i in range(n)
            ],
            **options,
        }
    )
    d = Path(tempfile.mkdtemp(prefix="opcua-path-"))
    buf = await Buffer.open(d / "b.db", on_full="block", max_bytes=1 << 34)
    src = build("b", cfg, AdapterContext("a", "p", d, "bench"))
    src._queue = asyncio.Queue(maxsize=cfg.max_pending)  # what run() sets up
    for it in src._items:
        it.mapper = NodeMapper(
            it.node, node_id=it.node.node_id or "", browse_path=None, attributes={}
        )
        src._handles[it.index + 1] = it
    return src, buf


def raw_in_fresh_process(ticks: int) -> float:
    """asyncua's decode per notification, CPython's default GC, in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", SELF, str(ticks), "--raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["raw_us_per_notification"]) / 1e6


def runqueue_wait() -> float:
    """Seconds this process's threads have waited for a CPU (runnable, not running), from
    /proc/self/task/*/schedstat: on a shared core, the time others had it."""
    total = 0
    for stat in Path("/proc/self/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[1])
    return total / 1e9


def decode_cpu(blobs: list[bytes]) -> float:
    c0 = cpu()
    for b in blobs:
        struct_from_binary(ua.PublishResponse, UaBuffer(b))
    return (cpu() - c0) / (len(blobs) * N)


async def main(ticks: int, default_gc: bool = False) -> dict[str, Any]:
    decode = source_decode()
    raw_before = raw_in_fresh_process(ticks)
    blobs = [response(t) for t in range(ticks)]
    src, buf = await open_source(N)
    if not default_gc:
        from agent.gc_tuning import tune_for_ingest

        tune_for_ingest()
    raw_gc = decode_cpu(blobs)
    writer = asyncio.create_task(src._writer(buf))
    try:
        c0 = cpu()
        for b in blobs:
            await src._on_publish(decode(UaBuffer(b)).Parameters)
            await asyncio.sleep(0)
        while src.events_committed < ticks * N:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.005)
        agent = (cpu() - c0) / (ticks * N)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await buf.close()
    raw_gc = (raw_gc + decode_cpu(blobs)) / 2
    raw_after = raw_in_fresh_process(ticks)
    raw = (raw_before + raw_after) / 2
    return {
        "gc": "default" if default_gc else "agent (agent/gc_tuning.py)",
        "raw_us_per_notification": round(raw * 1e6, 2),
        "raw_runs_us": [round(raw_before * 1e6, 2), round(raw_after * 1e6, 2)],
        "raw_same_gc_us_per_notification": round(raw_gc * 1e6, 2),
        "agent_us_per_notification": round(agent * 1e6, 2),
        "cpu_multiple": round(agent / raw, 2),
        "cpu_multiple_same_gc": round(agent / raw_gc, 2),
    }


def raw_only(ticks: int) -> dict[str, float]:
    blobs = [response(t) for t in range(ticks)]
    decode_cpu(blobs[:1])  # warm up (deserializer caches)
    return {"raw_us_per_notification": round(decode_cpu(blobs) * 1e6, 2)}


# ---------------------------------------------------------------------- the ceiling


async def ceiling_one(n: int, seconds: int, batch_max: int | None = None) -> dict[str, Any]:
    """n items at 1 Hz into the source for `seconds`, in this (pinned) process."""
    from agent.gc_tuning import tune_for_ingest

    decode = source_decode()
    half = n // 2
    # two responses a second (publishing interval 500 ms), each with half the items
    blobs = [
        response(t, k, first) for t in range(seconds) for first, k in ((0, half), (half, n - half))
    ]
    src, buf = await open_source(n, **({"batch_max": batch_max} if batch_max else {}))
    tune_for_ingest()
    queue = src._queue
    writer = asyncio.create_task(src._writer(buf))
    late = 0.0
    depth: list[int] = []  # queued notifications when each response arrives
    backlog: list[int] = []  # produced, not yet committed, when each response arrives
    produced = 0
    try:
        await asyncio.sleep(0.5)
        t0, c0, w0 = time.monotonic(), cpu(), runqueue_wait()
        for k, b in enumerate(blobs):
            due = t0 + k * 0.5
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
            else:
                late = max(late, now - due)
            depth.append(queue.qsize())
            backlog.append(produced - src.events_committed)
            await src._on_publish(decode(UaBuffer(b)).Parameters)
            produced += half if k % 2 == 0 else n - half
        end = t0 + seconds + 0.5  # one tick (1 s) after the last response
        while src.events_committed < produced and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        committed_in_time = src.events_committed
        while src.events_committed < produced:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.01)
        t1, c1, w1 = time.monotonic(), cpu(), runqueue_wait()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await buf.close()
    third = len(backlog) // 3
    first, last = statistics.mean(backlog[:third]), statistics.mean(backlog[-third:])
    keeps_up = late < 0.5 and last <= first + n / 2 and committed_in_time == produced
    return {
        "items": n,
        "seconds": seconds,
        "produced_per_s": round(produced / seconds),
        "committed_per_s": round(committed_in_time / seconds),
        "late_max_s": round(late, 2),
        "queue_max": max(depth),
        "backlog_mean_first_third": round(first),
        "backlog_mean_last_third": round(last),
        "committed_after_last_s": round(t1 - (t0 + seconds - 0.5), 2),
        "cpu_of_core": round((c1 - c0) / (t1 - t0), 2),
        # waiting for the core while runnable, as a fraction of the run: another's share
        "runqueue_wait_of_run": round((w1 - w0) / (t1 - t0), 2),
        "us_per_notification": round((c1 - c0) / produced * 1e6, 2),
        "keeps_up": keeps_up,
        "batch_max": src.cfg.batch_max,
        "commits": src.appends,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
    }


def ceiling(ns: list[int], seconds: int, core: int, batch_max: int | None = None) -> dict[str, Any]:
    """Each n in a fresh process pinned to one core; the largest n that kept up."""
    runs = []
    for n in ns:
        out = subprocess.run(
            ["taskset", "-c", str(core), sys.executable, "-m", SELF]
            + ["--ceiling-one", str(n), "--seconds", str(seconds)]
            + (["--batch-max", str(batch_max)] if batch_max else []),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        run = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(run), file=sys.stderr, flush=True)
        runs.append(run)
    kept = [r["items"] for r in runs if r["keeps_up"]]
    us = statistics.median(r["us_per_notification"] for r in runs)
    return {
        "ceiling_items": max(kept) if kept else 0,
        "first_not_keeping_up": min((r["items"] for r in runs if not r["keeps_up"]), default=None),
        # what a whole core would carry at the measured CPU per notification: the ceiling
        # when the core is the source's alone (on a shared machine it gets a share of it)
        "cpu_bound_items": int(1e6 / us) if us else 0,
        "us_per_notification_median": us,
        "cpu_of_core_max": max(r["cpu_of_core"] for r in runs),
        "load_average": os.getloadavg(),
        "runs": runs,
    }


def _opt(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if __name__ == "__main__":
    if "--ceiling-one" in sys.argv:
        n = int(_opt("--ceiling-one", "10000"))
        bm = int(_opt("--batch-max", "0")) or None
        print(json.dumps(asyncio.run(ceiling_one(n, int(_opt("--seconds", "15")), bm))))
    elif "--ceiling" in sys.argv:
        spec = _opt("--ceiling", "")
        ns = [int(x) for x in spec.split(",")] if spec[:1].isdigit() else CEILING_NS
        core = int(_opt("--cpu", "1"))
        bm = int(_opt("--batch-max", "0")) or None
        print(json.dumps(ceiling(ns, int(_opt("--seconds", "15")), core, bm)))
    else:
        args = [a for a in sys.argv[1:] if not a.startswith("--")]
        ticks = int(args[0]) if args else 5
        if "--raw" in sys.argv:
            print(json.dumps(raw_only(ticks)))
        else:
            print(json.dumps(asyncio.run(main(ticks, default_gc="--default-gc" in sys.argv))))

"""The OPC UA source's cost per notification, in one process, without a server.

``python -m bench.opcua_path [TICKS] [--default-gc]``: TICKS PublishResponses of 10,000 Double items are
encoded once; then (raw side) asyncua decodes them, which is all a bare client does with
them, and (agent side) the same decode followed by the source's own path: the publish
callback, the pending queue, mapping to events and the real Buffer append (fsync). Prints
microseconds of CPU per notification for both and their ratio. No sockets: this isolates
the part the source adds; the end-to-end figure with a server is bench/opcua.py.

CPU is the process's (all threads: the buffer's SQL thread too). The raw decode is measured
before and after the agent's path and averaged (one short measure alone was off by a third
on a shared machine). The agent side runs with the garbage-collector settings that
``edge-agent run`` applies at start (agent/gc_tuning.py) unless ``--default-gc``; the bare
client of bench/opcua.py runs in its own process with CPython's defaults, so
``cpu_multiple`` divides by the decode under the defaults, and ``cpu_multiple_same_gc``
by the decode under the agent's settings (the stricter reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import resource
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from asyncua import ua
from asyncua.common.utils import Buffer as UaBuffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

N = 10_000
DEFAULT_GC_THRESHOLD = gc.get_threshold()


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def response(tick: int) -> bytes:
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
        for i in range(N)
    ]
    msg = ua.NotificationMessage(
        SequenceNumber=tick,
        PublishTime=ts,
        NotificationData=[ua.DataChangeNotification(MonitoredItems=items)],
    )
    return struct_to_binary(ua.PublishResult(SubscriptionId=1, NotificationMessage=msg))


async def main(ticks: int, default_gc: bool = False) -> dict[str, float]:
    from adapters.sources.opcua import Config, build
    from adapters.sources.opcua.mapping import NodeMapper
    from agent.buffer import Buffer
    from agent.registry import AdapterContext

    blobs = [response(t) for t in range(ticks)]

    def decode_all() -> float:
        c0 = cpu()
        for b in blobs:
            struct_from_binary(ua.PublishResult, UaBuffer(b))
        return (cpu() - c0) / (ticks * N)

    raw_default = decode_all()

    cfg = Config.model_validate(
        {
            "endpoint": "opc.tcp://127.0.0.1:1",
            "nodes": [
                {"node_id": f"nsu=urn:bench;s=V{i}", "sampling_interval": 0, "queue_size": 5}
                for i in range(N)
            ],
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
    if not default_gc:
        from agent.gc_tuning import tune_for_ingest

        tune_for_ingest()
    raw_gc = decode_all()
    writer = asyncio.create_task(src._writer(buf))
    try:
        c0 = cpu()
        for b in blobs:
            await src._on_publish(struct_from_binary(ua.PublishResult, UaBuffer(b)))
            await asyncio.sleep(0)
        while src.events_committed < ticks * N:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.005)
        agent = (cpu() - c0) / (ticks * N)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await buf.close()
    raw_gc = (raw_gc + decode_all()) / 2
    if not default_gc:  # back to CPython's defaults for the last measure under them
        gc.unfreeze()
        gc.set_threshold(*DEFAULT_GC_THRESHOLD)
    raw = (raw_default + decode_all()) / 2
    return {
        "gc": "default" if default_gc else "agent (agent/gc_tuning.py)",
        "raw_us_per_notification": round(raw * 1e6, 2),
        "raw_same_gc_us_per_notification": round(raw_gc * 1e6, 2),
        "agent_us_per_notification": round(agent * 1e6, 2),
        "cpu_multiple": round(agent / raw, 2),
        "cpu_multiple_same_gc": round(agent / raw_gc, 2),
    }


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(
        json.dumps(
            asyncio.run(main(int(args[0]) if args else 5, default_gc="--default-gc" in sys.argv))
        )
    )

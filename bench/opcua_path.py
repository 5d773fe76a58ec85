"""The OPC UA source's cost per notification, in one process, without a server.

``python -m bench.opcua_path [TICKS]``: TICKS PublishResponses of 10,000 Double items are
encoded once; then (raw side) asyncua decodes them, which is all a bare client does with
them, and (agent side) the same decode followed by the source's own path: the publish
callback, the pending queue, mapping to events and the real Buffer append (fsync). Prints
microseconds of CPU per notification for both and their ratio. No sockets: this isolates
the part the source adds; the end-to-end figure with a server is bench/opcua.py.
"""

from __future__ import annotations

import asyncio
import contextlib
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


async def main(ticks: int) -> dict[str, float]:
    from adapters.sources.opcua import Config, build
    from adapters.sources.opcua.mapping import NodeMapper
    from agent.buffer import Buffer
    from agent.registry import AdapterContext

    blobs = [response(t) for t in range(ticks)]
    c0 = cpu()
    for b in blobs:
        struct_from_binary(ua.PublishResult, UaBuffer(b))
    raw = (cpu() - c0) / (ticks * N)

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
    return {
        "raw_us_per_notification": round(raw * 1e6, 2),
        "agent_us_per_notification": round(agent * 1e6, 2),
        "cpu_multiple": round(agent / raw, 2),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))))

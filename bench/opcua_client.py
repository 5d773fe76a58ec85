"""One side of the OPC UA figure, in its own process so its CPU is its own.

``python -m bench.opcua_client PORT N agent|bare SECONDS``: prints one JSON line with the
notifications/s received and the CPU used (fraction of one core) over SECONDS.
``agent``: the real opcua source committing to a real Buffer (fsync).
``bare``: an asyncua client subscribed to the same items that only counts notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def agent(port: int, n: int, seconds: float) -> dict[str, object]:
    from adapters.sources.opcua import Config, build
    from agent.buffer import Buffer
    from agent.registry import AdapterContext

    cfg = Config.model_validate(
        {
            "endpoint": f"opc.tcp://127.0.0.1:{port}",
            "publishing_interval": "500ms",
            "request_timeout": "60s",
            "nodes": [
                {"node_id": f"nsu=urn:bench;s=V{i}", "sampling_interval": 0, "queue_size": 5}
                for i in range(n)
            ],
        }
    )
    d = Path(tempfile.mkdtemp(prefix="opcua-bench-"))
    buf = await Buffer.open(d / "b.db", on_full="block", max_bytes=1 << 34)
    src = build("b", cfg, AdapterContext("a", "p", d, "bench"))
    task = asyncio.create_task(src.run(buf))
    try:
        end = time.monotonic() + 180
        while src.state().detail.get("items_monitored", 0) < n:
            if time.monotonic() > end:
                raise TimeoutError("items not monitored within 180 s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)
        c0, n0, t0 = cpu(), src.notifications, time.monotonic()
        p0 = src.state().detail["pending"]
        await asyncio.sleep(seconds)
        c1, n1, t1 = cpu(), src.notifications, time.monotonic()
        st = src.state().detail
        last, _ = buf.stream_state(src.stream) if hasattr(src, "stream") else (0, 0)
        return {
            "rate": (n1 - n0) / (t1 - t0),
            "cpu": (c1 - c0) / (t1 - t0),
            "pending_start": p0,
            "pending_end": st["pending"],
            "appends": st["appends"],
            "overflows": st["server_queue_overflows"],
            "committed": last,
        }
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await buf.close()


async def bare(port: int, n: int, seconds: float) -> dict[str, object]:
    from asyncua import Client, ua

    from adapters.sources.opcua.config import NodeConfig
    from adapters.sources.opcua.source import monitoring_request

    c = Client(f"opc.tcp://127.0.0.1:{port}", timeout=60, watchdog_intervall=30.0)
    await c.connect()
    count = 0

    async def cb(res: ua.PublishResult) -> None:
        nonlocal count
        for note in res.NotificationMessage.NotificationData or []:
            if isinstance(note, ua.DataChangeNotification):
                count += len(note.MonitoredItems)

    try:
        p = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=500,
            RequestedMaxKeepAliveCount=10,
            RequestedLifetimeCount=300,
            PublishingEnabled=True,
        )
        r = await c.uaclient.create_subscription(p, cb)
        ns = await c.get_namespace_index("urn:bench")
        nc = NodeConfig(node_id="i=1", sampling_interval=0, queue_size=5)
        for s in range(0, n, 1000):
            prm = ua.CreateMonitoredItemsParameters(
                SubscriptionId=r.SubscriptionId,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[
                    monitoring_request(i + 1, ua.NodeId(f"V{i}", ns), nc)
                    for i in range(s, min(n, s + 1000))
                ],
            )
            await c.uaclient.create_monitored_items(prm)
        await asyncio.sleep(5)
        c0, n0, t0 = cpu(), count, time.monotonic()
        await asyncio.sleep(seconds)
        c1, n1, t1 = cpu(), count, time.monotonic()
        return {"rate": (n1 - n0) / (t1 - t0), "cpu": (c1 - c0) / (t1 - t0)}
    finally:
        await c.disconnect()


if __name__ == "__main__":
    port, n, mode, secs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    fn = agent if mode == "agent" else bare
    print(json.dumps(asyncio.run(fn(port, n, secs))), flush=True)

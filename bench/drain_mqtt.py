"""Figure 3: drain a backlog to a local mosquitto (StreamForwarder + MqttSink, QoS 1) vs raw
paho publishing the same batches at QoS 1; the buffer read rate alone beside it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import Ctx, figure, fill, ratio, wait_until


async def read_rate(path: Path, stream: str) -> tuple[float, list[bytes]]:
    """take_batch alone (read + persist the batch id), the agent's read path, and the
    payloads it forms."""
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    payloads: list[bytes] = []
    after = n = 0
    t = time.perf_counter()
    try:
        for _ in range(10_000):  # bounded
            b = await buf.take_batch(stream, after, 1000, 1 << 20)
            if b is None:
                break
            payloads.append(b.payload)
            after, n = b.last_sequence, n + len(b)
        el = time.perf_counter() - t
    finally:
        await buf.close()
    return n / el, payloads


def raw_paho(port: int, payloads: list[bytes], n: int) -> float:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    acked = [0]

    def on_pub(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_publish = on_pub
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        time.sleep(0.2)
        t = time.perf_counter()
        for p in payloads:
            c.publish("edge/p/raw1", p, qos=1)
        if not done.wait(120):
            raise TimeoutError("raw paho: broker did not acknowledge every publish in 120 s")
        return n / (time.perf_counter() - t)
    finally:
        c.disconnect()
        c.loop_stop()


async def agent_drain(url: str, path: Path, d: Path, n: int) -> float:
    from adapters.sinks.mqtt import Config, MqttSink
    from agent.buffer import Buffer
    from agent.forwarder import ForwarderSettings, StreamForwarder
    from agent.registry import AdapterContext

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    sink = MqttSink("central", Config(url=url), AdapterContext("a", "p", d, "bench"))
    await sink.start()
    task = None
    try:
        await wait_until(lambda: sink.state().state == "connected", 20, "MQTT connect")
        fw = StreamForwarder(buf, "line1", sink, ForwarderSettings())
        t = time.perf_counter()
        task = asyncio.create_task(fw.run())
        await wait_until(lambda: buf.stream_state("line1")[1] >= n, 600, "MQTT drain")
        return n / (time.perf_counter() - t)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await sink.stop()
        await buf.close()


def run(ctx: Ctx) -> dict[str, Any]:
    from tests.fixtures.mosquitto import Mosquitto, free_port

    d = ctx.dir("drain_mqtt")
    n = ctx.n(200_000, 50_000)
    asyncio.run(fill(d / "agent.db", n, "line1"))
    asyncio.run(fill(d / "raw.db", n, "raw1"))
    rr, payloads = asyncio.run(read_rate(d / "raw.db", "raw1"))
    broker = Mosquitto(d / "broker", free_port()).start()
    try:
        raw = raw_paho(broker.port, payloads, n)
        agent = asyncio.run(agent_drain(broker.url, d / "agent.db", d, n))
    finally:
        broker.kill()
    kb = sum(map(len, payloads)) / len(payloads) / 1000
    return {
        "drain_mqtt": figure(
            value=agent,
            unit="events/s",
            raw=raw,
            raw_label="paho QoS 1 publishing the same batches (paho defaults)",
            target=">= 0.25",
            met=ratio(agent, raw) >= 0.25,
            detail=f"{n:,} event backlog, ~{kb:.0f} KB batches; buffer read path alone {rr:,.0f}/s",
        ),
        "buffer_read": figure(
            value=rr,
            unit="events/s",
            raw=raw,
            raw_label="paho QoS 1, same batches",
            detail="take_batch (read + persist the batch id, one transaction) with nothing sent",
        ),
    }

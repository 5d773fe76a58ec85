"""Figure 3: drain a backlog to a local mosquitto (StreamForwarder + MqttSink, QoS 1) vs raw
paho publishing the same batches at QoS 1; the buffer read rate alone beside it; and
``drain_mqtt_process``: the whole agent process (``python -m agent run``) draining the
backlog, timed by its acknowledged cursor (read from the file), vs raw paho sending the same messages
(same topic, payloads and MQTT 5 properties) with the agent's in-flight window."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.agent_process import drain_process
from bench.common import (
    REPO,
    Ctx,
    adapter_context_class,
    copy_db,
    figure,
    fill,
    ratio,
    wait_until,
)

#: the agent's MQTT in-flight window (adapters/sinks/mqtt: max_in_flight defaults to 20, and
#: the connection lowers it to the broker's Receive Maximum when that is lower; mosquitto's
#: default is 20 too), which the raw side copies
WINDOW = 20


async def read_rate(path: Path, stream: str) -> tuple[float, list[Any]]:
    """take_batch alone (read + persist the batch id), the agent's read path, and the
    batches it forms."""
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    payloads: list[Any] = []
    after = n = 0
    t = time.perf_counter()
    try:
        for _ in range(10_000):  # bounded
            b = await buf.take_batch(stream, after, 1000, 1 << 20)
            if b is None:
                break
            payloads.append(b)
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


def raw_in_fresh_process(
    kind: str, d: Path, port: int, batches: list[Any], n: int, window: int
) -> float:
    """A raw side (``plain``: raw_paho, ``contract``: raw_paho_contract) in a process of
    its own, which has imported no revision's agent code and inherits none of its threads,
    heap or collector state. Run in the revision's process, the same 200 publishes took
    0.7 M to 2.2 M events/s depending on which revision had just run there, which made
    the ratios measure the leftovers, not the limit."""
    items = [(b.payload, b.batch_id, b.first_sequence, b.last_sequence, b.epoch) for b in batches]
    path = d / f"raw-{kind}.pickle"
    path.write_bytes(pickle.dumps(items))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.drain_mqtt",
            "--raw",
            kind,
            str(path),
            str(port),
            str(n),
            str(window),
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"raw {kind} paho side failed: {out.stderr[-800:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _raw_main(kind: str, path: str, port: str, n: str, window: str) -> None:
    items = pickle.loads(Path(path).read_bytes())
    if kind == "plain":
        rate = raw_paho(int(port), [i[0] for i in items], int(n))
    else:
        batches = [
            SimpleNamespace(payload=p, batch_id=b, first_sequence=f, last_sequence=la, epoch=e)
            for p, b, f, la, e in items
        ]
        rate = raw_paho_contract(int(port), batches, int(n), int(window))
    print(rate)


class FirstMessage:
    """A QoS 0 subscriber that notes when the first message on ``topic`` arrives
    (``time.monotonic()``) and then unsubscribes, so it costs the broker one delivery."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.at: float | None = None
        self.port, self.topic = port, topic
        self.subscribed = threading.Event()
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.c.on_connect = lambda c, *_: c.subscribe(topic, qos=0)
        self.c.on_subscribe = lambda *_: self.subscribed.set()
        self.c.on_message = self._on_message

    def _on_message(self, c: Any, *_: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()
            c.unsubscribe(self.topic)

    def __enter__(self) -> FirstMessage:
        self.c.connect("127.0.0.1", self.port)
        self.c.loop_start()
        if not self.subscribed.wait(20):
            raise TimeoutError("the first-message subscriber could not subscribe in 20 s")
        return self

    def __exit__(self, *_: Any) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def raw_paho_contract(port: int, batches: list[Any], n: int, window: int) -> float:
    """Raw paho sending what the agent sends: the contract's topic, payload and MQTT 5
    properties per batch, QoS 1, at most ``window`` unacknowledged."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    msgs = []
    for b in batches:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/cloudevents-batch+json"
        props.PayloadFormatIndicator = 1
        props.UserProperty = [
            ("batch-id", b.batch_id),
            ("stream", "line1"),
            ("first-sequence", f"{b.first_sequence:020d}"),
            ("last-sequence", f"{b.last_sequence:020d}"),
            ("stream-epoch", b.epoch),
        ]
        msgs.append((b.payload, props))
    done = threading.Event()
    acked = [0]

    def on_pub(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == len(msgs):
            done.set()

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(window)
    c.on_publish = on_pub
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        time.sleep(0.2)
        t = time.perf_counter()
        for payload, props in msgs:
            c.publish("edge/p/line1", payload, qos=1, properties=props)
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

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    sink = MqttSink("central", Config(url=url), adapter_context_class()("a", "p", d, "bench"))
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
    copy_db(d / "agent.db", d / "process.db")  # the same backlog for the whole agent
    rr, batches = asyncio.run(read_rate(d / "raw.db", "raw1"))
    payloads = [b.payload for b in batches]
    broker = Mosquitto(d / "broker", free_port()).start()
    try:
        raw = raw_in_fresh_process("plain", d, broker.port, batches, n, WINDOW)
        agent = asyncio.run(agent_drain(broker.url, d / "agent.db", d, n))
        raw_c = raw_in_fresh_process("contract", d, broker.port, batches, n, WINDOW)
        sink = f'type = "mqtt"\nurl = "{broker.url}"\n'
        with FirstMessage(broker.port, "edge/p/line1") as first:
            proc_rate, proc_note = drain_process(
                d / "process.db", d / "process", n, sink, lambda: first.at
            )
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
        "drain_mqtt_process": figure(
            value=proc_rate,
            unit="events/s",
            raw=raw_c,
            raw_label=(
                f"paho QoS 1, the same topic, payloads and MQTT 5 properties, {WINDOW} in flight"
            ),
            target=">= 0.4",
            met=ratio(proc_rate, raw_c) >= 0.4,
            detail=f"`python -m agent run` draining {n:,} events: {proc_note}",
        ),
        "buffer_read": figure(
            value=rr,
            unit="events/s",
            raw=raw,
            raw_label="paho QoS 1, same batches",
            detail="take_batch (read + persist the batch id, one transaction) with nothing sent",
        ),
    }


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--raw":
        _raw_main(*sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.drain_mqtt --raw plain|contract FILE PORT N WINDOW")

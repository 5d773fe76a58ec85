"""The plain MQTT 3.1.1 cases against amqtt, always (mosquitto installed or not).

Where mosquitto is missing, amqtt serves the plain 3.1.1 cases (``mqtt311_broker``); these
tests keep that path exercised in CI, where mosquitto is installed: the MQTT sink
(protocol "3.1.1") delivers ordered batches to a real subscriber, survives a killed
broker and keeps presence; the MQTT source (protocol "3.1.1") receives, commits into the
real Buffer and acknowledges (PUBACKs counted in amqtt's packet log), and resubscribes
after a broker restart. (amqtt 0.12 keeps no offline session for anonymous clients, so
"published while the source was stopped" stays a mosquitto case.)

The broker is a real amqtt process (tests/fixtures/amqtt_broker.py), killed for real.
Every test name says ``amqtt``; the junit property ``mqtt_broker`` names the version.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest

from adapters.sinks.mqtt import MqttSink
from adapters.sources.mqtt import build
from agent.buffer import Buffer
from agent.interfaces import Outcome
from tests.fixtures import mosquitto as mosquitto_fixture
from tests.fixtures.amqtt_broker import AmqttBroker, AmqttFactory
from tests.fixtures.mosquitto import MqttBroker
from tests.fixtures.mqtt_sink import (
    STATUS_TOPIC,
    batches,
    make_batch,
    received,
    topic_of,
    wait_state,
)
from tests.fixtures.mqtt_source import (
    CTX,
    STREAM,
    Publisher,
    canonical,
    make_config,
    mes_counted,
    running,
    stored,
    wait_stored,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


V311 = {"protocol": "3.1.1"}


def same_surface(broker: AmqttBroker) -> Any:
    """The source tests' helpers are annotated for Mosquitto; amqtt has the same surface
    (host, port, url, tls) for what they use."""
    return broker


@pytest.fixture
async def buf(tmp_path: Path) -> Any:
    b = await Buffer.open(tmp_path / "buffer.db", plant="plant-test", agent_id="test-agent")
    try:
        yield b
    finally:
        await b.close()


# --------------------------------------------------------------------------- selection


def test_without_mosquitto_plain_311_cases_go_to_amqtt_and_the_rest_fail(
    monkeypatch: pytest.MonkeyPatch, amqtt_factory: AmqttFactory
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(os, "access", lambda _path, _mode: False)
    assert mosquitto_fixture.plain_311_broker_kind() == "amqtt"
    # a case that needs mosquitto still fails, with the install command
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y mosquitto"):
        mosquitto_fixture.mosquitto_binary()
    # ... and amqtt refuses to pretend it can do mosquitto's features
    for option in ({"acl": "topic read #"}, {"passwords": {"a": "b"}}, {"max_packet_size": 9}):
        with pytest.raises(pytest.fail.Exception, match="needs mosquitto"):
            amqtt_factory(**option)
    monkeypatch.undo()
    expected = "mosquitto" if mosquitto_fixture.find_mosquitto() else "amqtt"
    assert mosquitto_fixture.plain_311_broker_kind() == expected


# what this run picks for the plain 3.1.1 cases, and amqtt whatever it picks
@pytest.mark.parametrize(
    "mqtt311_broker", sorted({mosquitto_fixture.plain_311_broker_kind(), "amqtt"}), indirect=True
)
async def test_mqtt311_broker_serves_the_plain_case(
    mqtt311_broker: MqttBroker, mqtt_subscriber: Any, make_sink: Any, request: Any
) -> None:
    """The selecting fixture: its id says which broker ([mosquitto] or [amqtt])."""
    assert mqtt311_broker.kind == request.node.callspec.params["mqtt311_broker"]
    assert ("mqtt_broker", mqtt311_broker.describe()) in request.node.user_properties
    sub = mqtt_subscriber(mqtt311_broker, topic_of("line1"), protocol=mqtt.MQTTv311)
    sink = await make_sink(mqtt311_broker, **V311)
    sent = batches("line1", 3)
    assert [(await sink.send(b)).outcome for b in sent] == [Outcome.ACCEPTED] * 3
    msgs = await received(sub, lambda m: len(m) >= 3)
    assert [m.payload for m in msgs] == [b.payload for b in sent]


async def test_amqtt_refuses_mqtt5_so_only_311_cases_may_use_it(
    amqtt_broker: AmqttBroker, make_sink: Any
) -> None:
    sink = await make_sink(amqtt_broker, connect_timeout=1)  # protocol "5", the default
    r = await sink.send(make_batch("line1", 1, 1))
    assert r.outcome is Outcome.RETRY
    # amqtt drops an MQTT 5 CONNECT without a CONNACK: the sink says so and keeps trying
    await wait_state(sink, "disconnected")
    assert "CONNACK" in (sink.state().last_error or "")


# --------------------------------------------------------------------------- sink


@pytest.mark.parametrize("window", [1, 8])
async def test_sink_311_batches_arrive_in_order_on_amqtt(
    amqtt_broker: AmqttBroker, mqtt_subscriber: Any, make_sink: Any, window: int
) -> None:
    sub = mqtt_subscriber(amqtt_broker, "edge/+/+")
    assert sub.client.protocol == mqtt.MQTTv311
    sink = await make_sink(amqtt_broker, max_in_flight=window, **V311)
    line1, line2 = batches("line1", 20), batches("line2", 20)
    sem = {s: asyncio.Semaphore(window) for s in ("line1", "line2")}

    async def send(b: Any) -> Any:
        async with sem[b.stream]:
            return await sink.send(b)

    # two streams interleaved, each with up to `window` batches in flight, created in order
    tasks = [asyncio.create_task(send(b)) for pair in zip(line1, line2, strict=True) for b in pair]
    results = await asyncio.gather(*tasks)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 40

    msgs = await received(sub, lambda m: len(m) >= 40)
    for stream, sent in (("line1", line1), ("line2", line2)):
        got = [m for m in msgs if m.topic == topic_of(stream)]
        assert [m.payload for m in got] == [b.payload for b in sent]
        assert [[e["id"] for e in orjson.loads(m.payload)] for m in got] == [
            list(b.ids) for b in sent
        ]
        assert not any(m.retain for m in got)
    st = sink.state()
    assert st.state == "connected" and st.healthy
    assert st.detail["acknowledged"] == 40 and st.detail["in_flight"] == 0


async def test_sink_311_presence_on_amqtt(
    amqtt_broker: AmqttBroker, mqtt_subscriber: Any, make_sink: Any
) -> None:
    """Retained "online", then retained "offline" on stop. (amqtt 0.12 may hand a new
    subscriber the retained message more than once; mosquitto sends it once.)"""
    sink = await make_sink(amqtt_broker, **V311)
    await wait_state(sink, "connected")
    late = mqtt_subscriber(amqtt_broker, STATUS_TOPIC)  # subscribes after: sees the retained
    (online, *_) = await received(late, lambda m: len(m) >= 1)
    assert online.retain and orjson.loads(online.payload)["status"] == "online"
    await sink.stop()
    msgs = await received(late, lambda m: orjson.loads(m[-1].payload)["status"] == "offline")
    assert [orjson.loads(m.payload)["status"] for m in msgs] == ["online"] * (len(msgs) - 1) + [
        "offline"
    ]
    fresh = mqtt_subscriber(amqtt_broker, STATUS_TOPIC)
    kept = await received(fresh, lambda m: len(m) >= 1)
    assert all(m.retain and orjson.loads(m.payload)["status"] == "offline" for m in kept)


async def test_sink_311_amqtt_killed_mid_stream_nothing_lost_order_kept(
    amqtt_broker: AmqttBroker, mqtt_subscriber: Any, make_sink: Any
) -> None:
    sub = mqtt_subscriber(amqtt_broker, topic_of("line1"))
    sink: MqttSink = await make_sink(amqtt_broker, max_in_flight=8, ack_timeout=5, **V311)
    sent = batches("line1", 16)
    first = await asyncio.gather(*(sink.send(b) for b in sent[:8]))
    assert all(r.outcome is Outcome.ACCEPTED for r in first)
    await received(sub, lambda m: len(m) >= 8)

    # frozen, these are surely on the wire without PUBACK; then the broker dies
    assert amqtt_broker.proc is not None
    amqtt_broker.proc.send_signal(signal.SIGSTOP)
    inflight = [asyncio.create_task(sink.send(b)) for b in sent[8:14]]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in inflight)
    await asyncio.to_thread(amqtt_broker.kill)
    lost = await asyncio.gather(*inflight)
    assert [r.outcome for r in lost] == [Outcome.RETRY] * 6
    await wait_state(sink, "disconnected")

    await asyncio.to_thread(amqtt_broker.start)
    await asyncio.to_thread(sub.wait_subscriptions, 2)
    await wait_state(sink, "connected")
    resent = await asyncio.gather(*(sink.send(b) for b in sent[8:]))
    assert all(r.outcome is Outcome.ACCEPTED for r in resent)

    msgs = await received(sub, lambda m: len(m) >= 16)
    assert [m.payload for m in msgs] == [b.payload for b in sent]


async def test_sink_311_configured_max_packet_size_on_amqtt(
    amqtt_broker: AmqttBroker, make_sink: Any
) -> None:
    sink = await make_sink(amqtt_broker, max_packet_size="4KiB", **V311)
    r = await sink.send(make_batch("line1", 1, 30))
    assert r.outcome is Outcome.TOO_LARGE and "max_packet_size" in r.reason
    assert (await sink.send(make_batch("line1", 1, 2))).outcome is Outcome.ACCEPTED


# --------------------------------------------------------------------------- source


async def test_source_311_receives_in_order_commits_and_acknowledges_on_amqtt(
    amqtt_factory: AmqttFactory, buf: Buffer
) -> None:
    broker = amqtt_factory(packet_log=True)  # to count the source's PUBACKs
    source = build(STREAM, make_config(same_surface(broker), **V311), CTX)
    pub = await asyncio.to_thread(Publisher, same_surface(broker))
    try:
        async with running(source, buf):
            for n in range(1, 9):
                if n % 3 == 0:  # an array payload: two events in one message
                    payload: Any = [canonical(n), canonical(n + 100)]
                    await asyncio.to_thread(pub.publish, "plant/mes/wo", payload)
                else:
                    await asyncio.to_thread(pub.publish, "plant/line1/c4/counted", mes_counted(n))
            events = await wait_stored(buf, 10)
            await wait_until(lambda: broker.pubacks_from(source.client_id) == 8)
    finally:
        await asyncio.to_thread(pub.close)
    got = [
        e["data"]["good"]["value"] if e["type"] == "mfg.production.counted" else e["subject"]
        for e in events
    ]
    assert got == [1, 2, "WO-3", "WO-103", 4, 5, "WO-6", "WO-106", 7, 8]
    st = source.state()
    assert st.detail["accepted"] == 10 and st.detail["messages"] == 8


async def test_source_311_resubscribes_after_amqtt_restart(
    amqtt_broker: AmqttBroker, buf: Buffer
) -> None:
    source = build(STREAM, make_config(same_surface(amqtt_broker), **V311), CTX)
    async with running(source, buf):
        await asyncio.to_thread(amqtt_broker.restart)  # SIGKILL: sessions gone
        await wait_until(lambda: source.state().state == "disconnected")
        await wait_until(
            lambda: source.state().state == "connected" and source.state().detail["subscribed"],
            within=15,
        )
        pub = await asyncio.to_thread(Publisher, same_surface(amqtt_broker))
        try:
            await asyncio.to_thread(pub.publish, "plant/mes/a", canonical(1))
        finally:
            await asyncio.to_thread(pub.close)
        [ev] = await wait_stored(buf, 1)
    assert ev["subject"] == "WO-1"
    assert await stored(buf) == [ev]

"""The Sparkplug B host source against Eclipse Tahu's JavaScript edge node, over mosquitto.

Every test runs a real mosquitto, the real Buffer, our source, and an edge node built on
Tahu's ``sparkplug-client`` (tests/interop/sparkplug/edge_node.cjs). What is asserted is
our contract: the events we commit, what we publish on the wire (STATE, NCMD rebirth
requests), and what status says. The Tahu client's own choices (its seq wrap, its bdSeq
that stays 0) are only fed in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.sources.sparkplug import build
from adapters.sources.sparkplug import payload as sp
from agent.buffer import Buffer
from agent.vocabulary import validate_data
from tests.fixtures.mosquitto import Mosquitto, Subscriber
from tests.fixtures.sparkplug import (
    CTX,
    STATE_TOPIC,
    STREAM,
    make_config,
    rebirth_requests,
    running,
    signals,
    states,
    transitions,
    wait_stored,
    wait_until,
)
from tests.fixtures.sparkplug_peers import TahuEdgeNode


@pytest.fixture
async def buf(tmp_path: Path) -> AsyncIterator[Buffer]:
    b = await Buffer.open(tmp_path / "buffer.db", plant="plant-test", agent_id="test-agent")
    try:
        yield b
    finally:
        await b.close()


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])  # 3.1.1 the default (config.py says why)
async def test_birth_data_death_with_aliases(
    mosquitto: Mosquitto,
    mqtt_subscriber: Callable[..., Subscriber],
    buf: Buffer,
    tahu: Any,
    protocol: str,
) -> None:
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    source = build(STREAM, make_config(mosquitto, protocol=protocol), CTX)
    async with running(source, buf, wire):
        node: TahuEdgeNode = await asyncio.to_thread(tahu, mosquitto)
        node.send(cmd="birth")
        await wait_stored(buf, lambda ev: len(signals(ev, "Offset")) == 1)
        node.send(cmd="ddata", temp=21.5, count=7, running=True, ts=1764590400123)
        node.send(cmd="ndata", uptime=12)
        await wait_stored(buf, lambda ev: len(signals(ev, "Uptime")) == 2)
        node.send(cmd="ddeath")
        await wait_stored(
            buf, lambda ev: ("Plant1/Line1/Filler", "offline", "death") in transitions(ev)
        )
        node.send(cmd="stop")  # NDEATH with the birth's bdSeq
        events = await wait_stored(
            buf, lambda ev: ("Plant1/Line1", "offline", "death") in transitions(ev)
        )

    assert transitions(events) == [
        ("Plant1/Line1", "online", "birth"),
        ("Plant1/Line1/Filler", "online", "birth"),
        ("Plant1/Line1/Filler", "offline", "death"),
        ("Plant1/Line1", "offline", "death"),
    ]
    # every birth value, then the data decoded through the aliases of the births
    got = [
        (e["subject"], e["data"]["value"], e["data"]["sparkplug"]["message"])
        for e in signals(events)
    ]
    assert got == [
        ("Plant1/Line1/Uptime", 0, "NBIRTH"),
        ("Plant1/Line1/Site", "Plant 1", "NBIRTH"),
        ("Plant1/Line1/Filler/Temperature", 20.0, "DBIRTH"),
        ("Plant1/Line1/Filler/Count", 0, "DBIRTH"),
        ("Plant1/Line1/Filler/Running", False, "DBIRTH"),
        ("Plant1/Line1/Filler/Offset", -3, "DBIRTH"),
        ("Plant1/Line1/Filler/Temperature", 21.5, "DDATA"),
        ("Plant1/Line1/Filler/Count", 7, "DDATA"),
        ("Plant1/Line1/Filler/Running", True, "DDATA"),
        ("Plant1/Line1/Uptime", 12, "NDATA"),
    ]
    temp = signals(events, "Temperature")[1]
    assert temp["time"] == "2025-12-01T12:00:00.123000Z"  # the metric's own timestamp
    assert temp["data"]["data_type"] == "Double" and temp["data"]["time_basis"] == "source"
    assert temp["data"]["uom"] == "CEL" and temp["data"]["engineering_unit"] == "°C"
    assert temp["data"]["sparkplug"]["alias"] == 10
    assert temp["data"]["quality"] == "good"
    assert signals(events, "Offset")[0]["data"]["data_type"] == "Int16"
    for e in events:  # the shape is exactly the published vocabulary
        assert validate_data(e["type"], e["data"]) == e["data"]
    detail = source.state().detail
    assert detail["seq_gaps"] == 0 and detail["rebirths_requested"] == 0
    assert rebirth_requests(wire) == []
    # stopping: STATE offline, retained, with the Will's timestamp of the online before it
    await asyncio.to_thread(wire.wait_for, lambda _m: not states(wire)[-1]["online"])
    st = states(wire)
    assert st[-1]["online"] is False and st[-2]["online"] is True
    assert st[-1]["timestamp"] == st[-2]["timestamp"]
    # the session as the specification asks of each protocol (clean session / clean start)
    flags = "(p2, c1" if protocol == "3.1.1" else "(p5, c1"
    assert f"as edge-agent-test-spb {flags}" in mosquitto.log()


async def test_seq_gap_is_answered_by_a_rebirth_request_on_the_wire(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], buf: Buffer, tahu: Any
) -> None:
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    source = build(STREAM, make_config(mosquitto), CTX)
    async with running(source, buf, wire):
        node = await asyncio.to_thread(tahu, mosquitto)
        node.send(cmd="birth")
        node.send(cmd="ddata", count=1)
        await wait_stored(buf, lambda ev: len(signals(ev, "Count")) == 2)
        assert rebirth_requests(wire) == []
        node.send(cmd="skip_seq")  # a message lost between the edge node and us
        node.send(cmd="ddata", count=2)
        await asyncio.to_thread(wire.wait_for, lambda _m: len(rebirth_requests(wire)) >= 1)
        # the edge node answers with new births; data decodes again afterwards
        await asyncio.to_thread(node.wait_for, lambda e: e.get("event") == "ncmd" and e["rebirth"])
        await wait_stored(
            buf, lambda ev: len([t for t in transitions(ev) if t[2] == "rebirth"]) == 2
        )
        node.send(cmd="ddata", count=3)
        events = await wait_stored(buf, lambda ev: signals(ev, "Count")[-1]["data"]["value"] == 3)
        detail = source.state().detail
    assert detail["seq_gaps"] == 1
    assert detail["rebirths_requested"] == 1
    assert len(rebirth_requests(wire)) == 1
    # the data after the gap is still what the edge node sent: committed, not guessed
    assert [e["data"]["value"] for e in signals(events, "Count")] == [0, 1, 2, 0, 3]
    assert transitions(events) == [
        ("Plant1/Line1", "online", "birth"),
        ("Plant1/Line1/Filler", "online", "birth"),
        ("Plant1/Line1", "online", "rebirth"),
        ("Plant1/Line1/Filler", "online", "rebirth"),
    ]


async def test_data_before_birth_is_refused_and_answered_by_a_rebirth_request(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], buf: Buffer, tahu: Any
) -> None:
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    node = await asyncio.to_thread(tahu, mosquitto)
    node.send(cmd="birth")  # before the host runs: it never sees these births
    await asyncio.to_thread(wire.wait_for, lambda ms: any("/DBIRTH/" in m.topic for m in ms))
    source = build(STREAM, make_config(mosquitto), CTX)
    async with running(source, buf, wire):
        node.send(cmd="ddata", count=5)
        await asyncio.to_thread(wire.wait_for, lambda _m: len(rebirth_requests(wire)) >= 1)
        await wait_stored(buf, lambda ev: len(signals(ev, "Count")) == 1)
        node.send(cmd="ddata", count=6)
        events = await wait_stored(buf, lambda ev: len(signals(ev, "Count")) == 2)
        detail = source.state().detail
    # the DDATA with unknown aliases is not guessed at: refused, counted, rebirth asked
    assert detail["refused"].get("no_birth") == 1
    assert [
        (e["data"]["value"], e["data"]["sparkplug"]["message"]) for e in signals(events, "Count")
    ] == [
        (0, "DBIRTH"),
        (6, "DDATA"),
    ]


async def test_state_goes_offline_while_the_buffer_refuses_and_online_after(
    mosquitto: Mosquitto,
    mqtt_subscriber: Callable[..., Subscriber],
    tmp_path: Path,
    tahu: Any,
) -> None:
    small = await Buffer.open(
        tmp_path / "small.db", plant="p", agent_id="a", max_bytes=12_000, on_full="block"
    )
    try:
        wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
        source = build(STREAM, make_config(mosquitto), CTX)
        async with running(source, small, wire):
            node = await asyncio.to_thread(tahu, mosquitto)
            node.send(cmd="birth")
            n = 0
            # data until the buffer refuses: STATE offline, retained, with a newer timestamp
            while not any(not s["online"] for s in states(wire)):
                n += 1
                node.send(cmd="ddata", count=n)
                await asyncio.sleep(0.02)
                assert n < 2000, "the buffer never filled"
            offline = [s for s in states(wire) if not s["online"]][-1]
            online_before = [s for s in states(wire) if s["online"]][-1]
            assert offline["timestamp"] > online_before["timestamp"]
            assert source.state().detail["host_state"] == "offline"
            sent = n
            for _ in range(3):  # still published while we are offline (Tahu ignores STATE)
                sent += 1
                node.send(cmd="ddata", count=sent)
            await asyncio.sleep(0.3)
            assert source.state().detail["host_state"] == "offline"
            # the sink drains: room again, STATE online with a newer timestamp
            drained: list[int] = []
            while not any(
                s["online"] for s in states(wire) if s["timestamp"] > offline["timestamp"]
            ):
                batch = await small.take_batch(STREAM, 0, 100_000, 1 << 30)
                if batch:
                    drained += [
                        orjson.loads(b)["data"]["value"]
                        for b in batch.bodies
                        if b"Filler/Count" in b
                    ]
                    await small.ack(batch)
                await asyncio.sleep(0.05)
            await wait_until(lambda: source.state().detail["host_state"] == "online")
            # every value received while full was held, then committed in order
            async with asyncio.timeout(20):
                while not drained or drained[-1] != sent:
                    batch = await small.take_batch(STREAM, 0, 100_000, 1 << 30)
                    if batch:
                        drained += [
                            orjson.loads(b)["data"]["value"]
                            for b in batch.bodies
                            if b"Filler/Count" in b
                        ]
                        await small.ack(batch)
                    await asyncio.sleep(0.05)
        assert drained == [0, *range(1, sent + 1)]
        assert source.state().detail["dropped_overflow"] == 0
    finally:
        await small.close()


async def test_an_offline_state_for_our_host_id_is_answered_by_online(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], buf: Buffer
) -> None:
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    source = build(STREAM, make_config(mosquitto), CTX)
    async with running(source, buf, wire):
        born = [s for s in states(wire) if s["online"]][-1]
        stale = orjson.dumps({"online": False, "timestamp": born["timestamp"] - 1000})
        wire.client.publish(STATE_TOPIC, stale, qos=1, retain=True)
        await asyncio.to_thread(
            wire.wait_for,
            lambda _m: any(
                s["online"] and s["timestamp"] > born["timestamp"] for s in states(wire)
            ),
        )
        assert source.state().detail["host_state"] == "online"


async def test_qos1_sparkplug_messages_are_acknowledged_only_after_commit(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], tmp_path: Path
) -> None:
    """Sparkplug data is QoS 0; what a node publishes at QoS 1 gets our PUBACK only once
    committed (the mosquitto log shows the PUBACKs it received from us)."""
    import re

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    def pubacks() -> int:
        return len(re.findall(r"Received PUBACK from edge-agent-test-spb\b", mosquitto.log()))

    def payload(seq: int, *metrics: tuple[str, int, float]) -> bytes:
        msg = sp.Payload()
        msg.timestamp, msg.seq = 1764590400000, seq
        for name, alias, value in metrics:
            m = msg.metrics.add()
            if name:
                m.name, m.datatype = name, sp.DATATYPE_CODES["Double"]
            m.alias, m.double_value = alias, value
        return bytes(msg.SerializeToString())

    small = await Buffer.open(
        tmp_path / "small.db", plant="p", agent_id="a", max_bytes=4_000, on_full="block"
    )
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="qos1-node")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
        source = build(STREAM, make_config(mosquitto), CTX)
        async with running(source, small, wire):
            pub.publish("spBv1.0/Plant1/NBIRTH/Q", payload(0, ("T", 1, 0.0)), qos=1)
            await wait_until(lambda: pubacks() == 1)
            n = 0
            while not source.state().detail["held_back"]:
                n += 1
                pub.publish("spBv1.0/Plant1/NDATA/Q", payload(n % 256, ("", 1, float(n))), qos=1)
                await asyncio.sleep(0.05)
                assert n < 200, "the buffer never filled"
            held = pubacks()
            assert held < n + 1  # the message being held has no PUBACK
            await asyncio.sleep(0.3)
            assert pubacks() == held
            batch = await small.take_batch(STREAM, 0, 100_000, 1 << 30)
            assert batch is not None
            await small.ack(batch)
            await wait_until(lambda: pubacks() >= n + 1)
    finally:
        pub.disconnect()
        pub.loop_stop()
        await small.close()

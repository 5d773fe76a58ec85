"""The Sparkplug source's read-ahead paho client (adapters/sources/sparkplug/client.py)
against a real mosquitto: every message, in order, whatever the chunk boundaries; QoS 1
acknowledged only when we say; writes still go out during a flood; a reconnect after the
broker restarts starts from a clean chunk."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from adapters.sources.sparkplug import client as readahead
from tests.fixtures.mosquitto import Mosquitto

CLIENT: Any = readahead.ReadAheadClient


class Received:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int, int]] = []
        self.lock = threading.Lock()
        self.connects = 0

    def wait(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {n} received"
            time.sleep(0.01)


def subscriber(broker: Mosquitto, topic: str, qos: int = 0) -> tuple[Any, Received]:
    got = Received()
    c = CLIENT(
        CallbackAPIVersion.VERSION2,
        client_id="readahead-test",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
        manual_ack=True,
    )
    subscribed = threading.Event()

    def on_connect(cl: Any, *_a: Any) -> None:
        got.connects += 1
        cl.subscribe(topic, qos=qos)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with got.lock:
            got.messages.append((msg.topic, bytes(msg.payload), msg.qos, msg.mid))

    c.on_connect = on_connect
    c.on_subscribe = lambda *_a: subscribed.set()
    c.on_message = on_message
    c.reconnect_delay_set(1, 1)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert subscribed.wait(10)
    return c, got


def publish(broker: Mosquitto, topic: str, bodies: list[bytes], qos: int = 0) -> None:
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="readahead-pub")
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    info = None
    for body in bodies:
        info = pub.publish(topic, body, qos=qos)
    assert info is not None
    info.wait_for_publish(30)
    pub.disconnect()
    pub.loop_stop()


@pytest.mark.parametrize("chunk", [readahead.CHUNK, 7, 1])
def test_every_message_in_order_whatever_the_chunk_boundaries(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """More messages than MAX_PACKETS in one burst, of varied sizes (a 200 KiB one spans
    several chunks), with chunks that split the header and the length bytes."""
    monkeypatch.setattr(readahead, "CHUNK", chunk)
    c, got = subscriber(mosquitto, "ra/#")
    n = readahead.MAX_PACKETS * 3 if chunk > 1 else 300
    bodies = [i.to_bytes(4, "big") * (1 + i % 50) for i in range(n)]
    bodies[n // 2] = b"x" * (200_000 if chunk > 1 else 2_000)  # one byte a recv: slow
    publish(mosquitto, "ra/t", bodies)
    got.wait(n)
    assert [m[1] for m in got.messages] == bodies
    c.disconnect()
    c.loop_stop()


def test_qos1_is_acknowledged_only_when_asked_and_writes_go_out_during_a_flood(
    mosquitto: Mosquitto,
) -> None:
    c, got = subscriber(mosquitto, "ra/#", qos=1)
    n = 900  # within mosquitto's default queue of 1,000 per client (beyond: it drops)
    bodies = [b"%d" % i for i in range(n)]
    flood = threading.Thread(target=publish, args=(mosquitto, "ra/q", bodies, 1))
    flood.start()
    got.wait(10)
    time.sleep(0.5)
    # nothing acknowledged (manual_ack): the broker stops at its in-flight window
    held = len(got.messages)
    assert held < n
    time.sleep(0.3)
    assert len(got.messages) == held
    # a publish of ours while messages wait: paho's writes still get their turn
    out = c.publish("ra-out/x", b"ours", qos=1)
    out.wait_for_publish(10)
    assert out.is_published()
    acked = 0
    deadline = time.monotonic() + 60
    while acked < n:
        assert time.monotonic() < deadline, f"{len(got.messages)} of {n} received"
        with got.lock:
            todo = got.messages[acked:]
        for _t, _b, qos, mid in todo:
            c.ack(mid, qos)
        acked += len(todo)
        time.sleep(0.005)
    flood.join(30)
    assert [m[1] for m in got.messages] == bodies
    assert all(m[2] == 1 for m in got.messages)
    c.disconnect()
    c.loop_stop()


def test_reconnect_after_the_broker_restarts_reads_a_fresh_chunk(mosquitto: Mosquitto) -> None:
    c, got = subscriber(mosquitto, "ra/#")
    publish(mosquitto, "ra/t", [b"before-%d" % i for i in range(100)])
    got.wait(100)
    mosquitto.restart()
    deadline = time.monotonic() + 30
    while got.connects < 2 or not c.is_connected():
        assert time.monotonic() < deadline, "did not reconnect"
        time.sleep(0.05)
    time.sleep(0.3)  # the subscription of the new session
    publish(mosquitto, "ra/t", [b"after-%d" % i for i in range(100)])
    got.wait(200)
    assert [m[1] for m in got.messages[100:]] == [b"after-%d" % i for i in range(100)]
    c.disconnect()
    c.loop_stop()

"""The MQTT sink against a real mosquitto and a real paho subscriber.

Delivery, order, properties, presence, outages (broker killed and restarted), refusals
(ACL, password, client certificates) and the broker's maximum packet size.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest

from adapters.sinks.mqtt import MqttSink
from adapters.sinks.mqtt.sink import CONTENT_TYPE, CONTENT_TYPE_GZIP, publish_packet_size
from agent.interfaces import Batch, Outcome, SendResult
from tests.fixtures.mosquitto import (
    Mosquitto,
    MosquittoFactory,
    MqttBroker,
    MqttPki,
    Received,
)
from tests.fixtures.mqtt_sink import (
    AGENT,
    EPOCH,
    PLANT,
    STATUS_TOPIC,
    batches,
    make_batch,
    received,
    topic_of,
    wait_state,
)

pytestmark = pytest.mark.timeout(60)


SinkFactory = Callable[..., "asyncio.Future[MqttSink]"]


def on_topic(topic: str) -> Callable[[list[Received]], list[Received]]:
    return lambda msgs: [m for m in msgs if m.topic == topic]


# --------------------------------------------------------------------------- delivery


@pytest.mark.parametrize("window", [1, 8])
async def test_batches_arrive_in_order_with_contract_properties(
    mosquitto: Mosquitto, mqtt_subscriber: Any, make_sink: Any, window: int
) -> None:
    sub = mqtt_subscriber(mosquitto, f"edge/{PLANT}/+")
    sink = await make_sink(mosquitto, max_in_flight=window)
    assert sink.max_in_flight == window
    line1, line2 = batches("line1", 30), batches("line2", 30)

    sem = {s: asyncio.Semaphore(window) for s in ("line1", "line2")}

    async def send(b: Batch) -> SendResult:
        async with sem[b.stream]:
            return await sink.send(b)

    # interleave two streams, each with up to `window` batches in flight, created in order
    tasks = [asyncio.create_task(send(b)) for pair in zip(line1, line2, strict=True) for b in pair]
    results = await asyncio.gather(*tasks)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 60

    msgs = await received(sub, lambda m: len(m) >= 60)
    for stream, sent in (("line1", line1), ("line2", line2)):
        got = on_topic(topic_of(stream))(msgs)
        assert [m.payload for m in got] == [b.payload for b in sent]
        for m, b in zip(got, sent, strict=True):
            assert m.content_type == CONTENT_TYPE
            assert m.user_properties == {
                "batch-id": b.batch_id,
                "stream": stream,
                "first-sequence": f"{b.first_sequence:020d}",
                "last-sequence": f"{b.last_sequence:020d}",
                "stream-epoch": EPOCH,
            }
            assert not m.retain
            events = orjson.loads(m.payload)
            assert [e["id"] for e in events] == list(b.ids)
    st = sink.state()
    assert st.state == "connected" and st.healthy
    assert st.detail["acknowledged"] == 60 and st.detail["in_flight"] == 0


async def test_gzip_payload_says_so_in_content_type(
    mosquitto: Mosquitto, mqtt_subscriber: Any, make_sink: Any
) -> None:
    sub = mqtt_subscriber(mosquitto, topic_of("line1"))
    sink = await make_sink(mosquitto, gzip=True)
    b = make_batch("line1", 1, 50)
    assert (await sink.send(b)).outcome is Outcome.ACCEPTED
    (m,) = await received(sub, lambda m: len(m) >= 1)
    assert m.content_type == CONTENT_TYPE_GZIP
    assert m.user_properties["content-encoding"] == "gzip"
    assert gzip.decompress(m.payload) == b.payload
    assert len(m.payload) < len(b.payload)


async def test_mqtt_311_carries_the_same_payload(
    mqtt311_broker: MqttBroker, mqtt_subscriber: Any, make_sink: Any
) -> None:
    sub = mqtt_subscriber(mqtt311_broker, topic_of("line1"), protocol=mqtt.MQTTv311)
    sink = await make_sink(mqtt311_broker, protocol="3.1.1", topic_prefix="edge")
    sent = batches("line1", 5)
    results = await asyncio.gather(*(sink.send(b) for b in sent))
    assert all(r.outcome is Outcome.ACCEPTED for r in results)
    msgs = await received(sub, lambda m: len(m) >= 5)
    assert [m.payload for m in msgs] == [b.payload for b in sent]


# --------------------------------------------------------------------------- presence


async def test_presence_online_retained_then_offline_on_stop(
    mosquitto: Mosquitto, mqtt_subscriber: Any, make_sink: Any
) -> None:
    sink = await make_sink(mosquitto)
    await wait_state(sink, "connected")
    # a subscriber that comes later still sees it: retained
    late = mqtt_subscriber(mosquitto, STATUS_TOPIC)
    (online,) = await received(late, lambda m: len(m) >= 1)
    body = orjson.loads(online.payload)
    assert online.retain and online.content_type == "application/json"
    assert body["status"] == "online"
    assert body["agentid"] == AGENT and body["version"] == "9.9.9"
    assert body["started_at"].endswith("Z")

    await sink.stop()
    msgs = await received(late, lambda m: len(m) >= 2)
    offline = orjson.loads(msgs[1].payload)
    assert offline["status"] == "offline" and offline["reason"] == "stopped"
    assert offline["started_at"] == body["started_at"]
    assert msgs[1].content_type == "application/json"  # docs/mqtt.md: every presence message
    # ... and retained: what a new subscriber sees now
    fresh = mqtt_subscriber(mosquitto, STATUS_TOPIC)
    (kept,) = await received(fresh, lambda m: len(m) >= 1)
    assert kept.retain and orjson.loads(kept.payload)["status"] == "offline"
    assert kept.content_type == "application/json"
    assert sink.state().state == "stopped"
    await sink.stop()  # idempotent


# --------------------------------------------------------------------------- outages


async def test_broker_down_at_start_then_up(
    mosquitto_factory: MosquittoFactory, mqtt_subscriber: Any, make_sink: Any
) -> None:
    broker = mosquitto_factory(start=False)
    sink = await make_sink(broker, connect_timeout=0.5)
    b = make_batch("line1", 1, 3)
    started = time.monotonic()
    r = await sink.send(b)
    assert r.outcome is Outcome.RETRY
    assert "refused" in r.reason.lower(), r.reason
    assert time.monotonic() - started < 3
    st = sink.state()
    assert st.state == "disconnected" and "refused" in (st.last_error or "").lower()

    broker.start()
    sub = mqtt_subscriber(broker, topic_of("line1"))
    await wait_state(sink, "connected")
    assert (await sink.send(b)).outcome is Outcome.ACCEPTED
    (m,) = await received(sub, lambda m: len(m) >= 1)
    assert m.user_properties["batch-id"] == b.batch_id


async def test_broker_killed_mid_stream_nothing_lost_order_kept(
    mosquitto: Mosquitto, mqtt_subscriber: Any, make_sink: Any
) -> None:
    """Batches on the wire when the broker dies come back as retry; resent after the
    restart, everything arrives once more under the same batch ids, in order."""
    sub = mqtt_subscriber(mosquitto, topic_of("line1"))
    sink = await make_sink(mosquitto, max_in_flight=8, ack_timeout=5)
    sent = batches("line1", 20)
    first = await asyncio.gather(*(sink.send(b) for b in sent[:10]))
    assert all(r.outcome is Outcome.ACCEPTED for r in first)
    await received(sub, lambda m: len(m) >= 10)

    # freeze the broker so these 8 are surely on the wire without PUBACK, then kill it
    import signal

    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)
    inflight = [asyncio.create_task(sink.send(b)) for b in sent[10:18]]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in inflight)
    mosquitto.kill()
    lost = await asyncio.gather(*inflight)
    assert [r.outcome for r in lost] == [Outcome.RETRY] * 8
    assert all("connection lost" in r.reason for r in lost), lost[0].reason
    await wait_state(sink, "disconnected")
    assert sink.state().last_error
    during = await sink.send(sent[18])
    assert during.outcome is Outcome.RETRY

    mosquitto.start()
    await asyncio.to_thread(sub.wait_subscriptions, 2)
    await wait_state(sink, "connected")
    # a batch queued before the outage must not overtake the resend of the earlier ones
    early = await sink.send(sent[18])
    assert early.outcome is Outcome.RETRY and "must first resend" in early.reason
    resent = await asyncio.gather(*(sink.send(b) for b in sent[10:]))
    assert all(r.outcome is Outcome.ACCEPTED for r in resent)

    msgs = await received(sub, lambda m: len(m) >= 20)
    ids = [m.user_properties["batch-id"] for m in msgs]
    assert ids == [b.batch_id for b in sent]
    assert [m.payload for m in msgs] == [b.payload for b in sent]


async def test_broker_killed_under_continuous_load(
    mosquitto: Mosquitto, mqtt_subscriber: Any, make_sink: Any
) -> None:
    """A forwarder-like loop keeps 8 batches in flight and resends what is not acknowledged;
    the broker is SIGKILLed at a random moment of the stream and restarted.

    Every batch without a PUBACK at the kill arrives after the restart, first arrivals are
    in order, and a duplicate is always the same batch id with the same bytes. (A broker
    without persistence may lose what it acknowledged but had not yet written to the
    subscriber: that is the broker's durability, so those batches are the only ones allowed
    to be missing. test_broker_killed_mid_stream_nothing_lost_order_kept pins the kill to a
    moment where the broker holds nothing it acknowledged and requires every batch.)
    """
    sub = mqtt_subscriber(mosquitto, topic_of("line1"))
    sink = await make_sink(mosquitto, max_in_flight=8, ack_timeout=5)
    sent = batches("line1", 200, size=20)
    accepted: set[str] = set()
    retries = 0
    sixty = asyncio.Event()

    async def forwarder() -> None:
        nonlocal retries
        done = 0
        while done < len(sent):
            window = sent[done : done + sink.max_in_flight]
            results = await asyncio.gather(*(sink.send(b) for b in window))
            for b, r in zip(window, results, strict=True):
                if r.outcome is Outcome.ACCEPTED:
                    accepted.add(b.batch_id)
            for r in results:  # acknowledgements apply in order only
                if r.outcome is not Outcome.ACCEPTED:
                    assert r.outcome is Outcome.RETRY, r
                    retries += 1
                    await asyncio.sleep(0.05)
                    # the subscriber must be back, or the broker drops what we resend
                    await asyncio.to_thread(sub.wait_subscriptions, 2)
                    break
                done += 1
                if done >= 60:
                    sixty.set()

    task = asyncio.create_task(forwarder())
    await asyncio.wait_for(sixty.wait(), 20)
    import signal

    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)  # no PUBACK leaves the broker from now on
    await asyncio.sleep(0.2)  # take in those already on their way
    acked_before_kill = set(accepted)
    mosquitto.kill()
    await asyncio.sleep(0.3)
    mosquitto.start()
    await asyncio.wait_for(task, 30)
    assert retries >= 1 and len(acked_before_kill) < 200

    must_arrive = [b.batch_id for b in sent if b.batch_id not in acked_before_kill]
    msgs = await received(
        sub, lambda m: set(must_arrive) <= {x.user_properties["batch-id"] for x in m}
    )
    by_id = {b.batch_id: b for b in sent}
    first_seen: list[str] = []
    for m in msgs:
        bid = m.user_properties["batch-id"]
        assert m.payload == by_id[bid].payload
        if bid not in first_seen:
            first_seen.append(bid)
    in_order = [b.batch_id for b in sent if b.batch_id in set(first_seen)]
    assert first_seen == in_order
    missing = {b.batch_id for b in sent} - set(first_seen)
    assert missing <= acked_before_kill


async def test_no_puback_within_ack_timeout_drops_the_connection(
    mosquitto: Mosquitto, mqtt_subscriber: Any, make_sink: Any
) -> None:
    import signal

    sub = mqtt_subscriber(mosquitto, topic_of("line1"))
    sink = await make_sink(mosquitto, ack_timeout=1)
    await wait_state(sink, "connected")
    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
    b = make_batch("line1", 1, 3)
    started = time.monotonic()
    r = await sink.send(b)
    assert r.outcome is Outcome.RETRY and "ack_timeout" in r.reason, r
    assert 1 <= time.monotonic() - started < 4
    mosquitto.proc.send_signal(signal.SIGCONT)
    await wait_state(sink, "connected")
    assert (await sink.send(b)).outcome is Outcome.ACCEPTED
    msgs = await received(sub, lambda m: len(m) >= 1)
    assert {m.user_properties["batch-id"] for m in msgs} == {b.batch_id}


async def test_broker_receive_maximum_is_respected(
    mosquitto_factory: MosquittoFactory, mqtt_subscriber: Any, make_sink: Any
) -> None:
    broker = mosquitto_factory(extra="max_inflight_messages 5")
    sub = mqtt_subscriber(broker, topic_of("line1"))
    sink = await make_sink(broker, max_in_flight=16)
    await wait_state(sink, "connected")
    assert sink.state().detail["receive_maximum"] == 5
    sent = batches("line1", 40)
    results = await asyncio.gather(*(sink.send(b) for b in sent))
    assert all(r.outcome is Outcome.ACCEPTED for r in results)
    msgs = await received(sub, lambda m: len(m) >= 40)
    assert [m.user_properties["batch-id"] for m in msgs] == [b.batch_id for b in sent]


# --------------------------------------------------------------------------- refusals

ACL_ALLOW_LINE1 = f"""
topic read #
topic write edge/{PLANT}/agents/#
topic write edge/{PLANT}/line1
"""


async def test_acl_denies_topic_then_allowed(
    mosquitto_factory: MosquittoFactory, mqtt_subscriber: Any, make_sink: Any, caplog: Any
) -> None:
    broker = mosquitto_factory(acl=ACL_ALLOW_LINE1)
    sub = mqtt_subscriber(broker, f"edge/{PLANT}/+")
    sink = await make_sink(broker)
    denied = make_batch("quality", 1, 3)
    r = await sink.send(denied)
    assert r.outcome is Outcome.AUTH, r
    assert r.status == 0x87 and "Not authorized" in r.reason and "ACL" in r.reason
    assert "denied PUBLISH" in broker.log() or "Denied PUBLISH" in broker.log()
    st = sink.state()
    assert st.state == "connected"  # the connection is fine; other streams keep flowing
    assert st.last_error and "Not authorized" in st.last_error
    assert "quality" in st.detail["denied_streams"]
    assert any("Not authorized" in rec.getMessage() for rec in caplog.records)
    other = make_batch("line1", 1, 3)
    assert (await sink.send(other)).outcome is Outcome.ACCEPTED

    broker.write_acl(ACL_ALLOW_LINE1 + f"topic write edge/{PLANT}/quality\n")
    assert (await sink.send(denied)).outcome is Outcome.ACCEPTED
    msgs = await received(sub, lambda m: len(m) >= 2)
    assert [m.user_properties["batch-id"] for m in msgs] == [other.batch_id, denied.batch_id]
    assert "quality" not in sink.state().detail["denied_streams"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_bad_password_is_auth_then_fixed(
    mosquitto_factory: MosquittoFactory, make_sink: Any, tmp_path: Path, protocol: str
) -> None:
    broker = mosquitto_factory(passwords={"edge": "right-secret"}, allow_anonymous=False)
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-secret\n")
    sink = await make_sink(
        broker, name="wrong", username="edge", password_file=str(wrong), protocol=protocol
    )
    r = await sink.send(make_batch("line1", 1, 2))
    assert r.outcome is Outcome.AUTH, r
    # mosquitto says 0x87 "not authorized" for a bad password (it does not tell which)
    assert "0x86" in r.reason or "0x87" in r.reason, r.reason
    assert "password" in r.reason
    await wait_state(sink, "auth_failed")
    assert sink.state().last_error == r.reason
    assert "wrong-secret" not in repr(sink.state())

    right = tmp_path / "right"
    right.write_text("right-secret\n")
    ok = await make_sink(
        broker, name="right", username="edge", password_file=str(right), protocol=protocol
    )
    assert (await ok.send(make_batch("line1", 1, 2))).outcome is Outcome.ACCEPTED


async def test_mtls_accepted(
    mosquitto_factory: MosquittoFactory, mqtt_pki: MqttPki, mqtt_subscriber: Any, make_sink: Any
) -> None:
    broker = mosquitto_factory(
        tls=mqtt_pki, require_certificate=True, use_identity_as_username=True
    )
    reader = mqtt_pki.client_cert("reader")
    sub = mqtt_subscriber(broker, topic_of("line1"), cert=reader)
    agent = mqtt_pki.client_cert(AGENT)
    sink = await make_sink(broker, cert_file=str(agent.cert), key_file=str(agent.key))
    b = make_batch("line1", 1, 4)
    assert (await sink.send(b)).outcome is Outcome.ACCEPTED
    (m,) = await received(sub, lambda m: len(m) >= 1)
    assert m.payload == b.payload
    assert f"as {AGENT}" in broker.log() or f"u'{AGENT}'" in broker.log()


@pytest.mark.parametrize("case", ["untrusted_cert", "no_cert"])
async def test_mtls_refused_is_auth(
    mosquitto_factory: MosquittoFactory, mqtt_pki: MqttPki, make_sink: Any, case: str
) -> None:
    broker = mosquitto_factory(
        tls=mqtt_pki, require_certificate=True, use_identity_as_username=True
    )
    options: dict[str, Any] = {}
    if case == "untrusted_cert":
        cert = mqtt_pki.client_cert(AGENT, trusted=False)
        options = {"cert_file": str(cert.cert), "key_file": str(cert.key)}
    sink = await make_sink(broker, **options)
    r = await sink.send(make_batch("line1", 1, 2))
    assert r.outcome is Outcome.AUTH, r
    assert "certificate" in r.reason
    await wait_state(sink, "auth_failed")


async def test_server_certificate_checks(
    mosquitto_factory: MosquittoFactory, mqtt_pki: MqttPki, make_sink: Any
) -> None:
    broker = mosquitto_factory(tls=mqtt_pki)
    # a CA that did not sign the broker's certificate
    untrusted = await make_sink(broker, name="untrusted", ca_file=str(mqtt_pki.other_ca_file))
    r = await untrusted.send(make_batch("line1", 1, 1))
    assert r.outcome is Outcome.AUTH and "certificate" in r.reason, r
    # by IP, while the certificate names localhost: refused unless the name check is off
    by_ip = f"mqtts://127.0.0.1:{broker.port}"
    strict = await make_sink(broker, name="strict", url=by_ip)
    r = await strict.send(make_batch("line1", 1, 1))
    assert r.outcome is Outcome.AUTH and "127.0.0.1" in r.reason, r
    lax = await make_sink(broker, name="lax", url=by_ip, verify_hostname=False)
    assert (await lax.send(make_batch("line1", 1, 1))).outcome is Outcome.ACCEPTED


# --------------------------------------------------------------------------- size


async def test_payload_over_broker_maximum_packet_size_is_too_large(
    mosquitto_factory: MosquittoFactory, mqtt_subscriber: Any, make_sink: Any
) -> None:
    limit = 8192
    broker = mosquitto_factory(max_packet_size=limit)
    sub = mqtt_subscriber(broker, topic_of("line1"))
    sink = await make_sink(broker)
    await wait_state(sink, "connected")
    assert sink.state().detail["max_packet_size"] == limit

    def packet(b: Batch) -> int:
        props, props_len = sink._batch_properties(b)
        assert props_len == len(props.pack())
        return publish_packet_size(topic_of("line1").encode(), props_len, len(b.payload))

    # pad one event so the PUBLISH is exactly at the limit (a pad character is one byte;
    # ids and batch ids have fixed lengths), then one byte over
    pad = limit - packet(make_batch("line1", 1, 1))
    exact = make_batch("line1", 1, 1, pad=pad)
    assert packet(exact) == limit
    over = make_batch("line1", 2, 1, pad=pad + 1)
    assert packet(over) == limit + 1

    r = await sink.send(over)
    assert r.outcome is Outcome.TOO_LARGE and str(limit) in r.reason, r
    assert (await sink.send(exact)).outcome is Outcome.ACCEPTED
    (m,) = await received(sub, lambda m: len(m) >= 1)
    assert m.payload == exact.payload
    assert sink.state().state == "connected"


async def test_configured_max_packet_size_applies_for_311(
    mqtt311_broker: MqttBroker, make_sink: Any
) -> None:
    sink = await make_sink(mqtt311_broker, protocol="3.1.1", max_packet_size="4KiB")
    r = await sink.send(make_batch("line1", 1, 30))
    assert r.outcome is Outcome.TOO_LARGE and "max_packet_size" in r.reason
    assert (await sink.send(make_batch("line1", 1, 2))).outcome is Outcome.ACCEPTED


# --------------------------------------------------------------------------- lifecycle


async def test_stop_answers_waiting_sends_and_is_idempotent(
    mosquitto: Mosquitto, make_sink: Any
) -> None:
    sink = await make_sink(mosquitto)
    await wait_state(sink, "connected")
    assert mosquitto.proc is not None
    import signal

    mosquitto.proc.send_signal(signal.SIGSTOP)  # no PUBACK will come
    pending = asyncio.create_task(sink.send(make_batch("line1", 1, 2)))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await sink.stop()
    assert time.monotonic() - started < 6
    r = await pending
    assert r.outcome is Outcome.RETRY
    assert sink.state().state == "stopped"
    r = await sink.send(make_batch("line1", 1, 2))
    assert r.outcome is Outcome.RETRY
    await sink.stop()
    mosquitto.proc.send_signal(signal.SIGCONT)


async def test_stop_while_connecting_leaves_nothing_open(
    mosquitto: Mosquitto, make_sink: Any
) -> None:
    import os
    import signal

    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)  # TCP is accepted by the kernel, no CONNACK
    try:
        fds = len(os.listdir("/proc/self/fd"))
        loop = asyncio.get_running_loop()
        watched = len(loop._selector.get_map())  # type: ignore[attr-defined]
        sink = await make_sink(mosquitto, connect_timeout=30)
        pending = asyncio.create_task(sink.send(make_batch("line1", 1, 1)))
        await asyncio.sleep(0.3)
        assert sink.state().state == "starting" and not pending.done()
        await asyncio.wait_for(sink.stop(), 3)
        assert (await pending).outcome is Outcome.RETRY
        assert len(loop._selector.get_map()) == watched  # type: ignore[attr-defined]
        assert len(os.listdir("/proc/self/fd")) <= fds + 1  # the idle connect thread's nothing
    finally:
        mosquitto.proc.send_signal(signal.SIGCONT)

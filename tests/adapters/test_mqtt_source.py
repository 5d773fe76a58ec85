"""MQTT source against a real mosquitto broker and the real Buffer.

The broker comes from tests/fixtures/mosquitto.py (a mosquitto process per test on a free
port); messages are published by a real paho client at QoS 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from adapters.sources.mqtt import Config, build
from agent.buffer import Buffer
from agent.config import ConfigError, parse_config
from tests.fixtures.mosquitto import Mosquitto
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


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Any:
    p = Publisher(mosquitto)
    yield p
    p.close()


@pytest.fixture
async def buf(tmp_path: Path) -> AsyncIterator[Buffer]:
    b = await Buffer.open(tmp_path / "buffer.db", plant="plant-test", agent_id="test-agent")
    try:
        yield b
    finally:
        await b.close()


def pubacks(broker: Mosquitto, client_id: str) -> int:
    """PUBACKs the broker received from our client, from its log (log_type all)."""
    return len(re.findall(rf"Received PUBACK from {re.escape(client_id)}\b", broker.log()))


# ----------------------------------------------------------------------------- delivery


async def test_qos1_messages_arrive_in_order_and_are_acknowledged(
    mosquitto: Mosquitto, publisher: Publisher, buf: Buffer
) -> None:
    source = build(STREAM, make_config(mosquitto), CTX)
    async with running(source, buf):
        for n in range(1, 11):
            if n % 3 == 0:  # an array payload: two events in one message
                await asyncio.to_thread(
                    publisher.publish, "plant/mes/wo", [canonical(n), canonical(n + 100)]
                )
            else:
                await asyncio.to_thread(
                    publisher.publish, "plant/line1/cell4/counted", mes_counted(n)
                )
        events = await wait_stored(buf, 13)
        await wait_until(lambda: pubacks(mosquitto, source.client_id) == 10)

    got = [
        e["data"]["good"]["value"] if e["type"] == "mfg.production.counted" else e["subject"]
        for e in events
    ]
    assert got == [1, 2, "WO-3", "WO-103", 4, 5, "WO-6", "WO-106", 7, 8, "WO-9", "WO-109", 10]
    first = events[0]
    assert first["data"] == {"work_order": "WO-7", "item": "P-1", "good": {"value": 1, "uom": "EA"}}
    assert first["source"] == f"edge-agent://plant-test/{STREAM}"
    st = source.state()
    assert st.detail["accepted"] == 13 and st.detail["messages"] == 10
    assert st.detail["rejected"] == {}
    assert st.state == "stopped"


async def test_invalid_payloads_are_rejected_acknowledged_and_not_redelivered(
    mosquitto: Mosquitto, publisher: Publisher, buf: Buffer
) -> None:
    cfg = make_config(mosquitto, max_payload="2KiB")
    source = build(STREAM, cfg, CTX)
    async with running(source, buf):
        bad = [
            ("plant/mes/x", b"{not json"),
            ("plant/mes/x", orjson.dumps([canonical(1), {"type": "mfg.workorder.status_changed"}])),
            ("plant/line1/c/counted", orjson.dumps(mes_counted(2, unit=None))),
            ("plant/mes/x", orjson.dumps("a string")),
            ("plant/mes/x", b"[" + b" " * 3000 + b"]"),
        ]
        for topic, payload in bad:
            await asyncio.to_thread(publisher.publish, topic, payload)
        await asyncio.to_thread(publisher.publish, "plant/mes/x", canonical(9))
        await wait_stored(buf, 1)
        await wait_until(lambda: pubacks(mosquitto, source.client_id) == 6)
    st = source.state()
    assert st.detail["rejected"] == {"not_json": 1, "invalid": 2, "not_object": 1, "too_large": 1}
    events = await stored(buf)
    assert [e["subject"] for e in events] == ["WO-9"]  # nothing of the bad array was stored

    # A restart with the same session: nothing comes back (all six were acknowledged).
    again = build(STREAM, cfg, CTX)
    async with running(again, buf):
        await asyncio.to_thread(publisher.publish, "plant/mes/x", canonical(10))
        await wait_stored(buf, 2)
    assert again.state().detail["messages"] == 1
    assert again.state().detail["rejected"] == {}


async def test_rejection_reason_names_the_field(
    mosquitto: Mosquitto, publisher: Publisher, buf: Buffer
) -> None:
    source = build(STREAM, make_config(mosquitto), CTX)
    async with running(source, buf):
        await asyncio.to_thread(
            publisher.publish, "plant/line1/c/counted", mes_counted(2, unit=None)
        )
        await wait_until(lambda: source.state().detail["rejected"])
    assert source.state().detail["rejected"] == {"invalid": 1}
    error = source.state().last_error or ""
    assert "plant/line1/c/counted" in error and "data.good.uom" in error


# ----------------------------------------------------------------------------- session


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_messages_published_while_stopped_arrive_after_restart(
    mosquitto: Mosquitto, publisher: Publisher, buf: Buffer, protocol: str
) -> None:
    cfg = make_config(mosquitto, protocol=protocol)
    async with running(build(STREAM, cfg, CTX), buf):
        pass  # subscribed once: the broker now keeps the session
    for n in range(1, 6):
        await asyncio.to_thread(publisher.publish, "plant/line1/a/counted", mes_counted(n))
    again = build(STREAM, cfg, CTX)
    async with running(again, buf):
        events = await wait_stored(buf, 5)
    assert [e["data"]["good"]["value"] for e in events] == [1, 2, 3, 4, 5]


async def test_buffer_full_holds_back_without_puback_then_commits(
    mosquitto: Mosquitto, publisher: Publisher, tmp_path: Path
) -> None:
    small = await Buffer.open(
        tmp_path / "small.db", plant="p", agent_id="a", max_bytes=1000, on_full="block"
    )
    try:
        source = build(STREAM, make_config(mosquitto), CTX)
        async with running(source, small):
            for n in range(1, 4):  # ~450 bytes each: the third does not fit
                await asyncio.to_thread(publisher.publish, "plant/line1/a/counted", mes_counted(n))
            await wait_until(lambda: source.state().detail["held_back"])
            await asyncio.sleep(0.3)  # several retries while full
            assert source.state().detail["held_back"] is True
            assert "buffer full" in (source.state().last_error or "")
            # a PUBACK went out for each committed message, none for the held one
            committed_so_far = len(await stored(small))
            assert committed_so_far == 2
            await wait_until(lambda: pubacks(mosquitto, source.client_id) >= committed_so_far)
            assert pubacks(mosquitto, source.client_id) == committed_so_far
            await asyncio.to_thread(publisher.publish, "plant/line1/a/counted", mes_counted(4))

            # the sink drains the backlog: the held messages go in, in order, then PUBACK
            batch = await small.take_batch(STREAM, 0, 1000, 1 << 30)
            assert batch is not None
            committed = [orjson.loads(b)["data"]["good"]["value"] for b in batch.bodies]
            await small.ack(batch)
            await wait_until(lambda: not source.state().detail["held_back"])
            await wait_until(lambda: pubacks(mosquitto, source.client_id) == 4)
        await wait_until(lambda: source.state().detail["accepted"] == 4)
        rows = await small.read_range(STREAM, small.stream_state(STREAM)[1], 1 << 62, 1000)
        committed += [orjson.loads(b)["data"]["good"]["value"] for _, _, b in rows]
        assert committed == [1, 2, 3, 4]
    finally:
        await small.close()


async def test_unacknowledged_message_is_redelivered_after_restart(
    mosquitto: Mosquitto, publisher: Publisher, tmp_path: Path
) -> None:
    """Stopped while holding a message back (buffer full): the broker keeps it, the next
    run gets it again and commits it."""
    path = tmp_path / "buf.db"
    full = await Buffer.open(path, plant="p", agent_id="a", max_bytes=10, on_full="block")
    cfg = make_config(mosquitto)
    try:
        source = build(STREAM, cfg, CTX)
        async with running(source, full):
            await asyncio.to_thread(publisher.publish, "plant/line1/a/counted", mes_counted(1))
            await wait_until(lambda: source.state().detail["held_back"])
    finally:
        await full.close()
    roomy = await Buffer.open(path, plant="p", agent_id="a")
    try:
        again = build(STREAM, cfg, CTX)
        async with running(again, roomy):
            [ev] = await wait_stored(roomy, 1)
        assert ev["data"]["good"]["value"] == 1
    finally:
        await roomy.close()


async def test_broker_restart_reconnects_and_resubscribes(
    mosquitto: Mosquitto, buf: Buffer
) -> None:
    source = build(STREAM, make_config(mosquitto), CTX)
    async with running(source, buf):
        await asyncio.to_thread(mosquitto.restart)  # SIGKILL; no persistence: session gone
        await wait_until(lambda: source.state().state == "disconnected")
        assert "disconnected from" in (source.state().last_error or "")
        await wait_until(
            lambda: source.state().state == "connected" and source.state().detail["subscribed"],
            within=15,
        )
        pub = await asyncio.to_thread(Publisher, mosquitto)
        try:
            await asyncio.to_thread(pub.publish, "plant/mes/a", canonical(1))
        finally:
            await asyncio.to_thread(pub.close)
        [ev] = await wait_stored(buf, 1)
    assert ev["subject"] == "WO-1"


async def test_broker_down_at_start_then_up(
    mosquitto_factory: Callable[..., Mosquitto], buf: Buffer
) -> None:
    broker = mosquitto_factory(start=False)
    source = build(STREAM, make_config(broker), CTX)
    task = asyncio.create_task(source.run(buf))
    try:
        await wait_until(lambda: source.state().state == "disconnected", task=task)
        assert "cannot connect to" in (source.state().last_error or "")
        await asyncio.to_thread(broker.start)
        await wait_until(lambda: source.state().detail["subscribed"], within=15, task=task)
        assert source.state().state == "connected"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_held_message_survives_a_broker_that_lost_the_session(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Held back (buffer full) when the broker restarts without persistence: the broker
    will not send it again, so the source commits what it holds once there is room."""
    small = await Buffer.open(
        tmp_path / "small.db", plant="p", agent_id="a", max_bytes=1000, on_full="block"
    )
    try:
        source = build(STREAM, make_config(mosquitto), CTX)
        async with running(source, small):
            pub = await asyncio.to_thread(Publisher, mosquitto)
            for n in range(1, 4):
                await asyncio.to_thread(pub.publish, "plant/line1/a/counted", mes_counted(n))
            await asyncio.to_thread(pub.close)
            await wait_until(lambda: source.state().detail["held_back"])
            await asyncio.to_thread(mosquitto.restart)
            await wait_until(lambda: source.state().detail["subscribed"], within=15)
            batch = await small.take_batch(STREAM, 0, 1000, 1 << 30)
            assert batch is not None
            values = [orjson.loads(b)["data"]["good"]["value"] for b in batch.bodies]
            await small.ack(batch)
            await wait_until(lambda: not source.state().detail["held_back"])
        rows = await small.read_range(STREAM, small.stream_state(STREAM)[1], 1 << 62, 1000)
        values += [orjson.loads(b)["data"]["good"]["value"] for _, _, b in rows]
        assert values == [1, 2, 3]
    finally:
        await small.close()


# ----------------------------------------------------------------------------- security


async def test_tls_with_password_file(
    mosquitto_factory: Callable[..., Mosquitto], mqtt_pki: Any, tmp_path: Path, buf: Buffer
) -> None:
    broker = mosquitto_factory(tls=mqtt_pki, passwords={"agent": "pw-s3cret"})
    secret = tmp_path / "mqtt.password"
    secret.write_text("pw-s3cret\n")
    cfg = make_config(
        broker, ca_file=str(mqtt_pki.ca_file), username="agent", password_file=str(secret)
    )
    source = build(STREAM, cfg, CTX)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-pub")
    pub.username_pw_set("agent", "pw-s3cret")
    pub.tls_set(ca_certs=str(mqtt_pki.ca_file))
    async with running(source, buf):
        await asyncio.to_thread(pub.connect, broker.host, broker.port)
        pub.loop_start()
        try:
            info = pub.publish("plant/mes/a", orjson.dumps(canonical(1)), qos=1)
            await asyncio.to_thread(info.wait_for_publish, 10)
            await wait_stored(buf, 1)
        finally:
            pub.disconnect()
            await asyncio.to_thread(pub.loop_stop)
    assert "pw-s3cret" not in repr(source.state()) and "pw-s3cret" not in repr(cfg)


async def test_wrong_password_shows_auth_failed(
    mosquitto_factory: Callable[..., Mosquitto], buf: Buffer
) -> None:
    broker = mosquitto_factory(passwords={"agent": "right"}, allow_anonymous=False)
    source = build(STREAM, make_config(broker, username="agent", password="wrong"), CTX)
    task = asyncio.create_task(source.run(buf))
    try:
        await wait_until(lambda: source.state().state == "auth_failed", task=task)
        assert "refused" in (source.state().last_error or "")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ----------------------------------------------------------------------------- config


def test_sample_toml_validates() -> None:
    sample = Path(__file__).parents[2] / "adapters/sources/mqtt/sample.toml"
    raw = tomllib.loads(sample.read_text())
    raw["sinks"] = {"https": {"type": "https", "url": "https://gateway.example/v1/events"}}
    cfg = parse_config(raw)
    assert isinstance(cfg.sources["uns"], Config)


def test_default_client_id_is_fixed_per_agent_and_source() -> None:
    cfg = Config.model_validate({"type": "mqtt", "subscriptions": [{"topic": "a/#"}]})
    assert build("uns", cfg, CTX).client_id == "edge-agent-test-agent-uns"
    assert build("uns", cfg, CTX).client_id == build("uns", cfg, CTX).client_id


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ({"url": "mqtt://broker.plant:1883"}, "sources.m", "allow_insecure = true"),
        ({"url": "http://127.0.0.1"}, "sources.m.url", "mqtt://HOST"),
        ({"password": "x"}, "sources.m", "username: required"),
        ({"subscriptions": []}, "sources.m.subscriptions", "at least 1"),
        ({"subscriptions": [{"topic": "a/#/b"}]}, "sources.m.subscriptions[0].topic", "'#'"),
        ({"subscriptions": [{"topic": "a/b+"}]}, "sources.m.subscriptions[0].topic", "'+'"),
        ({"ca_file": "/x.pem"}, "sources.m", "mqtts://"),
        ({"protocol": "4"}, "sources.m.protocol", "'5'"),
    ],
)
def test_config_errors_name_key_and_fix(body: dict[str, Any], key: str, words: str) -> None:
    raw = {
        "sinks": {"https": {"type": "https", "url": "https://gw.example/v1"}},
        "sources": {"m": {"type": "mqtt", "subscriptions": [{"topic": "a/#"}], **body}},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key), str(err.value)
    assert words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_plain_mqtt_to_another_host_allowed_when_said_so() -> None:
    cfg = Config.model_validate(
        {
            "type": "mqtt",
            "url": "mqtt://broker.plant:1883",
            "allow_insecure": True,
            "subscriptions": [{"topic": "a/#"}],
        }
    )
    assert (cfg.host, cfg.port, cfg.tls) == ("broker.plant", 1883, False)
    assert (
        Config.model_validate(
            {"type": "mqtt", "url": "mqtts://broker.plant", "subscriptions": [{"topic": "a/#"}]}
        ).port
        == 8883
    )

"""The MQTT sink's config: sample validates, unsafe or inconsistent settings are one-line
errors naming the key and the fix; packet size arithmetic matches paho's encoder."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import adapters.sinks.mqtt as pkg
from adapters.sinks.mqtt import Config, MqttSink, build
from adapters.sinks.mqtt.sink import batch_properties_len, publish_packet_size
from agent.config import parse_config
from agent.errors import ConfigError, SinkError
from agent.registry import AdapterContext

SAMPLE = Path(pkg.__file__).parent / "sample.toml"


def load(sink: dict[str, Any]) -> Any:
    return parse_config({"sinks": {"central": {"type": "mqtt", **sink}}}).sinks["central"]


def error(sink: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load(sink)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_sample_validates_through_the_loader() -> None:
    raw = tomllib.loads(SAMPLE.read_text())
    cfg = parse_config(raw)
    (name,) = cfg.sinks
    sink = cfg.sinks[name]
    assert isinstance(sink, Config)
    assert sink.tls and sink.port == 8883 and sink.protocol == "5"


def test_defaults() -> None:
    c = load({"url": "mqtt://127.0.0.1"})
    assert c.port == 1883 and not c.tls and c.topic_prefix == "edge"
    assert c.max_in_flight == 20 and c.gzip is False and c.presence is True
    assert c.verify_hostname is True
    assert load({"url": "mqtts://broker"}).port == 8883


def test_plain_tcp_to_another_host_needs_allow_insecure() -> None:
    msg = error({"url": "mqtt://broker.example.com:1883"})
    assert msg.startswith("sinks.central") and "allow_insecure = true" in msg
    assert load({"url": "mqtt://broker.example.com", "allow_insecure": True}).host == (
        "broker.example.com"
    )
    assert load({"url": "mqtt://localhost:1884"}).port == 1884


@pytest.mark.parametrize(
    ("sink", "words"),
    [
        ({"url": "http://broker"}, "mqtts://HOST"),
        ({"url": "mqtts://broker/path"}, "only scheme, host and port"),
        ({"url": "mqtts://b", "password": "x"}, "username: required"),
        ({"url": "mqtts://b", "username": "u", "password": "x", "password_file": "/p"}, "not both"),
        ({"url": "mqtts://b", "cert_file": "/c.pem"}, "cert_file and key_file go together"),
        ({"url": "mqtt://127.0.0.1", "ca_file": "/ca.pem"}, "need an mqtts:// url"),
        ({"url": "mqtts://b", "topic_prefix": "edge/#"}, "without wildcards"),
        ({"url": "mqtts://b", "protocol": "3"}, "protocol"),
        ({"url": "mqtts://b", "max_in_flight": 0}, "max_in_flight"),
        ({"url": "mqtts://b", "reconnect_min": "10s", "reconnect_max": "1s"}, "reconnect_max"),
        ({"url": "mqtts://b", "gzipped": True}, "unknown key"),
        ({"url": "mqtts://b", "client_id": "a b"}, "client_id"),
    ],
)
def test_bad_settings_are_one_line_errors(sink: dict[str, Any], words: str) -> None:
    assert words in error(sink)


def test_password_file_is_read_at_start_and_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-value\n")
    c = load({"url": "mqtts://b", "username": "u", "password_file": str(secret)})
    assert "s3cret" not in repr(c)


async def test_unreadable_files_fail_start_with_the_key(tmp_path: Path) -> None:
    ctx = AdapterContext("agent-1", "plant-a", tmp_path, "1")
    missing = tmp_path / "nope.pem"
    sink = build("central", load({"url": "mqtts://b", "ca_file": str(missing)}), ctx)
    with pytest.raises(SinkError, match=r"sinks\.central\.ca_file: cannot load .*nope\.pem"):
        await sink.start()
    sink = build(
        "central",
        load({"url": "mqtts://b", "username": "u", "password_file": str(missing)}),
        ctx,
    )
    with pytest.raises(SinkError, match=r"sinks\.central\.password_file"):
        await sink.start()


def test_agent_id_must_fit_in_a_topic(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="agent.id"):
        MqttSink("c", load({"url": "mqtt://127.0.0.1"}), AdapterContext("a/b", "p", tmp_path, "1"))


class _NoSocket:
    def close(self) -> None:
        pass


@pytest.mark.parametrize("payload_len", [0, 10, 100, 16_000, 20_000, 3_000_000])
@pytest.mark.parametrize("v5", [True, False])
def test_packet_size_matches_paho_encoding(payload_len: int, v5: bool) -> None:
    """Compare with the bytes paho actually queues for the socket."""
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    packets: list[bytes] = []
    client._packet_queue = lambda cmd, packet, mid, qos, info=None: packets.append(bytes(packet))  # type: ignore[method-assign]
    props = None
    if v5:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/cloudevents-batch+json"
        props.UserProperty = [("batch-id", "01JD3W5Q8R6B1N9X2K4T7V0M3C"), ("stream", "line1")]
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED  # type: ignore[attr-defined]
    client._sock = _NoSocket()  # type: ignore[assignment]
    client.publish("edge/plant-a/line1", b"x" * payload_len, qos=1, properties=props)
    (packet,) = packets
    expected = publish_packet_size(
        b"edge/plant-a/line1", len(props.pack()) if props else 0, payload_len
    )
    assert len(packet) == expected


@pytest.mark.parametrize("gzip", [False, True])
@pytest.mark.parametrize("stream", ["l", "line-ü-" + "x" * 200])
def test_property_length_matches_paho_packing(tmp_path: Path, gzip: bool, stream: str) -> None:
    from agent.interfaces import Batch

    sink = MqttSink(
        "c",
        load({"url": "mqtt://127.0.0.1", "gzip": gzip}),
        AdapterContext("a", "p", tmp_path, "1"),
    )
    b = Batch(stream, "01JD3W5Q8R6B1N9X2K4T7V0M3C", "E" * 26, 1, 10**15, ["x"], [b"{}"])
    props, length = sink._batch_properties(b)
    assert length == len(props.pack())
    assert batch_properties_len("a/b", [("k", "v" * 200)]) == len(_pack("a/b", [("k", "v" * 200)]))


def _pack(content_type: str, user: list[tuple[str, str]]) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    props.PayloadFormatIndicator = 1
    props.UserProperty = user
    return bytes(props.pack())


def test_missing_mosquitto_fails_the_test_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import shutil

    from tests.fixtures import mosquitto as fixture

    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(os, "access", lambda _path, _mode: False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y mosquitto"):
        fixture.mosquitto_binary()

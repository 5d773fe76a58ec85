"""agent.tls: the OS trust store when no ca_file is set, for every TLS client we build.

The locations are module constants, pointed here at files of the test; the built binary
with the real /etc paths is tested in tests/packaging/test_trust_store.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from adapters.sinks.https.config import HttpsSinkConfig
from adapters.sinks.https.sink import HttpsSink
from adapters.sinks.mqtt import Config as MqttSinkConfig
from adapters.sinks.mqtt import MqttSink
from adapters.sinks.nats import Config as NatsSinkConfig
from adapters.sinks.nats import NatsSink
from adapters.sources.mqtt.config import Config as MqttSourceConfig
from adapters.sources.mqtt.source import MqttSource
from adapters.sources.sparkplug import Config as SparkplugConfig
from agent import tls
from agent.interfaces import Outcome
from agent.registry import AdapterContext
from tests.fixtures.mosquitto import MosquittoFactory, MqttPki
from tests.fixtures.mqtt_sink import make_batch, sink_config

CTX = AdapterContext(agent_id="agent-1", plant="plant-a", state_dir=Path("."), version="9.9.9")


@pytest.fixture
def os_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Three candidate bundles (none exists yet) as the OS locations; no SSL_CERT_* override."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    paths = [tmp_path / f"os-{i}" / "bundle.pem" for i in range(3)]
    monkeypatch.setattr(tls, "SYSTEM_CA_FILES", tuple(str(p) for p in paths))
    monkeypatch.setattr(tls, "SYSTEM_CA_DIRS", (str(tmp_path / "no-such-dir"),))
    return paths


def _plant(path: Path, ca: trustme.CA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(path))


def test_the_first_existing_bundle_wins(os_store: list[Path]) -> None:
    first, second = trustme.CA(), trustme.CA()
    _plant(os_store[1], first)
    _plant(os_store[2], second)
    ctx = tls.client_context()
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert tls.load_system_trust(tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_CLIENT)) == str(
        os_store[1]
    )


def test_ssl_cert_file_overrides_and_a_missing_one_is_named(
    os_store: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plant(os_store[0], trustme.CA())
    mine = tmp_path / "mine.pem"
    _plant(mine, trustme.CA())
    monkeypatch.setenv("SSL_CERT_FILE", str(mine))
    ctx = tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_CLIENT)
    assert tls.load_system_trust(ctx) == str(mine)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "gone.pem"))
    with pytest.raises(FileNotFoundError, match=r"SSL_CERT_FILE=.*gone\.pem: not found"):
        tls.client_context()


def test_every_tls_builder_uses_the_os_store(os_store: list[Path]) -> None:
    """Every TLS adapter (one builder) and the CLI tools: without ca_file, exactly the
    OS's CAs."""
    _plant(os_store[2], trustme.CA())
    https = HttpsSink("central", HttpsSinkConfig(url="https://gw.example/v1/batches"))
    mqtt_sink = MqttSink(
        "central", MqttSinkConfig.model_validate({"url": "mqtts://b.example"}), CTX
    )
    source = MqttSource(
        "m",
        MqttSourceConfig.model_validate(
            {"url": "mqtts://broker.example", "subscriptions": [{"topic": "a/#"}]}
        ),
        CTX,
    )
    nats_sink = NatsSink("central", NatsSinkConfig(url="tls://nats.example:4222"), CTX)
    spb = SparkplugConfig.model_validate(
        {"url": "mqtts://broker.example", "groups": ["G"], "host_id": "h"}
    )
    contexts = [https._ssl_context(), mqtt_sink._tls_context(), source._ssl_context()]  # noqa: SLF001
    contexts += [nats_sink._tls_context(), spb.tls_context(), tls.client_context()]  # noqa: SLF001
    for ctx in contexts:
        assert not isinstance(ctx, bool)
        assert ctx.cert_store_stats()["x509_ca"] == 1


async def test_mqtt_sink_verifies_a_real_broker_with_the_os_store(
    os_store: list[Path], mosquitto_factory: MosquittoFactory, mqtt_pki: MqttPki
) -> None:
    broker = mosquitto_factory(tls=mqtt_pki)
    os_store[0].parent.mkdir(parents=True)
    os_store[0].write_bytes(Path(mqtt_pki.ca_file).read_bytes())
    cfg = sink_config(broker, ca_file=None)
    assert cfg.ca_file is None
    sink = MqttSink("central", cfg, CTX)
    await sink.start()
    try:
        r = await sink.send(make_batch("line1", 1, 2))
        assert r.outcome is Outcome.ACCEPTED, r
    finally:
        await sink.stop()

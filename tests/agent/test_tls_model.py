"""One TLS model (agent.tls.TlsOptions): the same keys in every adapter that is a TLS
client, one builder, the old names still read with one warning naming the new key, and
an old and a new name of one option together refused with both key paths.

Against real peers where a connection is the point: the reference gateway over mutual
TLS (old https names, end to end through `run`), mosquitto with TLS (the mqtt source and
the sparkplug source and `sparkplug watch` with the new names, and a broker no
configured CA vouches for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.sinks.https import Config as HttpsConfig
from adapters.sinks.mqtt import Config as MqttSinkConfig
from adapters.sinks.nats.config import Config as NatsConfig
from adapters.sources import mqtt as mqtt_source
from adapters.sources import sparkplug
from agent.buffer import Buffer
from agent.config import load_config
from agent.registry import AdapterContext
from agent.tls import TlsOptions
from tests.fixtures.common import agent_config, https_sink, run_cli, to_toml
from tests.fixtures.mosquitto import MosquittoFactory, MqttPki

CTX = AdapterContext(agent_id="agent-1", plant="plant-a", state_dir=Path("."), version="9.9.9")
TLS_KEYS = {"ca_file", "cert_file", "key_file", "verify_hostname", "verify_certificate"}
OLD_KEYS = {"client_cert", "client_key", "insecure_skip_verify", "tls_insecure_skip_verify"}


def _models() -> dict[str, tuple[type[Any], dict[str, Any]]]:
    """Each TLS adapter's config model and the least body that validates (TLS url)."""
    sub = {"subscriptions": [{"topic": "a/#"}]}
    return {
        "sink https": (HttpsConfig, {"url": "https://gw.example/v1/batches"}),
        "sink mqtt": (MqttSinkConfig, {"url": "mqtts://broker.example"}),
        "sink nats": (NatsConfig, {"url": "tls://nats.example:4222"}),
        "source mqtt": (mqtt_source.Config, {"url": "mqtts://broker.example", **sub}),
        "source sparkplug": (
            sparkplug.Config,
            {"url": "mqtts://broker.example", "groups": ["G"], "host_id": "h"},
        ),
    }


@pytest.mark.parametrize("adapter", list(_models()))
def test_every_tls_adapter_takes_the_same_keys_and_builds_with_one_builder(
    adapter: str, mqtt_pki: MqttPki
) -> None:
    model, body = _models()[adapter]
    assert issubclass(model, TlsOptions)
    assert TLS_KEYS <= set(model.model_fields) and not OLD_KEYS & set(model.model_fields)
    client = mqtt_pki.client_cert("agent")
    allow = {"allow_insecure": True} if adapter == "sink https" else {}
    cfg = model.model_validate(
        {
            **body,
            **allow,
            "ca_file": str(mqtt_pki.ca_file),
            "cert_file": str(client.cert),
            "key_file": str(client.key),
            "verify_hostname": False,
        }
    )
    ctx = cfg.tls_context()
    assert ctx.cert_store_stats()["x509_ca"] == 1  # ca_file, not the OS store
    assert ctx.check_hostname is False and ctx.verify_mode.name == "CERT_REQUIRED"
    off = model.model_validate({**body, **allow, "verify_certificate": False}).tls_context()
    assert off.check_hostname is False and off.verify_mode.name == "CERT_NONE"


# --------------------------------------------------------------------------- old names

#: (kind, table body with the old key, old key, new key, the new key's value)
OLD_NAME_CASES = {
    "https client_cert": (
        "sinks",
        {"type": "https", "url": "https://127.0.0.1:9/v1/batches", "client_cert": "CERT",
         "key_file": "KEY"},
        "client_cert", "cert_file", "CERT",
    ),
    "https client_key": (
        "sinks",
        {"type": "https", "url": "https://127.0.0.1:9/v1/batches", "cert_file": "CERT",
         "client_key": "KEY"},
        "client_key", "key_file", "KEY",
    ),
    "https insecure_skip_verify": (
        "sinks",
        {"type": "https", "url": "https://127.0.0.1:9/v1/batches", "allow_insecure": True,
         "insecure_skip_verify": True},
        "insecure_skip_verify", "verify_hostname", False,
    ),
    "mqtt source tls_insecure_skip_verify": (
        "sources",
        {"type": "mqtt", "url": "mqtts://127.0.0.1:8883", "subscriptions": [{"topic": "a/#"}],
         "tls_insecure_skip_verify": True},
        "tls_insecure_skip_verify", "verify_certificate", False,
    ),
}  # fmt: skip


def _write(tmp_path: Path, kind: str, body: dict[str, Any], pki: MqttPki) -> Path:
    client = pki.client_cert("agent")
    files = {"CERT": str(client.cert), "KEY": str(client.key)}
    body = {k: files.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    sinks = {"central": body} if kind == "sinks" else {"central": {"type": "https",
             "url": "https://127.0.0.1:9/v1/batches"}}  # fmt: skip
    sources = {"plant": body} if kind == "sources" else None
    cfg = tmp_path / "agent.toml"
    cfg.write_text(to_toml(agent_config(tmp_path, sinks=sinks, sources=sources)))
    return cfg


@pytest.mark.parametrize("case", list(OLD_NAME_CASES))
def test_each_old_name_still_works_and_warns_once_naming_the_new_key(
    case: str, tmp_path: Path, mqtt_pki: MqttPki, caplog: pytest.LogCaptureFixture
) -> None:
    kind, body, old, new, value = OLD_NAME_CASES[case]
    path = f"{kind}.{'central' if kind == 'sinks' else 'plant'}"
    cfg_file = _write(tmp_path, kind, body, mqtt_pki)

    with caplog.at_level(logging.WARNING, logger="edge_agent.config"):
        cfg = load_config(cfg_file)
    table = (cfg.sinks if kind == "sinks" else cfg.sources)[path.split(".")[1]]
    got = getattr(table, new)
    if isinstance(value, bool):
        assert got is value
    else:  # the file the old key named, now under the new key
        client = mqtt_pki.client_cert("agent")
        assert got == (client.cert if value == "CERT" else client.key)
    records = [r for r in caplog.records if r.name == "edge_agent.config"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert f"{path}.{old} is deprecated" in message and f"{path}.{new}" in message

    res = run_cli("config", "check", str(cfg_file))
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and res.stderr.count("deprecated") == 1, res.stderr
    assert f"{path}.{old}" in warnings[0] and f"{path}.{new}" in warnings[0], warnings
    if isinstance(value, bool):
        assert f"{new} = {str(value).lower()}" in warnings[0]
    assert res.stdout.startswith(f"{cfg_file}: ok"), res.stdout
    as_json = run_cli("config", "check", "--json", str(cfg_file))
    assert as_json.returncode == 0
    assert as_json.stdout.count("deprecated") == 1 and '"ok": true' in as_json.stdout


@pytest.mark.parametrize("case", list(OLD_NAME_CASES))
def test_an_old_and_a_new_name_together_is_an_error_naming_both(
    case: str, tmp_path: Path, mqtt_pki: MqttPki
) -> None:
    kind, body, old, new, value = OLD_NAME_CASES[case]
    path = f"{kind}.{'central' if kind == 'sinks' else 'plant'}"
    cfg_file = _write(tmp_path, kind, {**body, new: value}, mqtt_pki)
    res = run_cli("config", "check", str(cfg_file))
    assert res.returncode == 2, res.stdout + res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"config error: {path}.{new}: "), line
    assert f"{path}.{old}" in line and f"keep only {new}" in line, line


# --------------------------------------------------------------------------- real peers


def test_https_sink_with_the_old_names_still_delivers_over_mtls(
    gateway: Any, agent_process: Any, tmp_path: Path
) -> None:
    """`run` accepts client_cert / client_key, says once which keys replace them, and the
    gateway that requires a client certificate receives every event."""
    gw = gateway(mtls=True)
    sink = https_sink(gw)
    sink["client_cert"], sink["client_key"] = sink.pop("cert_file"), sink.pop("key_file")
    cfg = agent_config(
        tmp_path,
        sinks={"central": sink},
        sources={"line1": {"type": "simulator", "rate": 300, "limit": 100, "seed": 5}},
    )
    agent = agent_process(cfg, workdir=tmp_path).start()
    gw.wait_received(100, stream="line1", timeout=30)
    assert agent.stop() == 0
    log = agent.log()
    for old, new in (("client_cert", "cert_file"), ("client_key", "key_file")):
        lines = [line for line in log.splitlines() if f"sinks.central.{old} is deprecated" in line]
        assert len(lines) == 1 and f"sinks.central.{new}" in lines[0], log[-3000:]


@pytest.fixture
async def buf(tmp_path: Path) -> AsyncIterator[Buffer]:
    b = await Buffer.open(tmp_path / "buffer.db", plant="plant-test", agent_id="test-agent")
    try:
        yield b
    finally:
        await b.close()


async def _wait(predicate: Callable[[], bool], task: asyncio.Task[None], within: float) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling state owned by another task
            if task.done():
                task.result()
                raise AssertionError("source stopped")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _run(source: Any, ingest: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(ingest))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_sparkplug_source_connects_over_mutual_tls_with_the_new_keys(
    mosquitto_factory: MosquittoFactory, mqtt_pki: MqttPki, buf: Buffer
) -> None:
    broker = mosquitto_factory(
        tls=mqtt_pki, require_certificate=True, use_identity_as_username=True
    )
    client = mqtt_pki.client_cert("spb-host")
    cfg = sparkplug.Config.model_validate(
        {
            "url": broker.url,
            "groups": ["Plant1"],
            "host_id": "tls-host",
            "client_id": "edge-agent-tls-spb",
            "ca_file": str(mqtt_pki.ca_file),
            "cert_file": str(client.cert),
            "key_file": str(client.key),
        }
    )
    source = sparkplug.build("spb", cfg, CTX)
    async with _run(source, buf) as task:
        await _wait(lambda: source.state().state == "connected", task, 30)
    assert "spb-host" in broker.log()  # the broker took our certificate's name as the user


@pytest.mark.parametrize("spelling", ["verify_certificate", "tls_insecure_skip_verify"])
async def test_mqtt_source_reaches_a_lab_broker_only_with_verification_off(
    mosquitto_factory: MosquittoFactory, mqtt_pki: MqttPki, buf: Buffer, spelling: str
) -> None:
    """A broker whose certificate no configured CA signed, by IP (the certificate names
    localhost): refused while verifying, reached with verify_certificate = false (or its old
    spelling)."""
    broker = mosquitto_factory(tls=mqtt_pki)
    body: dict[str, Any] = {
        "url": f"mqtts://127.0.0.1:{broker.port}",
        "client_id": "edge-agent-tls-lab",
        "reconnect_min": "1s",
        "reconnect_max": "1s",
        "ca_file": str(mqtt_pki.other_ca_file),
        "subscriptions": [{"topic": "plant/#"}],
    }
    strict = mqtt_source.build("lab", mqtt_source.Config.model_validate(body), CTX)
    async with _run(strict, buf) as task:
        await _wait(lambda: strict.state().last_error is not None, task, 30)
        assert strict.state().state != "connected"
        assert strict.state().detail.get("subscribed") is not True
    off = {"verify_certificate": False} if spelling == "verify_certificate" else {spelling: True}
    lax = mqtt_source.build("lab", mqtt_source.Config.model_validate({**body, **off}), CTX)
    async with _run(lax, buf) as task:
        await _wait(lambda: lax.state().detail.get("subscribed") is True, task, 30)


def test_sparkplug_watch_speaks_mutual_tls_with_the_same_builder(
    mosquitto_factory: MosquittoFactory, mqtt_pki: MqttPki
) -> None:
    """`sparkplug watch --ca-file --cert-file --key-file`: the source's keys as options."""
    broker = mosquitto_factory(
        tls=mqtt_pki, require_certificate=True, use_identity_as_username=True
    )
    client = mqtt_pki.client_cert("watcher")
    base = ["sparkplug", "watch", broker.url, "--once", "--duration", "0.5", "--json"]
    base += ["--ca-file", str(mqtt_pki.ca_file)]
    ok = run_cli(*base, "--cert-file", str(client.cert), "--key-file", str(client.key))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["edge_nodes"] == [], ok.stdout  # connected, nothing born
    assert "watcher" in broker.log()
    refused = run_cli(*base)  # the broker requires a client certificate
    assert refused.returncode != 0
    other = mqtt_pki.client_cert("other")
    wrong = run_cli(*base, "--cert-file", str(client.cert), "--key-file", str(other.key))
    assert wrong.returncode == 1, wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1].startswith("Error: --cert-file: cannot load")

"""The NATS sink's config, and its TLS / mTLS / token paths against a real nats-server.

One JetStream server with TLS that requires a client certificate (trustme CA) and a
token: the sink must publish with the right files, and report ``auth_failed`` (without
hammering) with a wrong token or an untrusted client certificate.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.sinks.nats import Config, NatsSink
from adapters.sinks.nats.sink import _subject_matches, header_bytes, retry_horizon
from agent.interfaces import Batch, Outcome
from agent.registry import AdapterContext
from tests.fixtures.nats_cluster import INSTALL_HINT, find_nats_server

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token"  # noqa: S105


# --------------------------------------------------------------------------- config


def test_config_refuses_plain_text_to_another_host() -> None:
    with pytest.raises(ValidationError, match="url: 'nats://nats.example.com:4222' is plain"):
        Config(url="nats://nats.example.com:4222")
    assert Config(url="nats://nats.example.com:4222", allow_insecure=True)
    assert Config(url="nats://127.0.0.1:4222").servers == ["nats://127.0.0.1:4222"]


def test_config_takes_a_list_or_commas_and_one_scheme() -> None:
    c = Config(url="tls://a:4222, tls://b:4222")
    assert c.servers == ["tls://a:4222", "tls://b:4222"] and c.tls
    assert Config(url=["tls://a:4222", "tls://b:4222"]).servers == c.servers
    with pytest.raises(ValidationError, match="tls:// for every server"):
        Config(url="tls://a:4222,nats://127.0.0.1:4222")
    with pytest.raises(ValidationError, match="must be tls://HOST"):
        Config(url="http://a:4222")


def test_config_one_credential_method_and_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="choose one of"):
        Config(url="tls://a", username="u", password="p", token="t")
    with pytest.raises(ValidationError, match="a password needs a username"):
        Config(url="tls://a", password="p")
    with pytest.raises(ValidationError, match="credentials_file: no such file"):
        Config(url="tls://a", credentials_file=tmp_path / "missing.creds")
    with pytest.raises(ValidationError, match="cert_file and key_file go together"):
        f = tmp_path / "c.pem"
        f.write_text("x")
        Config(url="tls://a", cert_file=f)
    with pytest.raises(ValidationError, match="subject_prefix"):
        Config(url="tls://a", subject_prefix="edge.*")


def test_subject_matching_and_sizes() -> None:
    assert _subject_matches("edge.>", "edge.p1.x")
    assert _subject_matches("edge.p1.*", "edge.p1.x")
    assert not _subject_matches("edge.p2.>", "edge.p1.x")
    assert not _subject_matches("edge.p1", "edge.p1.x")
    assert header_bytes({"A": "b"}) == len(b"NATS/1.0\r\nA: b\r\n\r\n")
    ctx = AdapterContext("a", "p", Path("."), "0", backoff_max=15, auth_retry_interval=60)
    assert retry_horizon(ctx, 10) == 70


# --------------------------------------------------------------------------- TLS server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_server(tmp_path: Path):
    import trustme

    if find_nats_server() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost")
    files: dict[str, Any] = {}
    for name, blob in (
        ("ca.pem", ca.cert_pem),
        ("server.pem", server.cert_chain_pems[0]),
        ("server.key", server.private_key_pem),
    ):
        blob.write_to_path(tmp_path / name)
        files[name] = tmp_path / name
    for tag, issuer in (("good", ca), ("bad", other)):
        c = issuer.issue_cert("edge-agent")
        c.cert_chain_pems[0].write_to_path(tmp_path / f"{tag}.pem")
        c.private_key_pem.write_to_path(tmp_path / f"{tag}.key")
        files[tag] = (tmp_path / f"{tag}.pem", tmp_path / f"{tag}.key")
    other.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    files["other-ca.pem"] = tmp_path / "other-ca.pem"
    port = _free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{tmp_path / "js"}" }}
tls {{
  cert_file: "{files["server.pem"]}"
  key_file: "{files["server.key"]}"
  ca_file: "{files["ca.pem"]}"
  verify: true
}}
authorization {{ token: "{TOKEN}" }}
"""
    )
    log = (tmp_path / "nats.log").open("ab")
    proc = subprocess.Popen([find_nats_server(), "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    files["port"] = port
    files["log"] = tmp_path / "nats.log"
    deadline = time.monotonic() + 30
    while "Server is ready" not in files["log"].read_text(errors="replace"):
        assert proc.poll() is None, files["log"].read_text()
        assert time.monotonic() < deadline, files["log"].read_text()
        time.sleep(0.1)
    try:
        yield files
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def _ctx(tmp_path: Path) -> AdapterContext:
    return AdapterContext("agent-1", "p1", tmp_path, "0", backoff_max=1, auth_retry_interval=2)


async def _wait_state(sink: NatsSink, states: set[str], wait: float = 20) -> str:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        st = sink.state().state
        if st in states:
            return st
        await asyncio.sleep(0.05)
    raise AssertionError(f"sink state {sink.state()} not in {states}")


async def _add_stream(files: dict[str, Any], tmp_path: Path) -> None:
    import ssl

    import nats

    ctx = ssl.create_default_context(cafile=str(files["ca.pem"]))
    ctx.load_cert_chain(*map(str, files["good"]))
    nc = await nats.connect(f"tls://localhost:{files['port']}", tls=ctx, token=TOKEN)
    try:
        await nc.jetstream().add_stream(name="EDGE", subjects=["edge.>"], duplicate_window=300)
    finally:
        await nc.close()


def _batch(n: int = 1) -> Batch:
    return Batch("s1", f"BATCH{n}", "E1", n, n, [f"id{n}"], [b'{"id":"id%d"}' % n])


async def test_mtls_and_token_from_a_file_publish(tls_server, tmp_path: Path) -> None:
    await _add_stream(tls_server, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cert, key = tls_server["good"]
    cfg = Config(
        url=f"tls://localhost:{tls_server['port']}",
        ca_file=tls_server["ca.pem"],
        cert_file=cert,
        key_file=key,
        token_file=token_file,
    )
    sink = NatsSink("central", cfg, _ctx(tmp_path))
    await sink.start()
    try:
        assert await _wait_state(sink, {"connected", "auth_failed"}) == "connected"
        r1, r2 = await sink.send(_batch(1)), await sink.send(_batch(1))
        assert r1.outcome is Outcome.ACCEPTED and r2.outcome is Outcome.ACCEPTED
        d = sink.state().detail
        assert d["duplicates"] == 1 and d["last_stream_sequence"] == 1, d
        assert d["stream_check"]["dedupe_ok"] is True, d
    finally:
        await sink.stop()


@pytest.mark.parametrize("what", ["wrong token", "untrusted client certificate"])
async def test_refused_credentials_are_auth(tls_server, tmp_path: Path, what: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong" if what == "wrong token" else TOKEN)
    cert, key = tls_server["bad" if "certificate" in what else "good"]
    cfg = Config(
        url=f"tls://localhost:{tls_server['port']}",
        ca_file=tls_server["ca.pem"],
        cert_file=cert,
        key_file=key,
        token_file=token_file,
    )
    sink = NatsSink("central", cfg, _ctx(tmp_path))
    await sink.start()
    try:
        assert await _wait_state(sink, {"connected", "auth_failed"}) == "auth_failed"
        result = await sink.send(_batch())
        assert result.outcome is Outcome.AUTH, result
        connects_before = tls_server["log"].read_text().count("Client connection created")
        await asyncio.sleep(3)
        connects = tls_server["log"].read_text().count("Client connection created")
        # auth_retry_interval is 2 s: at most two more attempts in 3 s, not a storm
        assert connects - connects_before <= 2, (connects_before, connects)
    finally:
        await sink.stop()


@pytest.mark.parametrize("which", ["bad", "good"])
async def test_a_reset_while_connecting_is_explained_by_asking_again(
    tls_server, which: str
) -> None:
    """A reset can hide the TLS alert that refused our certificate (our CONNECT crossed
    it). The sink then asks once more without writing and reads the alert, so an untrusted
    certificate is auth_failed, not "disconnected", whatever the timing."""
    from adapters.sinks.nats.sink import _tls_alert
    from agent.tls import client_context

    cert, key = tls_server[which]
    ctx = client_context(tls_server["ca.pem"], cert_file=cert, key_file=key)
    alert = await _tls_alert(f"tls://localhost:{tls_server['port']}", ctx)
    if which == "bad":
        assert alert is not None and "alert" in alert.lower(), alert
    else:
        assert alert is None


async def test_server_certificate_from_another_ca_is_refused(tls_server, tmp_path: Path) -> None:
    cert, key = tls_server["good"]
    other_ca = tls_server["other-ca.pem"]  # a CA that never signed the server
    cfg = Config(
        url=f"tls://localhost:{tls_server['port']}",
        ca_file=other_ca,
        cert_file=cert,
        key_file=key,
        token=TOKEN,
    )
    sink = NatsSink("central", cfg, _ctx(tmp_path))
    await sink.start()
    try:
        assert await _wait_state(sink, {"connected", "auth_failed"}) == "auth_failed"
        assert "verif" in (sink.state().last_error or "").lower(), sink.state()
    finally:
        await sink.stop()


# --------------------------------------------------------------------------- NKey / JWT


@pytest.fixture
def operator_server(tmp_path: Path):
    from tests.fixtures.nats_jwt import operator_mode

    if find_nats_server() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    om = operator_mode(tmp_path / "jwt")
    port = _free_port()
    conf = tmp_path / "op.conf"
    conf.write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        + om.server_config
    )
    log_path = tmp_path / "nats.log"
    log = log_path.open("ab")
    proc = subprocess.Popen([find_nats_server(), "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 30
    while "Server is ready" not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    try:
        yield om, f"nats://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


async def test_credentials_file_nkey_jwt_publishes_and_a_foreign_one_is_auth(
    operator_server, tmp_path: Path
) -> None:
    import nats

    om, url = operator_server
    nc = await nats.connect(url, user_credentials=str(om.creds))
    try:
        await nc.jetstream().add_stream(name="EDGE", subjects=["edge.>"], duplicate_window=300)
    finally:
        await nc.close()
    good = NatsSink("central", Config(url=url, credentials_file=om.creds), _ctx(tmp_path))
    bad = NatsSink("other", Config(url=url, credentials_file=om.foreign_creds), _ctx(tmp_path))
    await good.start()
    await bad.start()
    try:
        assert await _wait_state(good, {"connected", "auth_failed"}) == "connected"
        assert (await good.send(_batch(1))).outcome is Outcome.ACCEPTED
        assert await _wait_state(bad, {"connected", "auth_failed"}) == "auth_failed"
        assert (await bad.send(_batch(2))).outcome is Outcome.AUTH
        assert "authorization" in (bad.state().last_error or "").lower(), bad.state()
    finally:
        await good.stop()
        await bad.stop()

"""Interop: node-opcua's sample server with a certificate signed by a plant CA made here.

The sample server takes a given certificate: it makes its own self-signed one only when
PKI/server_certificate1.pem is missing, so the test writes a CA-signed one (followed by the
issuing CA, as a GDS-provisioned server sends its chain) and the key before it starts.
Two servers: one with a valid CA-signed certificate (trusted through the CA, then revoked
through a CRL), one with an expired one. Then the plant IT round trip: ``opcua endpoints``,
``opcua browse --toml``, ``edge-agent run`` with that block, events at the reference gateway.
"""

from __future__ import annotations

import asyncio
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.sources.opcua import security
from tests.fixtures.common import agent_config, https_sink, run_cli, to_toml
from tests.fixtures.node_opcua import (
    NodeOpcUaServer,
    seed_certificate,
    start_node_opcua,
    stop_node_opcua,
)
from tests.fixtures.opcua_ca import Ca, Issued
from tests.fixtures.opcua_helpers import make_config, read_events, running_source, wait_for

SECURE = {"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt"}


@dataclass
class Plant:
    root: Ca
    issuing: Ca
    leaf: Issued
    expired: Issued
    server: NodeOpcUaServer
    expired_server: NodeOpcUaServer
    application_uri: str


@pytest.fixture(scope="module")
def plant(node_opcua_server, tmp_path_factory) -> Iterator[Plant]:
    # the sample server's ApplicationUri (urn:FQDN:NodeOPCUA-Server) as its own cert says
    uri = security.application_uri_of(security.load_certificate(node_opcua_server.certificate))
    assert uri
    root = Ca.root()
    issuing = root.intermediate()
    hosts = (socket.gethostname(), "localhost")
    leaf = issuing.server(uri, cn="plc1", hosts=hosts)
    now = datetime.now(UTC)
    expired = root.server(
        uri,
        cn="plc-expired",
        hosts=hosts,
        not_before=now - timedelta(days=400),
        not_after=now - timedelta(days=1),
    )
    home1 = tmp_path_factory.mktemp("node-opcua-ca")
    seed_certificate(home1, leaf.pem + issuing.pem, leaf.key_pem())
    home2 = tmp_path_factory.mktemp("node-opcua-expired")
    seed_certificate(home2, expired.pem, expired.key_pem())
    started: list[NodeOpcUaServer] = []
    try:
        started.append(start_node_opcua(home1))
        started.append(start_node_opcua(home2))
        yield Plant(root, issuing, leaf, expired, started[0], started[1], uri)
    finally:
        for srv in started:
            stop_node_opcua(srv)


def _pki(tmp_path: Path, plant: Plant, *, revoke: bool = False, root: bool = True) -> Path:
    pki = tmp_path / "pki"
    for sub in ("trusted/certs", "trusted/crl", "issuers/certs", "issuers/crl"):
        (pki / sub).mkdir(parents=True, exist_ok=True)
    if root:
        (pki / "trusted/certs/root.der").write_bytes(plant.root.der)
    (pki / "trusted/crl/root.crl").write_bytes(plant.root.crl())
    (pki / "issuers/crl/issuing.crl").write_bytes(
        plant.issuing.crl([plant.leaf.cert] if revoke else [])
    )
    return pki


def _nodes(ns: str) -> list[dict]:
    return [
        {"node_id": f"nsu={ns};s=FanSpeed", "sampling_interval": "100ms", "queue_size": 20},
        {"node_id": f"nsu={ns};s=PumpSpeed", "sampling_interval": "100ms", "queue_size": 20},
    ]


async def _refusal(cfg, tmp_path) -> str:
    async with running_source(cfg, tmp_path) as (src, buf):
        st = await wait_for(
            lambda: src.state() if src.state().state == "auth_failed" else None, 30, "refusal", src
        )
        assert await read_events(buf, "line1") == []
    assert st.last_error
    return st.last_error


async def test_ca_signed_server_is_trusted_through_its_root_ca(plant, tmp_path):
    """Only the root CA is trusted; the issuing CA comes from the chain the server sends."""
    pki = _pki(tmp_path, plant)
    cfg = make_config(
        plant.server.endpoint,
        _nodes(plant.application_uri),
        pki_dir=str(pki),
        publishing_interval="200ms",
        **SECURE,
    )
    async with running_source(cfg, tmp_path) as (src, buf):

        async def enough():
            evs = await read_events(buf, "line1")
            return evs if len(evs) >= 10 else None

        events = await wait_for(enough, 30, "10 events over the CA-trusted channel", src)
        assert src.state().detail["security"] == "Basic256Sha256/SignAndEncrypt"
    assert {e["data"]["status_code"]["name"] for e in events} == {"Good"}
    assert list((pki / "rejected").iterdir()) == []
    # our own certificate went into the PKI's own/ folder (Part 12 layout)
    assert (pki / "own" / "certs" / "cert.der").is_file()


async def test_server_certificate_revoked_by_the_ca_crl_is_refused(plant, tmp_path):
    pki = _pki(tmp_path, plant, revoke=True)
    cfg = make_config(
        plant.server.endpoint, _nodes(plant.application_uri), pki_dir=str(pki), **SECURE
    )
    err = await _refusal(cfg, tmp_path)
    thumb = security.thumbprint(plant.leaf.der)
    assert f"server certificate of {plant.server.endpoint} (CN=plc1" in err
    assert "was revoked by CN=Test Plant Issuing CA" in err and "BadCertificateRevoked" in err
    assert (pki / "rejected" / f"{thumb}.der").read_bytes() == plant.leaf.der


async def test_expired_server_certificate_is_refused(plant, tmp_path):
    pki = _pki(tmp_path, plant)
    cfg = make_config(
        plant.expired_server.endpoint, _nodes(plant.application_uri), pki_dir=str(pki), **SECURE
    )
    err = await _refusal(cfg, tmp_path)
    assert "CN=plc-expired" in err and "expired on" in err and "BadCertificateTimeInvalid" in err


def test_untrusted_server_lands_in_rejected_and_the_printed_command_trusts_it(plant, tmp_path):
    pki = _pki(tmp_path, plant, root=False)  # CRLs, but no trusted CA
    cfg = make_config(
        plant.server.endpoint, _nodes(plant.application_uri), pki_dir=str(pki), **SECURE
    )
    err = asyncio.run(_refusal(cfg, tmp_path))
    thumb = security.thumbprint(plant.leaf.der)
    saved = pki / "rejected" / f"{thumb}.der"
    assert saved.read_bytes() == plant.leaf.der
    command = err.split("trust it: ", 1)[1]
    assert command == f"edge-agent opcua trust --pki {pki} {saved}"
    # run exactly what the message says (the real CLI)
    r = run_cli(*shlex.split(command)[1:])
    assert r.returncode == 0, r.stderr
    assert (pki / "trusted" / "certs" / f"{thumb}.der").is_file() and not saved.exists()
    r = run_cli(
        "opcua",
        "test",
        plant.server.endpoint,
        f"nsu={plant.application_uri};s=FanSpeed",
        "--security",
        "Basic256Sha256,SignAndEncrypt",
        "--pki",
        str(pki),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "server certificate trusted by itself in" in r.stdout
    assert "all nodes readable" in r.stdout


def test_endpoints_browse_toml_run_and_events_reach_the_gateway(
    plant, gateway, agent_process, tmp_path
):
    """Plant IT's round trip, through the real CLI: look, write the block, run it."""
    srv = plant.server
    pki = _pki(tmp_path, plant)
    eps = run_cli("opcua", "endpoints", srv.endpoint)
    assert eps.returncode == 0, eps.stderr
    assert "Basic256Sha256,SignAndEncrypt" in eps.stdout and "None,None" in eps.stdout
    assert security.pretty_thumbprint(security.thumbprint(plant.leaf.der)) in eps.stdout
    assert "issuer           CN=Test Plant Issuing CA,O=Test Plant" in eps.stdout
    assert "UserName" in eps.stdout and "Anonymous" in eps.stdout
    browse = run_cli(
        "opcua",
        "browse",
        srv.endpoint,
        "--path",
        "Objects/1:MyDevices",
        "--match",
        "*Speed",
        "--variables-only",
        "--security",
        "Basic256Sha256,SignAndEncrypt",
        "--pki",
        str(pki),
        "--toml",
        "--name",
        "plc1",
    )
    assert browse.returncode == 0, browse.stderr
    block = browse.stdout
    assert block.count("[[sources.plc1.nodes]]") == 2, block
    assert f'node_id = "nsu={plant.application_uri};s=FanSpeed"' in block
    assert f'pki_dir = "{pki}"' in block
    gw = gateway()
    base = agent_config(tmp_path, sinks={"https": https_sink(gw)})
    agent = agent_process(base)
    agent.config_path.write_text(to_toml(base) + "\n" + block)
    check = run_cli("config", "check", str(agent.config_path))
    assert check.returncode == 0, check.stdout + check.stderr
    agent.start()
    gw.wait_received(6, stream="plc1", timeout=60)
    agent.stop()
    events = gw.events("plc1")
    assert {e["subject"] for e in events} <= {"MyDevices/FanSpeed", "MyDevices/PumpSpeed"}
    assert {e["data"]["node_id"] for e in events} == {
        f"nsu={plant.application_uri};s=FanSpeed",
        f"nsu={plant.application_uri};s=PumpSpeed",
    }
    seqs = [int(e["sequence"]) for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

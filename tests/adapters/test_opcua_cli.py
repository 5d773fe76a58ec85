"""``edge-agent opcua browse|test|gen-cert`` against the real test server."""

from __future__ import annotations

import json
import socket
import tomllib
from datetime import timedelta

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.sources.opcua import security
from adapters.sources.opcua.cli import opcua
from agent.errors import SourceError

NS = "urn:edge-agent:test-server"


def test_gen_cert_makes_an_application_instance_certificate(tmp_path):
    r = CliRunner().invoke(
        opcua, ["gen-cert", "--out-dir", str(tmp_path), "--application-uri", "urn:edge01:agent"]
    )
    assert r.exit_code == 0, r.output
    cert = x509.load_der_x509_certificate((tmp_path / "cert.der").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:edge01:agent"]
    assert socket.gethostname() in san.get_values_for_type(x509.DNSName)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in list(eku)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and ku.data_encipherment
    assert cert.public_key().key_size == 2048
    assert (tmp_path / "key.pem").stat().st_mode & 0o077 == 0
    assert "SHA-1 thumbprint" in r.output and "urn:edge01:agent" in r.output
    again = CliRunner().invoke(opcua, ["gen-cert", "--out-dir", str(tmp_path)])
    assert again.exit_code == 1 and "--force" in again.output


def test_browse_lists_nodes_with_type_and_value(opcua_plain_server):
    r = CliRunner().invoke(
        opcua, ["browse", opcua_plain_server.endpoint, "--path", "Objects/2:Line1"]
    )
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if "Line1.Counter" in ln)
    assert line.split()[:4] == [
        "Objects/2:Line1/2:Counter",
        "ns=2;s=Line1.Counter",
        "Variable",
        "UInt32",
    ]
    assert "BadSensorFailure" in r.output or "Quality" in r.output
    missing = CliRunner().invoke(
        opcua, ["browse", opcua_plain_server.endpoint, "--path", "Objects/2:Nope"]
    )
    assert missing.exit_code == 1 and "browse path 'Objects/2:Nope' not found" in missing.output


def _config(tmp_path, endpoint: str, extra: str = "", nodes: str = "") -> str:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[buffer]
path = "{tmp_path / "buf.db"}"
[sinks.https]
url = "https://127.0.0.1:9/ingest"
[sources.line1]
type = "opcua"
endpoint = "{endpoint}"
{extra}
[[sources.line1.nodes]]
node_id = "nsu={NS};s=Line1.Counter"
[[sources.line1.nodes]]
browse_path = "Objects/2:Line1/2:Temperature"
{nodes}
"""
    )
    return str(path)


def test_test_command_reads_every_node_and_names_the_failures(opcua_plain_server, tmp_path):
    good = _config(tmp_path, opcua_plain_server.endpoint)
    r = CliRunner().invoke(opcua, ["test", "-c", good])
    assert r.exit_code == 0, r.output
    assert r.output.count("  ok  ") == 2 and "all nodes readable" in r.output
    bad = _config(
        tmp_path,
        opcua_plain_server.endpoint,
        nodes='[[sources.line1.nodes]]\nnode_id = "ns=2;s=Line1.Missing"\n'
        '[[sources.line1.nodes]]\nbrowse_path = "Objects/2:Line1/2:Nope"\n',
    )
    r = CliRunner().invoke(opcua, ["test", "-c", bad])
    assert r.exit_code == 1
    assert "FAIL  ns=2;s=Line1.Missing: read gives BadNodeIdUnknown" in r.output
    assert (
        "FAIL  Objects/2:Line1/2:Nope: browse_path 'Objects/2:Line1/2:Nope' not found" in r.output
    )


def test_test_command_reports_a_refused_login(opcua_secure_server, tmp_path):
    (tmp_path / "pw").write_text("nope")
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "srv.der").write_bytes(opcua_secure_server.cert.read_bytes())
    cfg = _config(
        tmp_path,
        opcua_secure_server.endpoint,
        extra=f'security_policy = "Aes128_Sha256_RsaOaep"\ntrusted_certs_dir = "{tmp_path / "trusted"}"\n'
        f'username = "operator"\npassword_file = "{tmp_path / "pw"}"\n',
    )
    r = CliRunner().invoke(opcua, ["test", "-c", cfg])
    assert r.exit_code == 1
    assert (
        "FAIL  connect: server" in r.output
        and "refused user 'operator' (BadUserAccessDenied)" in r.output
    )


# ------------------------------------------------------------------ issue 14: discovery, PKI


def test_gen_cert_renew_keeps_uri_host_and_subject_and_the_old_files(tmp_path):
    first = CliRunner().invoke(
        opcua,
        [
            "gen-cert",
            "--out-dir",
            str(tmp_path),
            "--application-uri",
            "urn:edge07:agent",
            "--hostname",
            "edge07.plant.example",
            "--common-name",
            "edge07",
            "--organization",
            "Plant 7",
            "--days",
            "10",
        ],
    )
    assert first.exit_code == 0, first.output
    old = x509.load_der_x509_certificate((tmp_path / "cert.der").read_bytes())
    old_key = (tmp_path / "key.pem").read_bytes()
    r = CliRunner().invoke(opcua, ["gen-cert", "--out-dir", str(tmp_path), "--renew"])
    assert r.exit_code == 0, r.output
    new = x509.load_der_x509_certificate((tmp_path / "cert.der").read_bytes())
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:edge07:agent"]
    assert "edge07.plant.example" in san.get_values_for_type(x509.DNSName)
    assert new.subject == old.subject
    assert new.not_valid_after_utc - new.not_valid_before_utc > timedelta(days=700)
    assert (tmp_path / "key.pem").read_bytes() != old_key
    assert (tmp_path / "cert.der.old").read_bytes() == old.public_bytes(Encoding.DER)
    assert (tmp_path / "key.pem.old").read_bytes() == old_key
    assert "renewed" in r.output
    missing = CliRunner().invoke(opcua, ["gen-cert", "--out-dir", str(tmp_path / "x"), "--renew"])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_own_certificate_warns_30_days_before_it_expires(tmp_path, caplog):
    from adapters.sources.opcua import connection
    from adapters.sources.opcua.config import Config

    r = CliRunner().invoke(
        opcua,
        ["gen-cert", "--out-dir", str(tmp_path), "--application-uri", "urn:e:a", "--days", "20"],
    )
    assert r.exit_code == 0, r.output
    cfg = Config.model_validate(
        {
            "endpoint": "opc.tcp://127.0.0.1:4840",
            "security_policy": "Basic256Sha256",
            "server_thumbprint": "00" * 20,
            "certificate": str(tmp_path / "cert.der"),
            "private_key": str(tmp_path / "key.pem"),
            "application_uri": "urn:e:a",
            "nodes": [{"node_id": "i=2258"}],
        }
    )
    with caplog.at_level("WARNING", logger="edge_agent.source.opcua"):
        own = connection.own_certificate(cfg, tmp_path, "line1")
    assert own.application_uri == "urn:e:a"
    text = caplog.text
    assert f"the agent's certificate {tmp_path / 'cert.der'} expires on" in text
    assert f"gen-cert --renew --cert {tmp_path / 'cert.der'} --key {tmp_path / 'key.pem'}" in text
    # 60 days left: no warning
    later = own.not_after
    assert (
        connection.warn_if_expiring(
            tmp_path / "c", tmp_path / "k", later, later - timedelta(days=60)
        )
        is None
    )
    # and the configured URI must be the certificate's
    bad = cfg.model_copy(update={"application_uri": "urn:other"})
    with pytest.raises(SourceError, match="differs from the URI"):
        connection.own_certificate(bad, tmp_path, "line1")


def test_browse_json_and_toml_with_glob_and_node_start(opcua_plain_server, tmp_path):
    ep = opcua_plain_server.endpoint
    r = CliRunner().invoke(opcua, ["browse", ep, "--node", "ns=2;s=Line1", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["node_id"]: row for row in json.loads(r.output)}
    assert rows["ns=2;s=Line1.Counter"]["path"] == "Objects/2:Line1/2:Counter"
    assert rows["ns=2;s=Line1.Counter"]["data_type"] == "UInt32"
    r = CliRunner().invoke(
        opcua,
        [
            "browse",
            ep,
            "--depth",
            "2",
            "--match",
            "Objects/2:Line1/2:[CT]*",
            "--variables-only",
            "--toml",
            "--name",
            "press3",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = tomllib.loads(r.output)
    src = doc["sources"]["press3"]
    assert src["type"] == "opcua" and src["endpoint"] == ep
    assert [n["node_id"] for n in src["nodes"]] == [
        f"nsu={NS};s=Line1.Counter",
        f"nsu={NS};s=Line1.Temperature",
    ]
    assert [n["name"] for n in src["nodes"]] == ["Line1/Counter", "Line1/Temperature"]
    # what --toml writes, config check accepts (with a buffer and a sink around it)
    from agent.config import load_config

    path = tmp_path / "agent.toml"
    path.write_text(
        f'[buffer]\npath = "{tmp_path / "b.db"}"\n[sinks.https]\nurl = "https://127.0.0.1:9/i"\n'
        + r.output
    )
    assert load_config(path).sources["press3"].nodes[1].node_id.endswith("Line1.Temperature")
    both = CliRunner().invoke(opcua, ["browse", ep, "--json", "--toml"])
    assert both.exit_code == 1 and "not both" in both.output


def test_read_and_test_with_security_options_against_a_secure_only_server(
    opcua_secure_server, tmp_path
):
    srv = opcua_secure_server
    (tmp_path / "pw").write_text("s3cret\n")
    pki = tmp_path / "pki"
    sec = ["--security", "Aes256_Sha256_RsaPss,SignAndEncrypt", "--pki", str(pki)]
    login = ["--user", "operator", "--password-file", str(tmp_path / "pw")]
    # first contact: refused, saved in rejected/, with the command that trusts it
    r = CliRunner().invoke(opcua, ["read", srv.endpoint, "ns=2;s=Line1.Counter", *sec, *login])
    assert r.exit_code == 1
    thumb = security.thumbprint(srv.cert.read_bytes())
    saved = pki / "rejected" / f"{thumb}.der"
    assert f"edge-agent opcua trust --pki {pki} {saved}" in r.output
    t = CliRunner().invoke(opcua, ["trust", "--pki", str(pki), thumb])
    assert t.exit_code == 0, t.output
    assert (pki / "trusted" / "certs" / f"{thumb}.der").is_file() and not saved.exists()
    r = CliRunner().invoke(
        opcua, ["read", srv.endpoint, "ns=2;s=Line1.Counter", "--json", *sec, *login]
    )
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["data_type"] == "UInt32" and row["status"] == "Good"
    r = CliRunner().invoke(
        opcua, ["test", srv.endpoint, "ns=2;s=Line1.Counter", "ns=2;s=Nope", *sec, *login]
    )
    assert r.exit_code == 1
    assert "ok    server certificate trusted by itself in" in r.output
    assert "ok    ns=2;s=Line1.Counter" in r.output and "FAIL  ns=2;s=Nope" in r.output
    # without a way to check the server's certificate: one line naming the options
    r = CliRunner().invoke(opcua, ["read", srv.endpoint, "i=2258", "--security", "Basic256Sha256"])
    assert r.exit_code == 1 and "--pki DIR or --server-thumbprint" in r.output


def test_endpoints_lists_policies_tokens_and_the_certificate(opcua_secure_server):
    srv = opcua_secure_server
    r = CliRunner().invoke(opcua, ["endpoints", srv.endpoint, "--json"])
    assert r.exit_code == 0, r.output
    eps = json.loads(r.output)
    pairs = {(e["security_policy"], e["security_mode"]) for e in eps}
    assert ("Aes256_Sha256_RsaPss", "SignAndEncrypt") in pairs and (
        "Basic256Sha256",
        "Sign",
    ) in pairs
    assert all("UserName" in " ".join(e["user_tokens"]) for e in eps)
    cert = eps[0]["certificate"]
    assert cert["thumbprint"] == security.pretty_thumbprint(
        security.thumbprint(srv.cert.read_bytes())
    )
    assert cert["self_signed"] and cert["application_uri"] == "urn:edge-agent:test-server:app"
    text = CliRunner().invoke(opcua, ["endpoints", srv.endpoint])
    assert "Aes256_Sha256_RsaPss,SignAndEncrypt" in text.output and "issuer" in text.output

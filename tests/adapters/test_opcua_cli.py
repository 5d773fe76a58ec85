"""``edge-agent opcua browse|test|gen-cert`` against the real test server."""

from __future__ import annotations

import socket

from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.sources.opcua.cli import opcua

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

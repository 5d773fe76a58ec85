"""Certificates: the agent's application instance certificate and trust in the server's.

OPC UA secures a channel with X.509 certificates in both directions. The agent presents an
application instance certificate whose SubjectAltName carries its ApplicationUri (servers
refuse one whose URI does not match the ApplicationDescription), and it must decide whether
to trust the server's certificate. This module holds the certificate helpers and makes the
agent's own certificate; the trust decision (Part 12 PKI folder, CA chains, CRLs) is made in
``pki.py`` before any secured message is sent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import SourceError

CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


def default_application_uri(hostname: str | None = None) -> str:
    return f"urn:{hostname or socket.gethostname()}:edge-agent"


def thumbprint(der: bytes) -> str:
    """SHA-1 of the DER certificate, upper-case hex (how OPC UA tools show it)."""
    return hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - identification, not security


def pretty_thumbprint(thumb: str) -> str:
    return ":".join(thumb[i : i + 2] for i in range(0, len(thumb), 2))


def load_certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def application_uri_of(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def subject_of(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


class AuthRefused(SourceError):
    """Security or login refused: retrying will not help until the operator acts."""


def generate_application_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    application_uri: str,
    hostname: str | None = None,
    common_name: str = "edge-agent",
    organization: str | None = None,
    days: int = 730,
    server_auth: bool = False,
) -> x509.Certificate:
    """Write a self-signed application instance certificate (DER) and its key (PEM).

    OPC UA Part 6 §6.2.2: the ApplicationUri in the SubjectAltName (servers compare it with
    the client's ApplicationDescription), the host name as DNS name, RSA 2048 with SHA-256
    (valid for Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss), key usages for
    signing and key/data encipherment, and client authentication as extended key usage.
    """
    host = hostname or socket.gethostname()
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri),
        x509.DNSName(host),
    ]
    if host != "localhost":
        names.append(x509.DNSName("localhost"))
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    attrs = {"organizationName": organization} if organization else {}
    uses = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server_auth:
        uses.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = cert_gen.generate_self_signed_app_certificate(
        key, common_name, attrs, names, extended=uses, days=days
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return cert


def check_own_certificate(cert: x509.Certificate, path: Path) -> None:
    """Refuse an expired or not-yet-valid certificate with the way out."""
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise SourceError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d} "
            "(make a new one: edge-agent opcua gen-cert)"
        )
    if cert.not_valid_before_utc > now + timedelta(minutes=5):
        raise SourceError(
            f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "(check the clock of this machine)"
        )


def common_name_of(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None

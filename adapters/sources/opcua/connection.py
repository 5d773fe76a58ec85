"""Opening a client session with the configured security, and saying clearly why it failed.

Shared by the source, ``edge-agent opcua test`` and ``browse``. asyncua errors are translated
here into ``SourceError`` messages a plant IT person can act on (what failed, where, what to
do); ``AuthRefused`` marks the ones no retry will fix until someone changes something.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto import security_policies
from asyncua.ua import uaerrors

from agent.config import read_secret
from agent.errors import SourceError

from . import pki, security
from .config import Config
from .mapping import status_name
from .security import AuthRefused

log = logging.getLogger("edge_agent.source.opcua")

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}

_LOGIN_CODES = {
    ua.StatusCodes.BadUserAccessDenied,
    ua.StatusCodes.BadIdentityTokenInvalid,
    ua.StatusCodes.BadIdentityTokenRejected,
    ua.StatusCodes.BadUserSignatureInvalid,
}
_CERT_CODES = {
    ua.StatusCodes.BadSecurityChecksFailed,
    ua.StatusCodes.BadCertificateUntrusted,
    ua.StatusCodes.BadCertificateInvalid,
    ua.StatusCodes.BadCertificateUriInvalid,
    ua.StatusCodes.BadCertificateHostNameInvalid,
    ua.StatusCodes.BadCertificateTimeInvalid,
    ua.StatusCodes.BadCertificateIssuerRevocationUnknown,
    ua.StatusCodes.BadCertificateRevocationUnknown,
    ua.StatusCodes.BadSecurityPolicyRejected,
}


#: warn this long before the agent's own certificate expires
RENEW_WARNING = timedelta(days=30)
_warned_expiry: set[Path] = set()


@dataclass(frozen=True, slots=True)
class OwnCertificate:
    cert: Path
    key: Path
    application_uri: str
    thumbprint: str
    not_after: datetime | None = None


def own_certificate_paths(cfg: Config, state_dir: Path, name: str) -> tuple[Path, Path]:
    """Where the agent's certificate and key are: configured, the PKI's own/, or state_dir."""
    if cfg.certificate is not None and cfg.private_key is not None:
        return cfg.certificate, cfg.private_key
    if cfg.pki_dir is not None:
        return (
            cfg.pki_dir / "own" / "certs" / "cert.der",
            cfg.pki_dir / "own" / "private" / "key.pem",
        )
    base = state_dir / "opcua" / name
    return base / "cert.der", base / "key.pem"


def warn_if_expiring(
    cert_path: Path, key_path: Path, not_after: datetime, now: datetime | None = None
) -> str | None:
    """The renewal warning (logged once per process per file), or None when not due."""
    now = now or datetime.now(UTC)
    if not_after - now > RENEW_WARNING:
        return None
    days = max(0, (not_after - now).days)
    text = (
        f"the agent's certificate {cert_path} expires on {not_after:%Y-%m-%d} (in {days} "
        f"days): renew it with `edge-agent opcua gen-cert --renew --cert {cert_path} --key "
        f"{key_path}` "
        "and trust the new one on the server"
    )
    if cert_path not in _warned_expiry:
        _warned_expiry.add(cert_path)
        log.warning("%s", text)
    return text


def own_certificate(cfg: Config, state_dir: Path, name: str) -> OwnCertificate:
    """The configured application certificate, or one generated once (in the PKI's own/
    folder when pki_dir is set, else under state_dir)."""
    if cfg.certificate is not None and cfg.private_key is not None:
        cert_path, key_path = cfg.certificate, cfg.private_key
        try:
            cert = security.load_certificate(cert_path)
        except OSError as exc:
            raise SourceError(f"cannot read certificate {cert_path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise SourceError(f"{cert_path} is not a DER or PEM certificate") from exc
        if not key_path.is_file():
            raise SourceError(f"private_key {key_path} does not exist")
    else:
        cert_path, key_path = own_certificate_paths(cfg, state_dir, name)
        uri = cfg.application_uri or security.default_application_uri()
        if cert_path.is_file() and key_path.is_file():
            cert = security.load_certificate(cert_path)
            if security.application_uri_of(cert) != uri:
                cert = security.generate_application_certificate(
                    cert_path, key_path, application_uri=uri
                )
        else:
            cert = security.generate_application_certificate(
                cert_path, key_path, application_uri=uri
            )
            log.info(
                "generated application certificate %s (SHA-1 %s): trust it on the server",
                cert_path,
                security.thumbprint(security.der_of(cert)),
            )
    security.check_own_certificate(cert, cert_path)
    uri_in_cert = security.application_uri_of(cert)
    if uri_in_cert is None:
        raise SourceError(
            f"certificate {cert_path} has no ApplicationUri in its SubjectAltName "
            "(make one with: edge-agent opcua gen-cert)"
        )
    if cfg.application_uri is not None and cfg.application_uri != uri_in_cert:
        raise SourceError(
            f"application_uri '{cfg.application_uri}' differs from the URI in {cert_path} "
            f"('{uri_in_cert}'): remove application_uri or make a matching certificate"
        )
    warn_if_expiring(cert_path, key_path, cert.not_valid_after_utc)
    return OwnCertificate(
        cert_path,
        key_path,
        uri_in_cert,
        security.thumbprint(security.der_of(cert)),
        cert.not_valid_after_utc,
    )


def make_client(cfg: Config, name: str) -> Client:
    client = Client(
        cfg.endpoint,
        timeout=cfg.request_timeout,
        watchdog_intervall=max(0.2, min(cfg.liveness_timeout / 3, 5.0)),
    )
    client.name = f"edge-agent {name}"
    client.description = client.name
    client.application_uri = cfg.application_uri or security.default_application_uri()
    client.product_uri = "urn:edge-agent"
    client.session_timeout = int(cfg.session_timeout * 1000)
    return client


def _message_of(exc: BaseException) -> str:
    if isinstance(exc, uaerrors.UaStatusCodeError):
        code = exc.code if isinstance(exc.code, int) else int(exc.code)
        return status_name(code)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def translate(exc: BaseException, cfg: Config, own: OwnCertificate | None = None) -> SourceError:
    """One actionable line for whatever went wrong while connecting or running."""
    url = cfg.endpoint
    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, uaerrors.UaStatusCodeError):
        code = int(exc.code)
        name = status_name(code)
        if code in _LOGIN_CODES:
            who = f"user '{cfg.username}'" if cfg.username else "anonymous login"
            fix = (
                "check username and password_file"
                if cfg.username
                else "set username and password_file"
            )
            return AuthRefused(f"server {url} refused {who} ({name}): {fix}")
        if code in _CERT_CODES:
            if own is not None:
                return AuthRefused(
                    f"server {url} refused the agent's certificate ({name}): trust {own.cert} "
                    f"(SHA-1 {security.pretty_thumbprint(own.thumbprint)}) on the server, "
                    "usually by moving it from the server's rejected to its trusted folder"
                )
            return AuthRefused(f"server {url} refused the connection ({name})")
        return SourceError(f"server {url} answered {name}")
    if isinstance(exc, ConnectionRefusedError):
        return SourceError(f"cannot connect to {url}: connection refused (is the server running?)")
    if isinstance(exc, socket.gaierror):
        return SourceError(f"cannot resolve the host of {url}: {exc.strerror} (check endpoint)")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return SourceError(f"no answer from {url} in time (server down or network cut?)")
    if isinstance(exc, ConnectionError):
        return SourceError(f"connection to {url} lost ({exc})")
    if isinstance(exc, OSError):
        return SourceError(f"connection to {url} failed: {exc.strerror or exc}")
    return SourceError(f"connection to {url} failed: {_message_of(exc)}")


async def _secure(client: Client, cfg: Config, trust: pki.Pki, own: OwnCertificate) -> pki.Verdict:
    policy_cls = POLICIES[cfg.security_policy]
    mode = getattr(ua.MessageSecurityMode, cfg.mode)
    client.application_uri = own.application_uri
    endpoints = await client.connect_and_get_server_endpoints()
    chosen = None
    for ep in endpoints:
        if ep.SecurityPolicyUri == policy_cls.URI and ep.SecurityMode == mode:
            chosen = ep
            break
    if chosen is None:
        offered = sorted(
            {
                f"{ep.SecurityPolicyUri.rsplit('#', 1)[-1]}/{ep.SecurityMode.name}"
                for ep in endpoints
            }
        )
        raise AuthRefused(
            f"server {cfg.endpoint} does not offer {cfg.security_policy}/{cfg.mode} "
            f"(it offers: {', '.join(offered)}): change security_policy/security_mode"
        )
    blob = chosen.ServerCertificate
    if not blob:
        raise AuthRefused(f"server {cfg.endpoint} sent no certificate for {cfg.security_policy}")
    chain = pki.split_chain(blob)  # a leaf, maybe followed by its CAs
    app_uri = chosen.Server.ApplicationUri if chosen.Server is not None else None
    verdict = await asyncio.to_thread(trust.check, cfg.endpoint, chain, app_uri)
    await client.set_security(
        policy_cls, str(own.cert), str(own.key), server_certificate=chain[0], mode=mode
    )
    return verdict


def trust_policy(cfg: Config, state_dir: Path, name: str, trust_hint: str | None = None) -> pki.Pki:
    """The PKI of a source. ``trust_hint`` is what ``opcua trust`` needs to find it."""
    if cfg.pki_dir is not None:
        pki.ensure_layout(cfg.pki_dir)
    hint = trust_hint
    if hint is None:
        hint = f"--pki {cfg.pki_dir}" if cfg.pki_dir is not None else ""
        if not hint and cfg.trusted_certs_dir is not None:
            hint = f"--dir {cfg.trusted_certs_dir}"
    return pki.Pki(
        root=cfg.pki_dir,
        extra_trusted=cfg.trusted_certs_dir,
        pinned=cfg.server_thumbprint,
        rejected_dir=None if cfg.pki_dir is not None else state_dir / "opcua" / name / "rejected",
        require_crl=cfg.require_crl,
        trust_hint=hint,
    )


async def open_client(
    cfg: Config,
    name: str,
    state_dir: Path,
    *,
    on_trust: Callable[[pki.Verdict], None] | None = None,
    trust_hint: str | None = None,
) -> tuple[Client, OwnCertificate | None]:
    """A connected, activated client session. Raises SourceError (or AuthRefused).

    ``on_trust`` is told how the server's certificate was trusted (and any warnings)."""
    client = make_client(cfg, name)
    own: OwnCertificate | None = None
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            if cfg.security_policy != "None":
                own = own_certificate(cfg, state_dir, name)
                verdict = await _secure(
                    client, cfg, trust_policy(cfg, state_dir, name, trust_hint), own
                )
                for warning in verdict.warnings:
                    log.warning("source %s: server certificate: %s", name, warning)
                if on_trust is not None:
                    on_trust(verdict)
            if cfg.username:
                password = read_secret(cfg.password, cfg.password_file, "password")
                client.set_user(cfg.username)
                client.set_password(password or "")
            await client.connect(auto_reconnect=False)
    except asyncio.CancelledError:
        _drop_socket(client)
        raise
    except Exception as exc:
        _drop_socket(client)
        raise translate(exc, cfg, own) from exc
    return client, own


async def close_quietly(client: Client, grace: float = 2.0) -> None:
    """Close the session if the server still answers; never hang on a dead one."""
    try:
        async with asyncio.timeout(grace):
            await client.disconnect()
    except Exception:  # noqa: BLE001 - best effort on a connection that may be gone
        log.debug("disconnect did not complete cleanly", exc_info=True)
    _drop_socket(client)


def _drop_socket(client: Client) -> None:
    with contextlib.suppress(Exception):
        client.disconnect_socket()

"""Trust in a server's certificate, the way OPC UA Part 12 (Annex F) lays it out.

A PKI folder holds::

    trusted/certs   certificates trusted on their own: a server's self-signed certificate,
                    or a CA whose every certificate is then trusted
    trusted/crl     revocation lists of the CAs in trusted/certs
    issuers/certs   CAs needed to build a chain (an intermediate, a root) but NOT trusted
                    by being there: a chain is trusted only when it reaches trusted/certs
    issuers/crl     revocation lists of the CAs in issuers/certs
    rejected/       certificates refused, one ``THUMBPRINT.der`` each, for the operator to
                    inspect and trust (``edge-agent opcua trust``)

A server certificate is accepted when it is trusted (in trusted/certs itself, pinned by its
thumbprint, or chained through issuers/certs and the certificates the server sent to a CA in
trusted/certs), is within its validity period (and so is every CA of its chain), carries the
key usages OPC UA needs (digitalSignature and keyEncipherment; serverAuth when it has an
extended key usage), names the server's ApplicationUri in its SubjectAltName, and is revoked
by no CRL of its chain. A CA without a CRL makes the revocation status unknown, which is a
refusal unless ``require_crl = false``.

Why not asyncua's ``TrustStore`` (asyncua.crypto.truststore): it uses the same verifier
(``cryptography.x509.verification``), but treats every folder as trust anchors (no issuers/
that only helps build a chain), passes no intermediates (a chain through an intermediate CA
fails), matches a CRL entry by serial number alone across every CA without checking the
CRL's signature (a CRL file of any CA can revoke another CA's certificate of the same serial;
a forged CRL is believed), and has no "revocation unknown". This module keeps the verifier
and does those parts itself.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from .security import (
    CERT_SUFFIXES,
    AuthRefused,
    der_of,
    load_certificate,
    pretty_thumbprint,
    subject_of,
    thumbprint,
)

log = logging.getLogger("edge_agent.source.opcua")

CRL_SUFFIXES = (".der", ".pem", ".crl")
FOLDERS = ("trusted/certs", "trusted/crl", "issuers/certs", "issuers/crl", "rejected")


def ensure_layout(root: Path) -> None:
    """Create the Part 12 folders (idempotent)."""
    for sub in FOLDERS:
        (root / sub).mkdir(parents=True, exist_ok=True)


def split_chain(blob: bytes) -> list[bytes]:
    """The DER certificates of a ServerCertificate field (a leaf, maybe followed by CAs)."""
    out: list[bytes] = []
    pos = 0
    while pos + 4 <= len(blob) and blob[pos] == 0x30:
        first = blob[pos + 1]
        if first & 0x80:
            n = first & 0x7F
            size = int.from_bytes(blob[pos + 2 : pos + 2 + n], "big") + 2 + n
        else:
            size = first + 2
        out.append(blob[pos : pos + size])
        pos += size
    return out


def _load_certs(folder: Path) -> list[tuple[Path, x509.Certificate]]:
    out: list[tuple[Path, x509.Certificate]] = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in CERT_SUFFIXES:
            continue
        try:
            out.append((p, load_certificate(p)))
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: not a readable certificate (%s)", p, exc)
    return out


def load_crl(path: Path) -> x509.CertificateRevocationList:
    data = path.read_bytes()
    if b"-----BEGIN X509 CRL-----" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def _load_crls(folder: Path) -> list[tuple[Path, x509.CertificateRevocationList]]:
    out: list[tuple[Path, x509.CertificateRevocationList]] = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in CRL_SUFFIXES:
            continue
        try:
            out.append((p, load_crl(p)))
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: not a readable CRL (%s)", p, exc)
    return out


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends
        return False
    return True


def _ca_policy_check(
    _policy: verification.Policy, _cert: x509.Certificate, ext: x509.BasicConstraints | None
) -> None:
    if ext is None or not ext.ca:
        raise ValueError("an issuing certificate must be a CA (basicConstraints ca=true)")


class CertificateRejected(AuthRefused):
    """The server's certificate is known but unusable (expired, revoked, wrong URI...)."""

    def __init__(self, message: str, thumb: str) -> None:
        super().__init__(message)
        self.thumbprint = thumb


class UntrustedCertificate(AuthRefused):
    """Neither the certificate nor any CA of its chain is trusted."""

    def __init__(self, message: str, thumb: str) -> None:
        super().__init__(message)
        self.thumbprint = thumb


@dataclass(slots=True)
class Verdict:
    """What was checked and how it was trusted (shown by ``opcua endpoints``/``test``)."""

    trusted_by: str
    chain: list[x509.Certificate] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Pki:
    """Where trust comes from, for one source (or one CLI call)."""

    #: the Part 12 folder; None when only a flat folder or a thumbprint is configured
    root: Path | None = None
    #: a flat folder of trusted certificates (``trusted_certs_dir``, the older setting)
    extra_trusted: Path | None = None
    #: one server certificate pinned by its SHA-1 thumbprint
    pinned: str | None = None
    #: where refused certificates are copied (root/rejected when root is set)
    rejected_dir: Path | None = None
    #: refuse a CA-signed certificate whose CA has no CRL here (revocation unknown)
    require_crl: bool = True
    #: how to tell the operator to trust a certificate: the argument of ``opcua trust``
    #: that names this PKI (``--pki DIR`` or ``-c CONFIG --source NAME``)
    trust_hint: str = ""

    # ----------------------------------------------------------------- material

    def _trusted(self) -> list[tuple[Path, x509.Certificate]]:
        out = []
        if self.root is not None:
            out += _load_certs(self.root / "trusted" / "certs")
        if self.extra_trusted is not None:
            out += _load_certs(self.extra_trusted)
        return out

    def _issuers(self) -> list[tuple[Path, x509.Certificate]]:
        return _load_certs(self.root / "issuers" / "certs") if self.root is not None else []

    def _crls(self) -> list[tuple[Path, x509.CertificateRevocationList]]:
        if self.root is None:
            return []
        return _load_crls(self.root / "trusted" / "crl") + _load_crls(self.root / "issuers" / "crl")

    # ----------------------------------------------------------------- the check

    def check(
        self,
        endpoint: str,
        chain_ders: Sequence[bytes],
        application_uri: str | None,
        *,
        now: datetime | None = None,
    ) -> Verdict:
        """Return how the server certificate (chain_ders[0]) is trusted, or raise.

        Raises UntrustedCertificate (saved in rejected/, with the trust command) or
        CertificateRejected (expired, revoked, wrong usage or URI: trusting will not help).
        """
        if not chain_ders:
            raise CertificateRejected(f"server {endpoint} sent no certificate", "")
        der = chain_ders[0]
        thumb = thumbprint(der)
        try:
            leaf = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            self._reject(der)
            raise CertificateRejected(
                f"server {endpoint} sent an unparseable certificate ({exc})", thumb
            ) from exc
        now = now or datetime.now(UTC)
        who = f"server certificate of {endpoint} ({subject_of(leaf)}, SHA-1 {pretty_thumbprint(thumb)})"

        def refuse(why: str) -> CertificateRejected:
            saved = self._reject(der)
            where = f"; a copy is in {saved}" if saved else ""
            return CertificateRejected(f"{who} is refused: {why}{where}", thumb)

        # validity, before trust: an expired certificate is refused however it is trusted
        if leaf.not_valid_after_utc < now:
            raise refuse(
                f"it expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                "(BadCertificateTimeInvalid): the server needs a new certificate"
            )
        if leaf.not_valid_before_utc > now:
            raise refuse(
                f"it is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                "(BadCertificateTimeInvalid): check the clocks of this machine and the server"
            )
        self._check_usage(leaf, refuse)
        if application_uri:
            uris = _uris_of(leaf)
            if application_uri not in uris:
                raise refuse(
                    f"its SubjectAltName URI {uris or 'is missing and'} does not match the "
                    f"server's ApplicationUri '{application_uri}' (BadCertificateUriInvalid)"
                )

        trusted = self._trusted()
        issuers = self._issuers()
        verdict: Verdict
        trusted_ders = {der_of(c): p for p, c in trusted}
        if self.pinned is not None and thumb == self.pinned:
            verdict = Verdict("server_thumbprint", [leaf])
        elif der in trusted_ders:
            verdict = Verdict(f"itself in {trusted_ders[der]}", [leaf])
        else:
            anchors = [c for _, c in trusted if is_ca(c)]
            sent = [x509.load_der_x509_certificate(d) for d in chain_ders[1:]]
            chain = self._build_chain(leaf, anchors, [c for _, c in issuers] + sent, now)
            if isinstance(chain, str):
                saved = self._reject(der)
                raise UntrustedCertificate(self._untrusted_message(who, chain, saved, thumb), thumb)
            anchor = chain[-1]
            path = next((p for p, c in trusted if c == anchor), None)
            verdict = Verdict(f"CA {subject_of(anchor)} in {path}", chain)
        if not _is_self_signed(leaf):
            self._check_revocation(verdict, issuers, trusted, refuse, now)
        return verdict

    def _check_usage(self, leaf: x509.Certificate, refuse) -> None:  # noqa: ANN001
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise refuse(
                "it has no keyUsage extension (OPC UA Part 6 requires digitalSignature and "
                "keyEncipherment; BadCertificateUseNotAllowed)"
            ) from None
        missing = [n for n in ("digital_signature", "key_encipherment") if not getattr(ku, n)]
        if missing:
            raise refuse(f"its keyUsage lacks {', '.join(missing)} (BadCertificateUseNotAllowed)")
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            raise refuse(
                "its extendedKeyUsage does not include serverAuth (BadCertificateUseNotAllowed)"
            )

    def _build_chain(
        self,
        leaf: x509.Certificate,
        anchors: list[x509.Certificate],
        intermediates: list[x509.Certificate],
        now: datetime,
    ) -> list[x509.Certificate] | str:
        """The chain leaf..trusted CA, or why there is none."""
        if not anchors:
            return "no CA in the trust list issued it and it is not itself trusted"
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(anchors))
            .time(now)
            .max_chain_depth(8)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.permit_all().require_present(
                    x509.BasicConstraints,
                    verification.Criticality.AGNOSTIC,
                    _ca_policy_check,
                ),
                ee_policy=verification.ExtensionPolicy.permit_all(),
            )
        )
        try:
            return list(builder.build_client_verifier().verify(leaf, intermediates).chain)
        except verification.VerificationError as exc:
            return f"no chain to a trusted CA ({exc})"

    def _check_revocation(
        self,
        verdict: Verdict,
        issuers: list[tuple[Path, x509.Certificate]],
        trusted: list[tuple[Path, x509.Certificate]],
        refuse,  # noqa: ANN001
        now: datetime,
    ) -> None:
        chain = list(verdict.chain)
        if len(chain) == 1:
            # trusted directly but CA-signed: check it against its CA's CRL when the CA is here
            leaf = chain[0]
            ca = next(
                (
                    c
                    for _, c in trusted + issuers
                    if c.subject == leaf.issuer and _issued_by(leaf, c)
                ),
                None,
            )
            if ca is None:
                verdict.warnings.append(
                    f"revocation not checked: its CA {leaf.issuer.rfc4514_string()} is not in "
                    "the PKI (trusted directly)"
                )
                return
            chain.append(ca)
        crls = self._crls()
        for cert, ca in zip(chain, chain[1:], strict=False):
            own = [
                crl
                for _, crl in crls
                if crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())
            ]
            if not own:
                why = (
                    f"the revocation status is unknown: no CRL of CA {subject_of(ca)} in "
                    "trusted/crl or issuers/crl (BadCertificateRevocationUnknown); add the "
                    "CA's CRL there"
                )
                if self.require_crl:
                    raise refuse(why + ", or set require_crl = false")
                verdict.warnings.append(why)
                continue
            for crl in own:
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None:
                    what = "it" if cert is chain[0] else f"its CA {subject_of(cert)}"
                    raise refuse(
                        f"{what} was revoked by {subject_of(ca)} on "
                        f"{entry.revocation_date_utc:%Y-%m-%d %H:%M} UTC (BadCertificateRevoked)"
                    )
                if crl.next_update_utc is not None and crl.next_update_utc < now:
                    verdict.warnings.append(
                        f"the CRL of {subject_of(ca)} is out of date (next update was "
                        f"{crl.next_update_utc:%Y-%m-%d}): fetch a fresh one"
                    )

    # ----------------------------------------------------------------- rejected/

    def _reject(self, der: bytes) -> Path | None:
        target = self.rejected_dir or (self.root / "rejected" if self.root else None)
        if target is None:
            return None
        try:
            target.mkdir(parents=True, exist_ok=True)
            saved = target / f"{thumbprint(der)}.der"
            saved.write_bytes(der)
        except OSError:
            return None
        return saved

    def _untrusted_message(self, who: str, why: str, saved: Path | None, thumb: str) -> str:
        if saved is not None and self.trust_hint:
            how = f"edge-agent opcua trust {self.trust_hint} {shlex.quote(str(saved))}"
        elif saved is not None:
            how = f"copy {saved} into a trusted folder"
        else:
            how = f'set server_thumbprint = "{thumb}"'
        return f"{who} is not trusted: {why}; if this is your server, trust it: {how}"


def _uris_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError
        return False
    return True

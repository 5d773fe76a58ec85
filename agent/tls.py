"""The OS trust store, wherever the OS keeps it, for every TLS client the agent builds.

Why not OpenSSL's defaults (``load_default_certs``): they are compiled into libssl as
OPENSSLDIR. A pip install on the distribution's own Python gets the distribution's paths,
but the PyInstaller binary carries the build host's libssl, so a binary built on Debian
looks in /usr/lib/ssl, which RHEL, SUSE and Alpine do not have. Why not the ``truststore``
package: on Linux it uses those same OpenSSL defaults whenever they exist, and otherwise a
shorter list that misses RHEL's /etc/pki/tls/certs/ca-bundle.crt. So: the CA bundles every
Linux distribution publishes (the list Go's crypto/x509 uses), the first that exists, then
the hashed certificate directories, then OpenSSL's defaults. ``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` override all of it, as they do for OpenSSL itself.

One model of the TLS options, ``TlsOptions``, for every adapter that is a TLS client
(https, mqtt and nats sinks; mqtt and sparkplug sources), as flat keys of the adapter's
table: ``ca_file``, ``cert_file``, ``key_file``, ``verify_hostname``,
``verify_certificate``. One builder, ``client_context``, for them and for the command-line
tools (``sparkplug watch``, ``gateway consume``). It lives in the core, not in adapters/,
because those tools and the core's own code use it and the core must not import adapters.
Old spellings of an adapter are translated by the model, each with one warning naming the
new key (``LegacyKey``); an old and a new spelling of one option together is an error.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ValidationInfo, model_validator

from agent.config import Model
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.preflight import Check

log = logging.getLogger("edge_agent.config")

# First existing file wins (one bundle per OS; several would only be copies of each other).
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Gentoo, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, CentOS, Fedora, Amazon Linux
    "/etc/ssl/ca-bundle.pem",  # SUSE, openSUSE
    "/etc/pki/tls/cacert.pem",  # OpenELEC
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+, Fedora (the source)
    "/etc/ssl/cert.pem",  # Alpine, RHEL 9, BSDs
)
SYSTEM_CA_DIRS = ("/etc/ssl/certs", "/etc/pki/tls/certs")


def load_system_trust(ctx: ssl.SSLContext) -> str:
    """Make ``ctx`` trust the OS's CAs; return where they came from (for logs and errors).

    Raises FileNotFoundError naming every place looked at when the OS has no trust store.
    """
    env_file, env_dir = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if env_file or env_dir:
        for var, value, exists in (
            ("SSL_CERT_FILE", env_file, os.path.isfile),
            ("SSL_CERT_DIR", env_dir, os.path.isdir),
        ):
            if value and not exists(value):
                raise FileNotFoundError(f"{var}={value}: not found (fix the path or unset it)")
        ctx.load_verify_locations(cafile=env_file or None, capath=env_dir or None)
        return " and ".join(p for p in (env_file, env_dir) if p)
    for path in SYSTEM_CA_FILES:
        if os.path.isfile(path):
            ctx.load_verify_locations(cafile=path)
            return path
    for path in SYSTEM_CA_DIRS:
        if os.path.isdir(path) and any(
            name.endswith(".0") for name in os.listdir(path)
        ):  # hashed links made by c_rehash / update-ca-certificates
            ctx.load_verify_locations(capath=path)
            return path
    ctx.load_default_certs()
    if ctx.cert_store_stats()["x509_ca"]:
        return "OpenSSL's default paths"
    raise FileNotFoundError(
        "no system CA bundle found (looked in "
        + ", ".join(SYSTEM_CA_FILES + SYSTEM_CA_DIRS)
        + "): install the OS's ca-certificates package or set ca_file"
    )


class TlsFileError(ConfigError):
    """A TLS file that cannot be loaded; ``path`` is the key that names it (``ca_file``)."""


def client_context(
    ca_file: Path | str | None = None,
    *,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
    verify_hostname: bool = True,
    verify_certificate: bool = True,
) -> ssl.SSLContext:
    """A TLS client context: the server is verified against ``ca_file``, or the OS trust
    store without it; ``cert_file`` and ``key_file`` (PEM) are presented for mutual TLS.

    ``verify_hostname = False`` still checks the chain; ``verify_certificate = False``
    checks nothing (a lab's self-signed broker). Raises TlsFileError naming the key of the
    file that failed, or FileNotFoundError when the OS has no trust store.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(
                "ca_file",
                f"cannot load {ca_file}: {getattr(exc, 'strerror', None) or exc} "
                "(point it to a PEM CA bundle)",
            ) from exc
    else:
        load_system_trust(ctx)
    if cert_file is not None and key_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(
                "cert_file",
                f"cannot load {cert_file} with key {key_file}: "
                f"{getattr(exc, 'strerror', None) or exc} "
                "(PEM certificate and its unencrypted PEM key)",
            ) from exc
    if not verify_hostname or not verify_certificate:
        ctx.check_hostname = False
    if not verify_certificate:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class LegacyKey:
    """An adapter's old name of a TLS option: the new key, and whether the boolean flips
    (``insecure_skip_verify = true`` is ``verify_hostname = false``)."""

    new: str
    inverted: bool = False

    def translate(self, value: Any) -> Any:
        return not value if self.inverted and isinstance(value, bool) else value

    def advice(self, old: str, value: Any, where: str = "") -> str:
        """The one warning line: the old key path, the new one, what to write."""
        if self.inverted and isinstance(value, bool):
            write = f"{where}{self.new} = {str(not value).lower()}"
        else:
            write = f"{where}{self.new}"
        return f"{where}{old} is deprecated: write {write} instead"


def deprecation_sink(info: ValidationInfo) -> tuple[str, list[str] | None]:
    """Where a model validated by agent.config reports its deprecations: the key path of
    its table and the list the loader logs and `config check` prints (None: log here)."""
    context = info.context if isinstance(info.context, dict) else {}
    path = str(context.get("path") or "")
    notes = context.get("deprecations")
    return (f"{path}." if path else ""), notes if isinstance(notes, list) else None


class TlsOptions(Model):
    """The TLS client options, flat in the adapter's table; a mixin of its config model."""

    #: CA bundle (PEM) that the server's certificate must chain to; the OS trust store
    #: when unset
    ca_file: Path | None = None
    #: client certificate (PEM, chain allowed) and its unencrypted PEM key, for mutual TLS
    cert_file: Path | None = None
    key_file: Path | None = None
    #: check that the certificate names the host in url (the chain is still checked)
    verify_hostname: bool = True
    #: check the server's certificate at all; false only for a lab (no host check either)
    verify_certificate: bool = True

    #: old key -> its new name, per adapter (each still accepted, with a warning)
    legacy_tls_keys: ClassVar[dict[str, LegacyKey]] = {}

    @model_validator(mode="before")
    @classmethod
    def _legacy_tls(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not any(k in data for k in cls.legacy_tls_keys):
            return data
        where, notes = deprecation_sink(info)
        data = dict(data)
        for old, key in cls.legacy_tls_keys.items():
            if old not in data:
                continue
            if key.new in data:
                raise ValueError(
                    f"{key.new}: also set as {where}{old}, its old name; keep only {key.new}"
                )
            value = data.pop(old)
            data[key.new] = key.translate(value)
            line = key.advice(old, value, where)
            if notes is None:
                log.warning("%s", line)
            else:
                notes.append(line)
        return data

    @model_validator(mode="after")
    def _tls_pair(self) -> TlsOptions:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ValueError(f"{missing}: cert_file and key_file go together (mutual TLS)")
        return self

    @property
    def tls_files(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None

    @property
    def tls_verification_off(self) -> bool:
        return not (self.verify_hostname and self.verify_certificate)

    def tls_context(self) -> ssl.SSLContext:
        """This config's client context (see client_context)."""
        return client_context(
            self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            verify_hostname=self.verify_hostname,
            verify_certificate=self.verify_certificate,
        )

    def tls_preflight(self, check: Check) -> None:
        """The TLS files run opens, checked the way run loads them, under their keys."""
        check.ca_bundle("ca_file", self.ca_file)
        check.cert_and_key("cert_file", self.cert_file, "key_file", self.key_file)

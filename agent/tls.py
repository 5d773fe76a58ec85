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
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

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


def client_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """A verifying TLS client context trusting ``ca_file``, or the OS trust store without it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        load_system_trust(ctx)
    return ctx

"""The built binaries trust the OS's CA store wherever the OS keeps it (no ``ca_file``).

Each run is the real binary (one-file and one-folder) in a private mount namespace whose
/etc is a copy-on-write overlay of the host's: /etc/ssl and /etc/pki are emptied there and
the gateway's CA is put at one distribution's location only, so the host's files are never
touched. The agent then forwards over HTTPS to the reference gateway (trustme CA): it must
deliver with the CA at the RHEL path and at the Debian path, and refuse with a wrong CA.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.packaging import require_tool

RHEL = "/etc/pki/tls/certs/ca-bundle.crt"
DEBIAN = "/etc/ssl/certs/ca-certificates.crt"

# Inside the namespace: overlay /etc, drop every trust store, plant the CA at $2, run $3...
NAMESPACE_SCRIPT = r"""
set -e
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1/upper,workdir=$1/work" /etc
rm -rf /etc/ssl /etc/pki
mkdir -p "$(dirname "$2")"
cp "$1/ca.pem" "$2"
shift 2
exec env -u SSL_CERT_FILE -u SSL_CERT_DIR "$@"
"""


def _agent_config(tmp_path: Path, gw: GatewayProcess) -> Path:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(
        f"""
[agent]
id = "trust-store-test"
plant = "testplant"

[buffer]
path = "{tmp_path / "buffer.db"}"

[metrics]
enabled = false

[sinks.central]
type = "https"
url = "{gw.url}"

[sources.sim]
type = "simulator"
rate = 20.0
""",
        encoding="utf-8",
    )
    return cfg


def _run_in_namespace(
    exe: Path,
    gw: GatewayProcess,
    ca_pem: bytes,
    location: str,
    tmp_path: Path,
    until: Callable[[str], bool],
) -> str:
    """Run the agent with the CA only at ``location``; stop it once ``until(log)`` holds
    (or after 120 s); return its log."""
    require_tool("unshare", "apt-get install util-linux")
    assert os.geteuid() == 0, "needs root for a mount namespace (unshare -m)"
    ns = tmp_path / "ns"
    for d in ("upper", "work"):
        (ns / d).mkdir(parents=True)
    (ns / "ca.pem").write_bytes(ca_pem)
    cfg = _agent_config(tmp_path, gw)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        # no --fork: sh exec's into the agent, so this PID is the agent and gets SIGTERM
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT]
            + ["sh", str(ns), location, str(exe), "run", "-c", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if until(log_path.read_text(errors="replace")):
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return log_path.read_text(errors="replace")


@pytest.mark.parametrize("location", [RHEL, DEBIAN], ids=["rhel", "debian"])
def test_os_trust_store_verifies_the_gateway(
    built_exe: Path,
    location: str,
    gateway: Callable[..., GatewayProcess],
    tls_ca: trustme.CA,
    tmp_path: Path,
) -> None:
    gw = gateway()
    log = _run_in_namespace(
        built_exe,
        gw,
        tls_ca.cert_pem.bytes(),
        location,
        tmp_path,
        until=lambda _log: gw._received(None) >= 20,  # noqa: SLF001
    )
    assert gw._received(None) >= 20, f"nothing verified with the CA at {location}:\n{log[-4000:]}"  # noqa: SLF001
    assert "CERTIFICATE_VERIFY_FAILED" not in log


def test_a_wrong_ca_at_the_os_location_fails_verification(
    built_exe: Path, gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gw = gateway()
    log = _run_in_namespace(
        built_exe,
        gw,
        trustme.CA().cert_pem.bytes(),
        RHEL,
        tmp_path,
        until=lambda text: "CERTIFICATE_VERIFY_FAILED" in text,
    )
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-4000:]
    assert "TLS verification of" in log, log[-4000:]
    assert gw._received(None) == 0  # noqa: SLF001

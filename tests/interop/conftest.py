"""The node-opcua sample server (an independent OPC UA implementation) for interop tests.

Installed by ``tests/interop/ensure_node_opcua.py`` (the test command runs it before pytest).
Started once per session: bound to 127.0.0.1 by a ``node -r`` preload (it has no host
option), with its PKI under the session's temp dir (XDG_CONFIG_HOME). A missing install is a
FAILURE with the command to run, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.opcua_server import free_port
from tests.interop.sparkplug_peers import tahu  # noqa: F401  (the Tahu edge node fixture)

HERE = Path(__file__).resolve().parent
SERVER = HERE / "node_modules" / "node-opcua-samples" / "bin" / "simple_server.cjs"

collect_ignore_glob = ["node_modules/*"]


@dataclass
class NodeOpcUaServer:
    endpoint: str
    pki: Path
    proc: subprocess.Popen[bytes]

    @property
    def certificate(self) -> Path:
        return self.pki / "server_certificate1.pem"

    @property
    def namespace(self) -> str:
        return f"urn:{socket.gethostname()}:NodeOPCUA-Server"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not SERVER.is_file():
        pytest.fail(
            "node-opcua sample server is not installed: run "
            "`python tests/interop/ensure_node_opcua.py` (needs Node.js 18+ and npm; "
            "Debian: apt-get install -y nodejs npm)",
            pytrace=False,
        )
    return node


def pki_of(home: Path) -> Path:
    """The sample server's PKI under XDG_CONFIG_HOME=home."""
    return home / "NodeOPCUA-Server-nodejs" / "PKI"


def seed_certificate(home: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Give the sample server our certificate (leaf, then its CAs) and key.

    The sample server makes a self-signed certificate only when PKI/server_certificate1.pem
    is missing, and its certificate manager keeps the key in PKI/own/private/private_key.pem:
    both are put there before it starts."""
    pki = pki_of(home)
    (pki / "own" / "private").mkdir(parents=True, exist_ok=True)
    (pki / "server_certificate1.pem").write_bytes(cert_pem)
    (pki / "own" / "private" / "private_key.pem").write_bytes(key_pem)


def start_node_opcua(home: Path) -> NodeOpcUaServer:
    """Start a sample server with its config (and PKI) under ``home``; wait until it listens."""
    node = _node()
    port = free_port()
    log = home / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                node,
                "-r",
                str(HERE / "listen_loopback.cjs"),
                str(SERVER),
                "-p",
                str(port),
                "--silent",
            ],
            cwd=HERE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "XDG_CONFIG_HOME": str(home)},
        )
    try:
        deadline = time.monotonic() + 90
        while "waiting for connections" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"node-opcua sample server did not start (exit {proc.poll()}):\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return NodeOpcUaServer(f"opc.tcp://127.0.0.1:{port}", pki_of(home), proc)


def stop_node_opcua(srv: NodeOpcUaServer) -> None:
    srv.proc.kill()
    srv.proc.wait(10)


@pytest.fixture(scope="session")
def node_opcua_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeOpcUaServer]:
    srv = start_node_opcua(tmp_path_factory.mktemp("node-opcua"))
    try:
        yield srv
    finally:
        stop_node_opcua(srv)

#!/usr/bin/env python3
"""Install the node-opcua sample server into tests/interop/node_modules, once.

The interop tests run the OPC UA source against an independent implementation (the
node-opcua sample server from the npm registry). The test command calls this script before
pytest; it is idempotent and returns at once when the pinned install is already there.

Pinning: a plain `npm i node-opcua-samples@2.186.1` fails (ETARGET) because the registry
lacks node-opcua-address-space@2.186.1; package.json's `overrides` pin the packages that
do exist (2.186.4, node-opcua-server-configuration 2.157.0) and package-lock.json fixes
the whole tree. An engine warning on Node 20 is harmless.

Exit status 0 when ready; 1 with instructions when node or npm is missing or npm fails.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER = HERE / "node_modules" / "node-opcua-samples" / "bin" / "simple_server.cjs"
MARKER = HERE / "node_modules" / ".edge-agent-install"

INSTALL_HELP = (
    "the OPC UA interop tests need Node.js (18 or newer) and npm: install them "
    "(Debian/Ubuntu: apt-get install -y nodejs npm), then run: "
    "python tests/interop/ensure_node_opcua.py"
)


def fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        p = HERE / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()


def installed() -> bool:
    return SERVER.is_file() and MARKER.is_file() and MARKER.read_text().strip() == fingerprint()


def ensure() -> int:
    if installed():
        return 0
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        print(
            f"ensure_node_opcua: {'npm' if npm is None else 'node'} not found; {INSTALL_HELP}",
            file=sys.stderr,
        )
        return 1
    lock = (HERE / "package-lock.json").exists()
    cmd = [npm, "ci" if lock else "install", "--no-audit", "--no-fund", "--loglevel=error"]
    print(f"ensure_node_opcua: {' '.join(cmd[1:])} in {HERE} (about 30 s, 200 MB)", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not SERVER.is_file():
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        print(
            f"ensure_node_opcua: npm failed with exit status {proc.returncode} "
            "(is the npm registry reachable? run the command above by hand to see why)",
            file=sys.stderr,
        )
        return 1
    MARKER.write_text(fingerprint() + "\n")
    print(f"ensure_node_opcua: installed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(ensure())

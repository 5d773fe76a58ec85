#!/usr/bin/env python3
"""Install Eclipse Tahu's JavaScript Sparkplug client into tests/interop/sparkplug, once.

The Sparkplug interop tests drive an edge node built on ``sparkplug-client`` (npm, pinned
by package.json and package-lock.json beside edge_node.cjs). The test command calls this
script before pytest; it is idempotent and returns at once when the pinned install is there.

Exit status 0 when ready; 1 with instructions when node or npm is missing or npm fails.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "sparkplug"
SERVER = HERE / "node_modules" / "sparkplug-client" / "index.js"
MARKER = HERE / "node_modules" / ".edge-agent-install"

INSTALL_HELP = (
    "the Sparkplug interop tests need Node.js (18 or newer) and npm: install them "
    "(Debian/Ubuntu: apt-get install -y nodejs npm), then run: "
    "python tests/interop/ensure_sparkplug_client.py"
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
            f"ensure_sparkplug_client: {'npm' if npm is None else 'node'} not found; {INSTALL_HELP}",
            file=sys.stderr,
        )
        return 1
    lock = (HERE / "package-lock.json").exists()
    cmd = [npm, "ci" if lock else "install", "--no-audit", "--no-fund", "--loglevel=error"]
    print(f"ensure_sparkplug_client: {' '.join(cmd[1:])} in {HERE} (about 30 s, 10 MB)", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not SERVER.is_file():
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        print(
            f"ensure_sparkplug_client: npm failed with exit status {proc.returncode} "
            "(is the npm registry reachable? run the command above by hand to see why)",
            file=sys.stderr,
        )
        return 1
    MARKER.write_text(fingerprint() + "\n")
    print(f"ensure_sparkplug_client: installed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(ensure())

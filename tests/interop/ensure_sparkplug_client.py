#!/usr/bin/env python3
"""Install the two Sparkplug edge node implementations of the interop tests, once.

* Eclipse Tahu's JavaScript client ``sparkplug-client`` (npm, pinned by package.json and
  package-lock.json beside edge_node.cjs) into tests/interop/sparkplug/node_modules;
* ``mqtt-spb-wrapper`` (PyPI, pinned below) into its own venv tests/interop/sparkplug/.venv:
  it pins paho-mqtt 1.6.1 and protobuf 3.20.3, which cannot share the agent's venv.

The test command calls this script before pytest; it is idempotent and returns at once
when the pinned installs are there.

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


SPB_WRAPPER = "mqtt-spb-wrapper==2.1.2"
PYVENV = HERE / ".venv"
PY_MARKER = PYVENV / ".edge-agent-install"


def ensure_spb_wrapper() -> int:
    if PY_MARKER.is_file() and PY_MARKER.read_text().strip() == SPB_WRAPPER:
        return 0
    print(f"ensure_sparkplug_client: installing {SPB_WRAPPER} into {PYVENV}", flush=True)
    for cmd in (
        [sys.executable, "-m", "venv", "--clear", str(PYVENV)],
        [str(PYVENV / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", SPB_WRAPPER],
    ):  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            print(
                f"ensure_sparkplug_client: {' '.join(cmd)} failed ({proc.returncode}); "
                "is PyPI reachable? (Debian: apt-get install -y python3-venv)",
                file=sys.stderr,
            )
            return 1
    PY_MARKER.write_text(SPB_WRAPPER + "\n")
    return 0


def ensure() -> int:
    if ensure_spb_wrapper() != 0:
        return 1
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

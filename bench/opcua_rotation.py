"""OPC UA end to end, base against head, in one sitting: ONE asyncua server, clients in turn.

``python -m bench.opcua_rotation BASE_TREE [--items N] [--seconds S] [--rounds R]``: starts
bench/opcua_server.py (N items at 1 Hz, default 10,000) once, then per round runs
bench/opcua_client.py as ``bare``, as ``agent`` from BASE_TREE (a checkout of the base
revision, e.g. ``git archive REV | tar -x -C DIR``: its agent/ and adapters/ are imported,
the harness is this one's) and as ``agent`` from this checkout, one after the other. Prints
every run and, per side, the median and range of the CPU multiple of the bare client of the
same round, by CPU fraction and per notification. The per-notification reading is the one
to go by on a shared machine: the server (about a core for 10,000 writes/s) does not
produce the same rate for every client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.opcua_rotation", description=__doc__)
    p.add_argument("base", type=Path, help="a checkout of the base revision")
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    from tests.fixtures.mosquitto import free_port

    harness = Path(tempfile.mkdtemp(prefix="opcua-rotation-"))
    shutil.copytree(REPO / "bench", harness / "bench")  # the same client code for both
    port = free_port()
    log = open(harness / "server.log", "wb")  # noqa: SIM115 - open for the server's life
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.opcua_server", str(port), str(a.items)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    sides = {"bare": REPO, "base": a.base.resolve(), "head": REPO}
    res: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    try:
        assert server.stdout is not None
        if b"READY" not in server.stdout.readline():
            raise SystemExit("the OPC UA server did not start")
        time.sleep(2)
        for rnd in range(a.rounds):
            for side, tree in sides.items():
                mode = "bare" if side == "bare" else "agent"
                out = subprocess.run(
                    [sys.executable, "-m", "bench.opcua_client", str(port), str(a.items), mode]
                    + [str(a.seconds)],
                    cwd=harness,  # bench/ from the harness, agent/ and adapters/ from tree
                    env={**os.environ, "PYTHONPATH": f"{harness}:{tree}"},
                    capture_output=True,
                    check=True,
                    timeout=900,
                ).stdout
                run = json.loads(out.decode().strip().splitlines()[-1])
                run["us_per_notification"] = run["cpu"] / run["rate"] * 1e6 if run["rate"] else 0
                res[side].append(run)
                print(rnd, side, json.dumps(run), flush=True)
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(harness, ignore_errors=True)
    bare = res["bare"]
    for side in ("base", "head"):
        cpu = [r["cpu"] / b["cpu"] for r, b in zip(res[side], bare, strict=True) if b["cpu"]]
        per = [
            r["us_per_notification"] / b["us_per_notification"]
            for r, b in zip(res[side], bare, strict=True)
            if r["rate"] and b["rate"]
        ]
        for name, m in (("cpu multiple", cpu), ("per-notification multiple", per)):
            if m:
                print(
                    f"{side} {name}: median {statistics.median(m):.2f} "
                    f"(range {min(m):.2f}-{max(m):.2f}; runs {[round(x, 2) for x in m]})"
                )


if __name__ == "__main__":
    main()

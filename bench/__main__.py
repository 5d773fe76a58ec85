"""``python -m bench [--quick] [--only NAME ...]``: run the figures, write the results."""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import REPO, Ctx, kill_children
from bench.report import write_report

#: in priority order; each is bench/<name>.py with run(ctx) -> {figure name: figure}
FIGURES = [
    "ingest",
    "drain_https",
    "drain_mqtt",
    "drain_nats",
    "push",
    "latency",
    "memory",
    "disk",
    "outage",
    "opcua",
    "opcua_ceiling",
    "peers",
    "sparkplug",
    "gateway",
]
#: figures only ``--only NAME`` runs (too long for the default run): bench/scale.py's 10M
#: backlog alone takes about ten minutes
OPTIONAL = ["scale"]


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of a figure: for each ratio figure the run with the
    median ratio (or the median value, for a figure with ``median_by="value"``; value, raw
    and detail stay consistent), plus every run's ratio and the spread, and every run's
    value; anything else from the last run."""
    out = dict(rounds[-1])
    if len(rounds) < 2:
        return out
    for key, last in rounds[-1].items():
        if key.startswith("_") or not isinstance(last, dict) or "ratio" not in last:
            continue
        runs = [r[key] for r in rounds if "ratio" in r.get(key, {})]
        ratios = [f["ratio"] for f in runs]
        # a figure whose target is an absolute rate (the gateway's) says median_by="value"
        by = last.get("median_by", "ratio")
        mid = statistics.median_low([f[by] for f in runs])
        chosen = dict(next(f for f in runs if f[by] == mid))
        chosen["ratio_runs"] = ratios
        chosen["ratio_spread"] = [min(ratios), max(ratios)]
        chosen["value_runs"] = [f["value"] for f in runs]
        out[key] = chosen
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller loads: a few minutes")
    p.add_argument(
        "--only", action="append", choices=FIGURES + OPTIONAL, help="run only this figure"
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each figure N times; a ratio figure reports the run with the median ratio "
        "and the spread of all (issue 16: 3)",
    )
    args = p.parse_args()
    names = args.only or FIGURES
    atexit.register(kill_children)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    ctx = Ctx(work, args.quick)
    results_path = REPO / "bench" / "results.json"
    try:
        old = json.loads(results_path.read_text())
    except (OSError, ValueError):
        old = {}
    figures = dict(old.get("figures", {}))
    runs = dict(old.get("runs", {}))
    cmd = (
        "python -m bench"
        + (" --quick" if args.quick else "")
        + "".join(f" --only {n}" for n in args.only or [])
        + (f" --rounds {args.rounds}" if args.rounds != 1 else "")
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    failed = []
    for name in names:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        rounds: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            # a fresh scratch directory per round (figures fill their buffers anew)
            rctx = Ctx(work / f"round{rnd + 1}", args.quick, ctx.results)
            try:
                mod = importlib.import_module(f"bench.{name}")
                rounds.append(mod.run(rctx))
            except Exception as exc:  # one broken figure must not hide the others
                traceback.print_exc()
                failed.append(name)
                rounds = [{name: {"error": f"{type(exc).__name__}: {exc}"}}]
                break
            finally:
                kill_children()
                if not args.keep:
                    shutil.rmtree(rctx.workdir, ignore_errors=True)
        res = median_of(rounds)
        ctx.results.update(res)
        for k, v in res.items():
            if k.startswith("_"):
                continue
            v = dict(v)
            v["command"] = cmd
            v["measured_at"] = stamp
            v["seconds"] = round(time.monotonic() - t0, 1)
            figures[k] = v
            print(f"   {k}: {json.dumps(v)}", flush=True)
        runs[name] = {"command": cmd, "at": stamp, "quick": args.quick}
        # written after every figure: a long run that dies keeps what it measured
        out = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "figures": figures,
            "runs": runs,
        }
        results_path.write_text(json.dumps(out, indent=2) + "\n")
        write_report(out)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

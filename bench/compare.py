"""``python -m bench.compare --base REV --head REV [--only NAME ...] [--rounds 3] [--quick]``

Compare two revisions on the ratio figures, measured by one ruler in one run:

* both revisions are checked out into temporary git worktrees (``git worktree add
  --detach``, removed at the end);
* the harness (bench/ and tests/fixtures/: raw clients, counting receiver, broker and
  gateway launchers) is copied once from THIS checkout, so both sides are measured by the
  same code; the reference gateway runs from this checkout too (bench/gateway_host.py);
* each run is a subprocess (in this process group) with ``PYTHONPATH=<harness>:<worktree>``,
  so it imports that revision's agent/ and adapters/ through their public entry points
  (``agent.buffer.Buffer``, the forwarder, ``python -m agent run``);
* runs alternate base, head, base, head, ... ``--rounds`` times each, figure by figure, so a
  machine that drifts moves both sides alike.

Per figure it reports the median ratio (to the raw limit measured in the same run) of each
side, the spread (min-max), the head/base change in percent and a verdict: "within noise"
when the two ranges overlap or the change is no larger than the spread, else "regression"
or "improvement". A table goes to stdout, everything (every run's figures too) to
``--out`` (default bench/compare.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: the figures whose ratios a comparison makes sense of (each is bench/<name>.py)
NAMES = ["ingest", "drain_https", "drain_mqtt"]
#: a single run of one figure may take this long at full size before it counts as hung
RUN_TIMEOUT = 1800


def git(*args: str) -> str:
    p = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout.strip()


def stop(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM first, so the run stops the peers it started (receivers, broker, gateway,
    agent); SIGKILL if it does not end in 30 s."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def copy_harness(dst: Path) -> None:
    """bench/ and tests/fixtures/ of this checkout, without agent/ or adapters/."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results.json", "compare.json")
    shutil.copytree(REPO / "bench", dst / "bench", ignore=skip)
    (dst / "tests").mkdir()
    shutil.copy(REPO / "tests" / "__init__.py", dst / "tests" / "__init__.py")
    shutil.copytree(REPO / "tests" / "fixtures", dst / "tests" / "fixtures", ignore=skip)


def summarize(ratios: list[float]) -> dict[str, Any]:
    return {
        "ratios": ratios,
        "median": round(statistics.median(ratios), 3),
        "min": min(ratios),
        "max": max(ratios),
    }


def verdict(base: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """Change of the medians, the spread (the wider side's max-min, in percent of its own
    median) and the verdict."""
    mb, mh = base["median"], head["median"]
    change = (mh / mb - 1) * 100 if mb else 0.0
    spread = max(
        (s["max"] - s["min"]) / s["median"] * 100 if s["median"] else 0.0 for s in (base, head)
    )
    overlap = base["min"] <= head["max"] and head["min"] <= base["max"]
    if len(base["ratios"]) < 2 or len(head["ratios"]) < 2:
        word = "unknown: one run has no spread"
    elif overlap or abs(change) <= spread:
        word = "within noise"
    else:
        word = "regression" if change < 0 else "improvement"
    return {
        "change_percent": round(change, 1),
        "spread_percent": round(spread, 1),
        "ranges_overlap": overlap,
        "verdict": word,
    }


def table(figures: dict[str, Any]) -> str:
    rows = [("figure", "base ratio (min-max)", "head ratio (min-max)", "change", "spread", "")]
    for key, f in figures.items():
        if "verdict" not in f:
            rows.append((key, f.get("error", "not measured"), "", "", "", ""))
            continue
        b, h = f["base"], f["head"]
        rows.append(
            (
                key,
                f"{b['median']:.3f} ({b['min']:.3f}-{b['max']:.3f})",
                f"{h['median']:.3f} ({h['min']:.3f}-{h['max']:.3f})",
                f"{f['change_percent']:+.1f}%",
                f"{f['spread_percent']:.1f}%",
                f["verdict"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="revision before (branch, tag, commit)")
    p.add_argument("--head", required=True, help="revision after")
    p.add_argument("--only", action="append", choices=NAMES, help="this figure only (repeat)")
    p.add_argument("--rounds", type=int, default=3, help="runs per revision and figure")
    p.add_argument("--quick", action="store_true", help="the figures' small loads")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "compare.json")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (run logs)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    names = args.only or NAMES
    sides = {
        "base": {"rev": args.base, "commit": git("rev-parse", "--verify", args.base + "^{commit}")},
        "head": {"rev": args.head, "commit": git("rev-parse", "--verify", args.head + "^{commit}")},
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-compare-"))
    harness, logs = tmp / "harness", tmp / "logs"
    logs.mkdir()
    copy_harness(harness)
    worktrees: list[Path] = []
    child: subprocess.Popen[bytes] | None = None
    runs: list[dict[str, Any]] = []
    t_all = time.monotonic()
    try:
        for side, info in sides.items():
            wt = tmp / side
            git("worktree", "add", "--detach", str(wt), info["commit"])
            worktrees.append(wt)
            info["worktree"] = str(wt)
        print(
            f"base {args.base} = {sides['base']['commit'][:12]}, "
            f"head {args.head} = {sides['head']['commit'][:12]}; "
            f"{args.rounds} round(s) of {', '.join(names)}{' (quick)' if args.quick else ''}",
            flush=True,
        )
        for rnd in range(1, args.rounds + 1):
            for name in names:
                for side, info in sides.items():
                    out = logs / f"{name}-{side}-{rnd}.json"
                    log = logs / f"{name}-{side}-{rnd}.log"
                    env = dict(os.environ)
                    env["PYTHONPATH"] = os.pathsep.join([str(harness), info["worktree"]])
                    env["EDGE_BENCH_HARNESS"] = str(REPO)
                    env["EDGE_BENCH_REVISION"] = info["worktree"]
                    cmd = [sys.executable, "-m", "bench.compare_run", name, str(out)]
                    cmd += ["--quick"] if args.quick else []
                    t = time.monotonic()
                    with open(log, "wb") as f:
                        child = subprocess.Popen(cmd, cwd=harness, env=env, stdout=f, stderr=f)
                        try:
                            rc = child.wait(RUN_TIMEOUT)
                        except subprocess.TimeoutExpired:
                            stop(child)
                            rc = -15
                        child = None
                    try:
                        res = json.loads(out.read_text())
                    except (OSError, ValueError):
                        res = {"_error": f"exit {rc}, no result; log: {log}"}
                    if rc != 0 and "_error" not in res:
                        res["_error"] = f"exit {rc}; log: {log}"
                    run = {
                        "round": rnd,
                        "figure": name,
                        "side": side,
                        "seconds": round(time.monotonic() - t, 1),
                        "figures": {k: v for k, v in res.items() if not k.startswith("_")},
                    }
                    if "_error" in res:
                        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                        run["error"] = res["_error"]
                        print(f"   {name} {side} round {rnd}: FAILED {res['_error']}\n{tail}")
                    runs.append(run)
                    got = ", ".join(
                        f"{k} {v['ratio']:.3f}" for k, v in run["figures"].items() if "ratio" in v
                    )
                    print(f"   round {rnd} {name} {side}: {got} ({run['seconds']} s)", flush=True)
    finally:
        if child is not None:
            stop(child)
        for wt in worktrees:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)],
                capture_output=True,
            )
        with contextlib.suppress(Exception):
            git("worktree", "prune")
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    figures: dict[str, Any] = {}
    for run in runs:
        for key, fig in run["figures"].items():
            if "ratio" not in fig:
                continue
            f = figures.setdefault(key, {"base": [], "head": [], "raw_label": fig["raw_label"]})
            f[run["side"]].append(fig)
    for f in figures.values():
        if not f["base"] or not f["head"]:
            f["error"] = "measured on one side only (see the runs' errors)"
            f["base"] = summarize([x["ratio"] for x in f["base"]]) if f["base"] else {}
            f["head"] = summarize([x["ratio"] for x in f["head"]]) if f["head"] else {}
            continue
        for side in ("base", "head"):
            figs = f[side]
            f[side] = summarize([x["ratio"] for x in figs])
            f[side]["values"] = [x["value"] for x in figs]
            f[side]["raws"] = [x["raw"] for x in figs]
        f.update(verdict(f["base"], f["head"]))
    cmd = (
        f"python -m bench.compare --base {args.base} --head {args.head}"
        + "".join(f" --only {n}" for n in args.only or [])
        + f" --rounds {args.rounds}"
        + (" --quick" if args.quick else "")
    )
    result = {
        "command": cmd,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - t_all, 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "base": {k: v for k, v in sides["base"].items() if k != "worktree"},
        "head": {k: v for k, v in sides["head"].items() if k != "worktree"},
        "rounds": args.rounds,
        "quick": args.quick,
        "figures": figures,
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(figures))
    if args.rounds < 3:
        print(f"\n{args.rounds} round(s): the spread needs 3 or more to mean anything")
    print(f"\n{cmd}: {result['seconds']:.0f} s; written to {args.out}")
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

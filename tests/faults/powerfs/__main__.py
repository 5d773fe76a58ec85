"""The long power-cut campaign: ``python -m tests.faults.powerfs --cuts 100``.

Prints one summary line per durability setting and exits 1 if any run failed (the failures
follow, each naming its cut; rerun with ``--seed`` to replay the same moments).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.faults.powerfs.campaign import Campaign


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.faults.powerfs", description=__doc__)
    ap.add_argument("--cuts", type=int, default=100)
    ap.add_argument("--durability", choices=["fsync", "os", "both"], default="both")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--names", choices=["posix", "ordered"], default="posix")
    ap.add_argument("--crash", choices=["lose", "reorder"], default="lose")
    ap.add_argument("--tear", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run's files here")
    args = ap.parse_args()
    modes = ["fsync", "os"] if args.durability == "both" else [args.durability]
    failed = False
    for mode in modes:
        base = args.workdir or Path(tempfile.mkdtemp(prefix="powerfs-"))
        work = base / mode
        work.mkdir(parents=True, exist_ok=True)
        result = Campaign(
            work, durability=mode, cuts=args.cuts, seed=args.seed, names=args.names,
            crash=args.crash, tear=args.tear,
        ).run()  # fmt: skip
        print(result.summary(), flush=True)
        print(f"  files in {work}; filesystem: {result.fs}", flush=True)
        for f in result.failures:
            failed = True
            print(f"  FAILURE: {f}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

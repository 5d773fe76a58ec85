"""One run of one figure for ``python -m bench.compare`` (never called by hand).

``python -m bench.compare_run NAME OUT.json [--quick]``, started by bench/compare.py with
``PYTHONPATH=<harness copy>:<revision worktree>``: the harness (bench/, tests/fixtures/) from
the copy, agent/ and adapters/ from the revision. Checks that the imports really come from
there, runs bench/<NAME>.py and writes its figures as JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


def main() -> int:
    name, out = sys.argv[1], Path(sys.argv[2])
    quick = "--quick" in sys.argv[3:]
    # bench.compare stops a hung run with SIGTERM: unwind, so the peers are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import adapters
    import agent
    from bench.common import Ctx, kill_children

    want = Path(os.environ["EDGE_BENCH_REVISION"]).resolve()
    for mod in (agent, adapters):
        got = Path(mod.__file__ or "").resolve()
        if want not in got.parents:
            raise SystemExit(f"{mod.__name__} imported from {got}, not from {want}")
    work = Path(tempfile.mkdtemp(prefix="edge-bench-cmp-"))
    t0 = time.monotonic()
    try:
        res = importlib.import_module(f"bench.{name}").run(Ctx(work, quick))
        res = {k: v for k, v in res.items() if not k.startswith("_")}
        rc = 0
    except Exception as exc:
        traceback.print_exc()
        res, rc = {"_error": f"{type(exc).__name__}: {exc}"}, 1
    finally:
        kill_children()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    res["_seconds"] = round(time.monotonic() - t0, 1)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.gateway_host WORKDIR``: the reference gateway for a drain figure, run
from the harness checkout (``EDGE_BENCH_HARNESS``), not from the revision being measured.

A comparison of two revisions measures both against the same gateway, even when one of them
moves or changes the gateway's code. Prints one JSON line (url, ca_file, db_path) once the
gateway listens; then reads commands on stdin: ``count STREAM`` prints the events stored
for that stream; ``stop`` or end of input stops the gateway.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    from tests.fixtures.gateway import GatewayProcess, received_count

    gw = GatewayProcess(Path(sys.argv[1]), tls=True, control=False).start()
    try:
        print(
            json.dumps({"url": gw.url, "ca_file": str(gw.ca_file), "db_path": str(gw.db_path)}),
            flush=True,
        )
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "stop":
                break
            if cmd[0] == "count":
                print(received_count(gw.db_path, cmd[1]), flush=True)
    finally:
        gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How many log lines a real gateway outage costs (issue 10, item 5): not a speed figure, so
not one of ``python -m bench``'s figures; run it on its own:

    .venv/bin/python -m bench.outage_log_lines --outage 600 [--interval 60] [--streams 2]

The real agent as a subprocess (JSON logs on stderr, to a file), two simulated streams into
the one HTTPS sink, the reference gateway really stopped for ``--outage`` seconds and then
started again. It prints every line the agent logged from the stop to the recovery line,
and the count. ``--interval`` sets the outage summary interval (default: the agent's own,
60 s; EDGE_AGENT_LOG_SUMMARY_INTERVAL) to scale a long outage down.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path


def main() -> None:
    from tests.fixtures.common import AgentProcess, agent_config, https_sink
    from tests.fixtures.gateway import GatewayProcess

    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=600.0)
    ap.add_argument("--interval", type=float, default=None)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--backoff-max", type=float, default=15.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-agent-outage-") as tmp:
        d = Path(tmp)
        gw = GatewayProcess(d / "gw").start()
        sources = {
            f"s{i}": {"type": "simulator", "rate": 10, "seed": i, "stream": f"line{i}"}
            for i in range(1, args.streams + 1)
        }
        cfg = agent_config(d / "agent", sinks={"central": https_sink(gw)}, sources=sources,
                           forwarder={"backoff_initial": 0.5, "backoff_max": args.backoff_max})  # fmt: skip
        env = (
            {} if args.interval is None else {"EDGE_AGENT_LOG_SUMMARY_INTERVAL": str(args.interval)}
        )
        agent = AgentProcess(d / "agent", cfg, env=env)
        try:
            agent.start()
            gw.wait_received(20 * args.streams, timeout=60)
            time.sleep(2)
            down = time.time()
            gw.stop()
            time.sleep(args.outage)
            gw.start()
            deadline = time.monotonic() + 120
            while not any(
                "delivering again" in line and _ts(line) >= down
                for line in agent.log_path.read_text().splitlines()
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the agent never said it recovered:\n" + agent.log()[-3000:])
                time.sleep(0.5)
            up = time.time()
            agent.stop()
        finally:
            agent.kill()
            gw.stop()
        lines = [x for x in agent.log().splitlines() if x.startswith("{") and down <= _ts(x) <= up]
        for x in lines:
            doc = json.loads(x)
            print(f"{doc['ts']} {doc['level']:<7} {doc['logger']}: {doc['msg']}")
        retries = re.findall(r"\(([\d,]+) retries\)", "\n".join(lines))
        print(
            f"outage {up - down:.0f} s (gateway stopped {args.outage:g} s), summary interval "
            f"{args.interval or 60:g} s, {args.streams} stream(s) to one sink: {len(lines)} log "
            f"lines, {retries[-1] if retries else '?'} retries"
        )


def _ts(line: str) -> float:
    try:
        return datetime.fromisoformat(json.loads(line)["ts"]).timestamp()
    except (ValueError, KeyError):
        return 0.0


if __name__ == "__main__":
    main()

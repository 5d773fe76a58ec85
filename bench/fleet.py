"""A fleet of 100 agents against one mosquitto and one 3-node JetStream cluster.

``python -m bench.fleet [--agents 100] [--workers 4] [--rate 50]`` (not part of the test
suite, nor of ``python -m bench``: it takes a few minutes and saturates this machine).

What runs, honestly: 100 **in-process agent instances**, 25 in each of 4 worker processes
(100 Python processes would not fit two cores). Each instance is the agent's real data
path: its own SQLite Buffer file (durability "os": 100 fsyncing files would measure the
disk), its own stream, its own ``StreamForwarder`` and its own sink with its own
connection (``NatsSink`` or ``MqttSink``), with the forwarder's default back-off (0.5 s
doubling to 15 s, full jitter). Not included: the HTTP sources, heartbeat, metrics and
status of a full ``edge-agent run``; events are appended by a timer at ``--rate`` per agent.

Each phase (JetStream, then MQTT) runs one timeline: ``--steady`` seconds of normal load,
then the central side is SIGKILLed for ``--outage`` seconds (agents keep collecting), then
it comes back, ingest goes on for 5 s and stops, and every agent drains. Figures:

- total events/s delivered in the steady window, against the load offered;
- fairness: Jain's index of events delivered per agent in the steady window, and in the
  first 10 s after the central side came back (the herd);
- p50/p99 latency, append to PubAck/PUBACK, of events appended in the steady window;
- broker CPU (all nodes, psutil), mean in the steady window and peak 0.5 s sample in the
  herd; time from restore until every agent is connected again and until every backlog is
  empty.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- worker


async def _agent(i: int, args: argparse.Namespace, plan: dict[str, float], out: dict) -> None:
    from pydantic import SecretStr

    from agent.buffer import Buffer
    from agent.forwarder import ForwarderSettings, StreamForwarder
    from agent.interfaces import Outcome, Sink
    from agent.registry import AdapterContext
    from bench.common import event

    plant = f"plant{i:03d}"
    d = Path(args.dir) / plant
    d.mkdir(parents=True, exist_ok=True)
    buf = await Buffer.open(d / "buffer.db", plant=plant, agent_id=plant, durability="os")
    ctx = AdapterContext(plant, plant, d, "bench")
    if args.sink == "nats":
        from adapters.sinks.nats import Config, NatsSink

        sink: Sink = NatsSink(
            "central",
            Config(
                url=args.url, stream="FLEET", username="admin", password=SecretStr("admin-secret")
            ),
            ctx,
        )
    else:
        from adapters.sinks.mqtt import Config as MConfig
        from adapters.sinks.mqtt import MqttSink

        sink = MqttSink("central", MConfig(url=args.url, presence=False), ctx)
    appended: list[float] = [0.0]  # index = sequence
    latencies: list[float] = []
    delivered: list[tuple[float, int]] = []  # (ack time, events)
    steady_end = plan["outage_at"]

    class Timed(Sink):
        name = "central"
        max_in_flight = sink.max_in_flight

        async def send(self, batch: Any) -> Any:
            r = await sink.send(batch)
            if r.outcome is Outcome.ACCEPTED:
                now = time.time()
                delivered.append((now, len(batch)))
                for seq in range(batch.first_sequence, batch.last_sequence + 1):
                    t = appended[seq]
                    if now < steady_end and plan["start"] + 2 <= t:
                        latencies.append(now - t)
            return r

        def state(self) -> Any:
            return sink.state()

    await sink.start()
    events = [event(k) for k in range(1000)]
    task: asyncio.Task[None] | None = None
    reconnected_at = None
    tick = 0.5  # a source commits what arrived in the last 0.5 s (fewer, larger appends)
    per_tick = args.rate * tick
    credit = 0.0
    try:
        await asyncio.sleep(max(0.0, plan["start"] - time.time()))
        while time.time() < plan["ingest_end"]:
            credit += per_tick
            n = int(credit)
            credit -= n
            if n:
                await buf.append("line1", events[:n])
                now = time.time()
                appended.extend([now] * n)
                if task is None:  # the forwarder starts once the stream exists, as in run
                    fw = StreamForwarder(buf, "line1", Timed(), ForwarderSettings())
                    task = asyncio.create_task(fw.run())
            if reconnected_at is None and time.time() > plan["restore_at"]:
                if sink.state().state == "connected":
                    reconnected_at = time.time()
            await asyncio.sleep(tick)
        while time.time() < plan["deadline"]:
            if reconnected_at is None and sink.state().state == "connected":
                reconnected_at = time.time()
            last, fwd = buf.stream_state("line1")
            if fwd >= last:
                break
            await asyncio.sleep(0.1)
        last, fwd = buf.stream_state("line1")
        out[plant] = {
            "appended": last,
            "forwarded": fwd,
            "drained_at": time.time() if fwd >= last else None,
            "reconnected_at": reconnected_at,
            "appended_steady": sum(1 for t in appended if plan["start"] + 2 <= t < steady_end),
            "latencies": latencies,
            "delivered": delivered,
            "connects": sink.state().detail.get("connects"),
        }
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await sink.stop()
        await buf.close()


async def _worker(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)  # the herd's retry warnings, 100 times over
    plan = json.loads(args.plan)
    out: dict[str, Any] = {}
    first = args.first
    await asyncio.gather(*(_agent(i, args, plan, out) for i in range(first, first + args.count)))
    Path(args.result).write_text(json.dumps(out))  # noqa: ASYNC240 - once, at the end


# --------------------------------------------------------------------------- coordinator


class CpuMeter:
    """CPU seconds of the broker processes, sampled; survives the brokers being restarted."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.samples: list[tuple[float, float]] = []  # (time, cpu% over the last interval)
        self._procs: dict[int, Any] = {}
        self._last: dict[int, float] = {}
        self._t = time.time()

    def sample(self, pids: list[int]) -> None:
        now = time.time()
        total = 0.0
        for pid in pids:
            try:
                p = self._procs.setdefault(pid, self.psutil.Process(pid))
                c = p.cpu_times()
                cpu = c.user + c.system
            except self.psutil.Error:
                continue
            total += cpu - self._last.get(pid, cpu)
            self._last[pid] = cpu
        dt = now - self._t
        self._t = now
        if dt > 0:
            self.samples.append((now, 100.0 * total / dt))

    def mean(self, a: float, b: float) -> float:
        xs = [v for t, v in self.samples if a <= t <= b]
        return statistics.fmean(xs) if xs else 0.0

    def peak(self, a: float, b: float) -> float:
        return max((v for t, v in self.samples if a <= t <= b), default=0.0)


def _jain(xs: list[float]) -> float:
    s = sum(xs)
    q = sum(x * x for x in xs)
    return round(s * s / (len(xs) * q), 3) if q else 0.0


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def run_phase(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tests.fixtures.mosquitto import Mosquitto, free_port
    from tests.fixtures.nats_cluster import NatsCluster

    d = work / kind
    d.mkdir(parents=True, exist_ok=True)
    if kind == "nats":
        cluster = NatsCluster(d / "cluster", max_payload=8 * 1024 * 1024).start()
        asyncio.run(cluster.add_stream("FLEET", ["edge.>"], duplicate_window=300))
        url = cluster.url

        def pids() -> list[int]:
            return [n.proc.pid for n in cluster.nodes if n.running() and n.proc]

        def down() -> None:
            cluster.kill()

        def up() -> None:
            cluster.start(60)

        def stop() -> None:
            cluster.kill()

    else:
        broker = Mosquitto(d / "broker", free_port()).start()
        url = broker.url

        def pids() -> list[int]:
            return [broker.proc.pid] if broker.running() and broker.proc else []

        def down() -> None:
            broker.kill()

        def up() -> None:
            broker.start()

        def stop() -> None:
            broker.kill()

    now = time.time()
    start = now + args.warmup
    plan = {
        "start": start,
        "outage_at": start + args.steady,
        "restore_at": start + args.steady + args.outage,
        "ingest_end": start + args.steady + args.outage + 5,
        "deadline": start + args.steady + args.outage + 5 + args.drain_limit,
    }
    per = args.agents // args.workers
    procs = []
    results = []
    meter = CpuMeter()
    try:
        for w in range(args.workers):
            res = d / f"worker{w}.json"
            results.append(res)
            cmd = [
                sys.executable, "-m", "bench.fleet", "--worker", "--sink", kind, "--url", url,
                "--first", str(w * per), "--count", str(per), "--rate", str(args.rate),
                "--dir", str(d / "agents"), "--plan", json.dumps(plan), "--result", str(res),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=str(REPO)))
        restored = None
        ready_after = None
        outage_done = False
        while any(p.poll() is None for p in procs):
            meter.sample(pids())
            t = time.time()
            if not outage_done and t >= plan["outage_at"]:
                down()
                outage_done = True
            if outage_done and restored is None and t >= plan["restore_at"]:
                restored = time.time()
                up()
                ready_after = time.time() - restored
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop()
    agents: dict[str, Any] = {}
    for res in results:
        agents.update(json.loads(res.read_text()))
    restore = restored or plan["restore_at"]
    steady = (plan["start"] + 2, plan["outage_at"])  # 2 s for connects and first batches
    per_agent_steady = [
        sum(n for t, n in a["delivered"] if steady[0] <= t < steady[1]) for a in agents.values()
    ]
    after = [t for a in agents.values() for t, _ in a["delivered"] if t >= restore]
    herd0 = min(after, default=restore)
    per_agent_herd = [
        sum(n for t, n in a["delivered"] if herd0 <= t < herd0 + 10) for a in agents.values()
    ]
    lat = [x for a in agents.values() for x in a["latencies"]]
    drained = [a["drained_at"] for a in agents.values()]
    reconn = [a["reconnected_at"] for a in agents.values() if a["reconnected_at"]]
    lost = sum(a["appended"] - a["forwarded"] for a in agents.values())
    span = steady[1] - steady[0]
    return {
        "sink": kind,
        "agents": len(agents),
        "offered_events_per_s": args.rate * len(agents),
        "appended_events_per_s_steady": round(
            sum(a.get("appended_steady", 0) for a in agents.values()) / span, 1
        ),
        "delivered_events_per_s_steady": round(sum(per_agent_steady) / span, 1),
        "fairness_jain_steady": _jain([float(x) for x in per_agent_steady]),
        "fairness_jain_herd_first_10s_of_delivery": _jain([float(x) for x in per_agent_herd]),
        "latency_p50_ms": round(1000 * _pct(lat, 0.50), 1),
        "latency_p99_ms": round(1000 * _pct(lat, 0.99), 1),
        "broker_cpu_pct_steady_mean": round(meter.mean(*steady), 1),
        "broker_cpu_pct_herd_peak": round(meter.peak(restore, restore + 30), 1),
        "central_ready_after_restart_s": round(ready_after or 0, 1),
        "herd_first_delivery_s": round(herd0 - restore, 1),
        "herd_all_reconnected_s": round(max(reconn) - restore, 1) if reconn else None,
        "herd_reconnect_spread_s": round(max(reconn) - min(reconn), 1) if reconn else None,
        "herd_all_drained_s": (
            round(max(drained) - restore, 1) if all(x is not None for x in drained) else None
        ),
        "outage_s": args.outage,
        "not_drained_events": lost,
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rate", type=float, default=50.0, help="events/s per agent")
    p.add_argument("--steady", type=float, default=25.0)
    p.add_argument("--outage", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=8.0)
    p.add_argument("--drain-limit", type=float, default=120.0)
    p.add_argument("--only", choices=["nats", "mqtt"])
    p.add_argument("--out", default=str(REPO / "bench" / "fleet.json"))
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sink", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        asyncio.run(_worker(args))
        return 0
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="edge-fleet-"))
    phases: dict[str, Any] = {}
    out: dict[str, Any] = {
        "command": "python -m bench.fleet " + " ".join(sys.argv[1:]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.cpu_count()} cores",
        "agents_are": f"in-process instances, {args.agents // args.workers} per worker "
        f"process x {args.workers} workers",
        "phases": phases,
    }
    for kind in [args.only] if args.only else ["nats", "mqtt"]:
        print(f"== fleet phase {kind}", flush=True)
        phases[kind] = run_phase(kind, args, work)
        print(json.dumps(phases[kind], indent=2), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sparkplug B host figures, against a real mosquitto and a publisher in its own process
(bench/sparkplug_publisher.py: NDATA payloads of 10 alias-only Double metrics each).

* ``sparkplug_ingest``: metrics/s committed by the sparkplug source into the real Buffer
  (durability fsync, the agent's default), first message to last commit, vs the raw limit
  measured in the same run: a paho subscriber that decodes the same payloads with the
  same protobuf classes and only counts the metrics. Target >= 0.5.
* ``sparkplug_10k``: the real agent (``edge-agent run``, a sparkplug source, an https sink
  to a closed port so nothing is forwarded and the forwarder costs nothing) fed 10,000
  metric changes/s (1,000 payloads/s x 10 metrics) for 60 s (15 s with --quick): CPU of
  the agent process over the window (psutil; 1.0 = one core), and metrics committed.
  Target: <= 1 core, every metric committed.

Alone, outside ``python -m bench``::

    python -m bench.sparkplug [--messages 10000]   # the ingest pair, with CPU per thread
    python -m bench.sparkplug --sustained 60       # the 10,000 metrics/s figure

each prints one JSON line.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import Ctx, figure, ratio, spawn

METRICS = 10


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(d: Path) -> int:
    import shutil
    import socket

    port = _free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\n"  # the broker must not be what drops QoS 0 in a bench
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    spawn([binary, "-c", str(conf)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def publisher(port: int, edge: str, messages: int, rate: float) -> Any:
    return spawn(
        [sys.executable, "-m", "bench.sparkplug_publisher", "127.0.0.1", str(port), edge,
         str(messages), str(METRICS), str(rate)]
    )  # fmt: skip


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of this process by native id, with its Python name
    (Linux /proc): which thread the source's cost lands on (paho's, the loop, SQL)."""
    import os

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _thread_label(name: str) -> str:
    for prefix, label in (("paho-mqtt", "paho"), ("buffer-sql", "sql"), ("MainThread", "loop")):
        if name.startswith(prefix):
            return label
    return "other"


def process_cpu() -> float:
    """CPU seconds of this process, all threads (paho's loop, the buffer's SQL thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raw_side(port: int, messages: int) -> float:
    """paho + protobuf decode of every payload, counting metrics: the cheapest consumer."""
    from adapters.sources.sparkplug import payload as sp

    want = messages * METRICS
    state = {"metrics": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if "/NDATA/" not in msg.topic:
            return
        if not state["first"]:
            state["first"] = time.perf_counter()
        p = sp.Payload()
        p.ParseFromString(msg.payload)
        for m in p.metrics:  # touch each value as a consumer would
            _ = m.alias, m.timestamp, m.double_value
        state["metrics"] += len(p.metrics)
        if state["metrics"] >= want:
            state["last"] = time.perf_counter()
            done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw")
    c.on_message = on_message
    c.on_subscribe = lambda *_a: subscribed.set()
    c.connect("127.0.0.1", port)
    c.subscribe("spBv1.0/Bench/#", qos=0)
    c.loop_start()
    subscribed.wait(10)
    pub = publisher(port, "raw", messages, 0)
    if not done.wait(300):
        raise RuntimeError(f"raw side got {state['metrics']} of {want} metrics")
    pub.wait(60)
    c.disconnect()
    c.loop_stop()
    return want / (state["last"] - state["first"])


async def source_side(port: int, d: Path, messages: int) -> tuple[float, dict[str, Any]]:
    from agent.gc_tuning import tune_for_ingest

    # the garbage-collector settings edge-agent run applies at start (agent/gc_tuning.py):
    # this side stands for the agent's process; the raw side, a bare paho script, ran with
    # CPython's defaults; put back afterwards
    threshold = gc.get_threshold()
    tune_for_ingest()
    try:
        return await _source_side(port, d, messages)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def _source_side(port: int, d: Path, messages: int) -> tuple[float, dict[str, Any]]:
    from adapters.sources.sparkplug import Config, build
    from agent.buffer import Buffer
    from agent.registry import AdapterContext

    buf = await Buffer.open(d / "spb.db", durability="fsync", max_bytes=8 << 30)
    cfg = Config.model_validate(
        {
            "type": "sparkplug",
            "url": f"mqtt://127.0.0.1:{port}",
            "groups": ["Bench"],
            "host_id": "bench",
        }
    )
    source = build("spb", cfg, AdapterContext("bench", "p", d, "0"))
    task = asyncio.create_task(source.run(buf))
    while source.host_state != "online":  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    # threads' CPU from here to the last commit (paho's thread and the SQL thread exist now)
    before = thread_cpu()
    want = messages * METRICS + METRICS + 1  # data, birth values, the node's state event
    pub = publisher(port, "ours", messages, 0)
    first = 0.0
    deadline = time.monotonic() + 600
    # the counter itself, not state(): state() builds the whole status dict (the tracker's
    # snapshot too), and at one call per millisecond that was a seventh of the loop
    # thread's time in py-spy, charged to the source's CPU per metric
    while source._accepted < want:
        if not first and source.tracker.messages:
            first = time.perf_counter()
        if time.monotonic() > deadline:
            raise RuntimeError(f"source committed {source.state().detail['accepted']} of {want}")
        await asyncio.sleep(0.001)
    last = time.perf_counter()
    after = thread_cpu()
    split: dict[str, float] = {}
    for tid, (name, t) in after.items():
        label = _thread_label(name)
        split[label] = split.get(label, 0.0) + t - before.get(tid, (name, 0.0))[1]
    detail = dict(source.state().detail)
    detail["thread_us_per_metric"] = {
        k: round(v / (messages * METRICS) * 1e6, 2) for k, v in sorted(split.items())
    }
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await buf.close()
    await asyncio.to_thread(pub.wait, 60)
    return (messages * METRICS) / (last - first), detail


def durable_insert_us(buffer_file: Path, d: Path, group: int = 10_000) -> dict[str, float]:
    """CPU microseconds per row of the cheapest durable store of what the source stored:
    the rows of its own buffer file (the same encoded events, bytes for bytes) inserted
    again into a fresh file, WAL + synchronous=FULL, 16 KiB pages, one transaction per
    ``group`` rows (the source's commits), by raw executemany and by one INSERT ... SELECT
    FROM json_each per group (bench/ingest.py's two raw sides). Added to the raw
    subscriber's CPU it gives the best CPU ratio ANY host could reach that stores one row
    per metric and does nothing else: no mapping, no envelope, no bookkeeping."""
    from bench.ingest import raw_insert

    with sqlite3.connect(f"file:{buffer_file}?mode=ro", uri=True) as src:
        rows = src.execute(
            "SELECT sid, seq, id, committed_at, size, body, ctl FROM events ORDER BY sid, seq"
        ).fetchall()
    out: dict[str, float] = {}
    for how in ("executemany", "json_each"):
        path = d / f"floor-{how}.db"
        _, cpu = raw_insert(path, rows, group, 16384, json_each=how == "json_each")
        out[how] = cpu / len(rows) * 1e6
        path.unlink()
    return out


def agent_10k(port: int, d: Path, seconds: int, linger: float | None = None) -> dict[str, Any]:
    from tests.fixtures.common import agent_config, to_toml

    cfg = agent_config(
        d,
        sinks={"https": {"type": "https", "url": f"https://127.0.0.1:{_free_port()}"}},
        sources={
            "spb": {
                "type": "sparkplug",
                "url": f"mqtt://127.0.0.1:{port}",
                "groups": ["Bench"],
                "host_id": "bench10k",
                **({"commit_linger": linger} if linger is not None else {}),
            }
        },
        buffer={"max_bytes": "8GiB"},
    )
    (d / "agent.toml").write_text(to_toml(cfg))
    log = (d / "agent.log").open("wb")
    agent = spawn(
        [sys.executable, "-m", "agent", "run", "-c", str(d / "agent.toml")], stdout=log, stderr=log
    )
    time.sleep(3)  # started and subscribed (STATE online)
    messages = 1000 * seconds
    ps = psutil.Process(agent.pid)
    cpu0 = ps.cpu_times()
    t0 = time.perf_counter()
    pub = publisher(port, "k10", messages, 1000)
    pub.wait(seconds + 120)
    sent_for = time.perf_counter() - t0
    # let the agent finish what it received, then read its CPU over the whole window
    db = d / "buffer.db"
    want = messages * METRICS + METRICS + 1
    committed = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                committed = c.execute("SELECT count(*) FROM events").fetchone()[0]
        except sqlite3.Error:
            pass
        if committed >= want:
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    cpu1 = ps.cpu_times()
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    agent.terminate()
    agent.wait(30)
    return {
        "cores": used / wall,
        # CPU-seconds per second at 10,000 metrics/s, from what was committed: the cores the
        # load needs, whatever share of the machine the agent got (a loaded machine starves it)
        "cores_needed": used / max(committed, 1) * 10_000,
        "committed": committed,
        "expected": want,
        "sent_for": sent_for,
        "wall": wall,
    }


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("sparkplug")
    port = start_broker(d)
    messages = ctx.n(20_000, 5_000)
    # CPU per metric as well as metrics/s: on a loaded machine the wall-clock rate says as
    # much about the neighbours as about us (the publisher is another process: not counted)
    c0 = process_cpu()
    raw = raw_side(port, messages)
    c1 = process_cpu()
    ours, detail = asyncio.run(source_side(port, d, messages))
    c2 = process_cpu()
    raw_us, ours_us = (c1 - c0) / (messages * METRICS) * 1e6, (c2 - c1) / (messages * METRICS) * 1e6
    floor = durable_insert_us(d / "spb.db", d)
    store_us = min(floor.values())
    seconds = ctx.n(60, 15)
    (d / "k10").mkdir(exist_ok=True)
    k10 = agent_10k(port, d / "k10", seconds)
    return {
        "sparkplug_ingest": figure(
            value=ours,
            unit="metrics/s",
            raw=raw,
            raw_label="paho subscriber + protobuf decode of the same payloads, counting only",
            target=">= 0.5",
            met=ratio(ours, raw) >= 0.5,
            cpu_us_per_metric=round(ours_us, 2),
            raw_cpu_us_per_metric=round(raw_us, 2),
            cpu_ratio=round(raw_us / ours_us, 3) if ours_us else None,
            thread_us_per_metric=detail["thread_us_per_metric"],
            raw_store_cpu_us_per_row={k: round(v, 2) for k, v in floor.items()},
            ceiling_cpu_ratio=round(raw_us / (raw_us + store_us), 3),
            detail=(
                f"{messages} NDATA x {METRICS} alias-only Double metrics, QoS 0, one edge node; "
                f"committed to the Buffer (fsync) as mfg.signal.sampled; seq gaps "
                f"{detail['seq_gaps']}, dropped {detail['dropped_overflow']}"
                "; the source side with edge-agent run's GC settings (agent/gc_tuning.py)"
                "; ceiling_cpu_ratio: raw subscriber / (raw subscriber + the cheapest raw "
                "durable insert of the source's own rows), what storing one row per metric "
                "allows at best (durable_insert_us)"
            ),
        ),
        "sparkplug_10k": figure(
            value=k10["cores"],
            unit="cores",
            target="<= 1.0 core at 10,000 metrics/s",
            met=k10["cores"] <= 1.0 and k10["committed"] >= k10["expected"],
            cores_needed_at_10k=round(k10["cores_needed"], 3),
            detail=(
                f"edge-agent run, {seconds} s at 1,000 NDATA/s x {METRICS} metrics "
                f"(published over {k10['sent_for']:.1f} s); committed {k10['committed']} of "
                f"{k10['expected']} within {k10['wall']:.1f} s; CPU over that window; "
                "cores_needed_at_10k = CPU-seconds per committed metric x 10,000"
            ),
        ),
    }


def _ingest_pair(messages: int) -> dict[str, Any]:
    """The raw side and the source side of sparkplug_ingest, once, in this process."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="bench-spb-"))
    port = start_broker(d)
    c0 = process_cpu()
    raw = raw_side(port, messages)
    c1 = process_cpu()
    ours, detail = asyncio.run(source_side(port, d, messages))
    c2 = process_cpu()
    n = messages * METRICS
    raw_us, ours_us = (c1 - c0) / n * 1e6, (c2 - c1) / n * 1e6
    floor = durable_insert_us(d / "spb.db", d)
    return {
        "metrics": n,
        "raw_metrics_per_s": round(raw),
        "metrics_per_s": round(ours),
        "wall_ratio": round(ours / raw, 3),
        "raw_cpu_us_per_metric": round(raw_us, 2),
        "cpu_us_per_metric": round(ours_us, 2),
        "cpu_ratio": round(raw_us / ours_us, 3),
        "thread_us_per_metric": detail["thread_us_per_metric"],
        "raw_store_cpu_us_per_row": {k: round(v, 2) for k, v in floor.items()},
        "ceiling_cpu_ratio": round(raw_us / (raw_us + min(floor.values())), 3),
        "seq_gaps": detail["seq_gaps"],
        "dropped_overflow": detail["dropped_overflow"],
    }


def main() -> None:
    import argparse
    import json
    import tempfile

    from bench.common import kill_children

    p = argparse.ArgumentParser(prog="python -m bench.sparkplug", description=__doc__)
    p.add_argument("--messages", type=int, default=10_000, help="NDATA payloads (x 10 metrics)")
    p.add_argument("--sustained", type=int, metavar="SECONDS", help="the 10,000 metrics/s run")
    args = p.parse_args()
    try:
        if args.sustained:
            d = Path(tempfile.mkdtemp(prefix="bench-spb10k-"))
            port = start_broker(d)
            out = agent_10k(port, d, args.sustained)
            out["met"] = out["cores"] <= 1.0 and out["committed"] >= out["expected"]
        else:
            out = _ingest_pair(args.messages)
        print(json.dumps(out), flush=True)
    finally:
        kill_children()


if __name__ == "__main__":
    main()

"""The agent as a process: SIGKILL mid-stream, SIGTERM, and a full buffer, all for real.

Every test runs ``python -m agent run`` as a subprocess fed by the mes_http source (an MES
client that only counts an event as delivered once it got 202) and forwarding to the
reference gateway, whose report is the judge: nothing missing, nothing out of order,
duplicates only under the same id.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from agent.heartbeat import read_heartbeat
from tests.fixtures.common import agent_config, free_port, https_sink
from tests.fixtures.forwarding import (
    arrival_sequences,
    assert_complete,
    drained,
    mes_event,
    mes_source,
    simulator,
    stream_of,
    wait_port,
)


class Pusher(threading.Thread):
    """An MES client: posts batches of new events; on any failure retries the SAME batch
    (same event ids) until it gets 202, as the mes_http README tells MES integrators."""

    def __init__(self, port: int, batch: int = 10, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1/events"
        self.batch = batch
        self.pause = pause
        self.stop_flag = threading.Event()
        self.acked: dict[str, str] = {}  # MES id -> CloudEvents id from the 202 answer
        self.statuses: dict[int, int] = {}
        self.next_i = 1
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=5) as client:
                while not self.stop_flag.is_set():
                    events = [mes_event(i) for i in range(self.next_i, self.next_i + self.batch)]
                    while True:
                        try:
                            r = client.post(self.url, json=events)
                            self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                            if r.status_code == 202:
                                break
                        except httpx.TransportError:
                            pass
                        if self.stop_flag.is_set():
                            return  # never acknowledged: not counted
                        time.sleep(0.05)
                    for ev, ack in zip(events, r.json()["events"], strict=True):
                        prior = self.acked.get(ev["id"])
                        assert prior is None or prior == ack["id"], (ev["id"], prior, ack)
                        self.acked[ev["id"]] = ack["id"]
                    self.next_i += self.batch
                    time.sleep(self.pause)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def test_sigkill_mid_stream_five_times_loses_no_acknowledged_event(
    gateway, agent_process, tmp_path
):
    gw = gateway(latency_ms=15)  # batches spend time on the wire: kills land mid-send
    port = free_port()
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"mes": mes_source(port)},
                       forwarder={"max_events": 50, "linger_ms": 5})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_port(agent, port)
    pusher = Pusher(port)
    pusher.start()
    rng = random.Random(20261123)
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.4, 1.2))
            agent.kill()  # SIGKILL: no cleanup at all
            assert agent.proc is not None and agent.proc.returncode == -signal.SIGKILL
            agent.start(wait_ready=False)
            wait_port(agent, port)
        time.sleep(0.5)
    finally:
        pusher.stop_flag.set()
        pusher.join(10)
    assert pusher.error is None, pusher.error
    assert len(pusher.acked) >= 100, f"too few events pushed: {len(pusher.acked)}"

    st = agent.wait(drained("mes"), timeout=60, what="mes drained after the kills")
    last = stream_of(st, "mes")["last_sequence"]
    gw.wait_received(last, stream="mes", timeout=30)
    rep = assert_complete(gw, "mes", last)
    got = gw.events("mes")
    ids_at_gateway = {e["id"] for e in got}
    missing = [m for m, cid in pusher.acked.items() if cid not in ids_at_gateway]
    assert missing == [], f"{len(missing)} acknowledged events never arrived: {missing[:5]}"
    # each MES event arrived under exactly one CloudEvents id, and each id once
    by_order: dict[str, set[str]] = {}
    for e in got:
        by_order.setdefault(e["data"]["work_order"], set()).add(e["id"])
    assert all(len(v) == 1 for v in by_order.values())
    seqs = arrival_sequences(gw, "mes")
    assert seqs == list(range(1, last + 1)), "gateway stores unique events in arrival order"
    assert rep["received"] == last
    assert agent.stop() == 0


def test_sigterm_stops_cleanly_and_the_inflight_batch_is_resent_under_its_key(
    gateway, agent_process, tmp_path
):
    gw = gateway(latency_ms=5000)  # every POST hangs: the first batch is in flight
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"line1": simulator(rate=200, limit=50)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()
    db = Path(cfg["buffer"]["path"])

    def open_batches() -> list[tuple[str, int, int]]:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT batch_id, first_seq, last_seq FROM batches").fetchall()
        finally:
            conn.close()

    deadline = time.monotonic() + 20
    while not open_batches():
        assert time.monotonic() < deadline, "no batch was formed"
        time.sleep(0.1)
    time.sleep(0.3)
    assert gw.report()["totals"]["received"] == 0
    t0 = time.monotonic()
    assert agent.stop(timeout=20) == 0
    took = time.monotonic() - t0
    assert took < 10, f"stop took {took:.1f}s"
    log = agent.log()
    assert "stopped cleanly" in log
    assert not Path(str(db) + "-wal").exists() or Path(str(db) + "-wal").stat().st_size == 0
    st = agent.status()
    assert st["agent"]["running"] is False
    assert stream_of(st, "line1")["state"] == "stopped"
    pending = open_batches()
    assert len(pending) == 1, pending
    key, first, last = pending[0]
    assert first == 1

    gw.control(latency_ms=0)
    # restart without the simulator (a new one would emit its 50 events again)
    agent.write_config(agent_config(tmp_path, sinks={"central": https_sink(gw)}))
    agent.start()
    gw.wait_received(50, stream="line1", timeout=30)
    conn = sqlite3.connect(f"file:{gw.db_path}?mode=ro", uri=True)
    try:
        keys = {
            k: (a, b)
            for k, a, b in conn.execute("SELECT key, first_sequence, last_sequence FROM batches")
        }
    finally:
        conn.close()
    assert keys.get(key) == (first, last), (key, keys)
    assert_complete(gw, "line1", 50)
    assert agent.stop() == 0


def _push_until(port: int, want: int, start: int = 1) -> tuple[int, httpx.Response | None]:
    """Push single events until one is refused with 503; returns (next index, response)."""
    i = start
    with httpx.Client(timeout=5) as client:
        while i < start + want:
            r = client.post(f"http://127.0.0.1:{port}/v1/events", json=[mes_event(i)])
            if r.status_code == 503:
                return i, r
            assert r.status_code == 202, r.text
            i += 1
    return i, None


def _full_config(tmp_path: Path, gw: Any, port: int, on_full: str) -> dict[str, Any]:
    return agent_config(tmp_path, sinks={"central": https_sink(gw)},
                        sources={"mes": {**mes_source(port), "retry_after": "2s"}},
                        buffer={"max_bytes": "24KiB", "on_full": on_full})  # fmt: skip


def test_buffer_full_under_block_answers_503_with_retry_after_counted_and_logged(
    gateway, agent_process, tmp_path
):
    gw = gateway()
    gw.stop()  # the central side is down: everything stays in the buffer
    port = free_port()
    agent = agent_process(_full_config(tmp_path, gw, port, "block"), workdir=tmp_path)
    agent.start(wait_ready=False)
    wait_port(agent, port)
    nxt, refused = _push_until(port, 1000)
    assert refused is not None, "the buffer never filled"
    assert refused.headers["Retry-After"] == "2"
    assert refused.json()["error"] == "buffer_full"
    accepted = nxt - 1
    assert accepted > 10
    st = agent.wait(lambda s: s["buffer"]["refused_total"] >= 1, timeout=20,
                    what="refused_total in status")  # fmt: skip
    assert stream_of(st, "mes")["backlog_events"] == accepted
    assert stream_of(st, "mes")["dropped_total"] == 0
    assert "refusing events (503" in agent.log()
    table = agent.cli("status", "-c", str(agent.config_path)).stdout
    assert "refused" in table

    # the central side is back: the buffer drains, pushes are accepted again, nothing lost
    gw.start()
    agent.wait(drained("mes", accepted), timeout=30, what="drained")
    with httpx.Client(timeout=5) as client:
        r = client.post(f"http://127.0.0.1:{port}/v1/events", json=[mes_event(nxt)])
    assert r.status_code == 202, r.text
    gw.wait_received(accepted + 1, stream="mes", timeout=30)
    assert_complete(gw, "mes", accepted + 1)
    assert agent.stop() == 0


def test_buffer_full_under_drop_oldest_sends_an_explained_gap(gateway, agent_process, tmp_path):
    gw = gateway()
    gw.stop()
    port = free_port()
    agent = agent_process(_full_config(tmp_path, gw, port, "drop_oldest"), workdir=tmp_path)
    agent.start(wait_ready=False)
    wait_port(agent, port)
    nxt, refused = _push_until(port, 300)
    assert refused is None, f"drop_oldest refused an event: {refused and refused.text}"
    st = agent.wait(lambda s: stream_of(s, "mes")["dropped_total"] > 0, timeout=20,
                    what="dropped_total in status")  # fmt: skip
    dropped = stream_of(st, "mes")["dropped_total"]
    gw.start()
    st = agent.wait(drained("mes"), timeout=30, what="drained")
    last = stream_of(st, "mes")["last_sequence"]
    deadline = time.monotonic() + 30
    while (rep := gw.stream_report("mes")) is None or rep["complete_up_to"] < last:
        assert time.monotonic() < deadline, rep
        time.sleep(0.2)
    assert rep["missing_count"] == 0 and rep["ok"], rep
    gaps = [e for e in rep["explained"] if e["kind"] == "gap"]
    assert gaps and sum(g["count"] for g in gaps) == dropped, rep["explained"]
    assert rep["explained_count"] >= dropped
    gap_events = [e for e in gw.events("mes") if e["type"] == "mfg.agent.gap"]
    assert gap_events and gap_events[0]["data"]["first_sequence"] > 1  # in-flight batch kept
    assert rep["complete_up_to"] == last, rep
    assert "dropped" in agent.log().lower()
    assert agent.stop() == 0


def test_status_shows_sink_changes_well_within_one_heartbeat_interval(
    gateway, agent_process, tmp_path
):
    """The periodic heartbeat is every 2 s; a state change must not wait for it, or an
    operator checking status right after an outage begins (or ends) is told old news.
    Six transitions: with only the 2 s cadence, all six within 1.5 s is a 1-in-6 chance."""
    gw = gateway()
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"line1": simulator(rate=100)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()
    db = Path(cfg["buffer"]["path"])
    agent.wait(lambda st: st["sinks"][0]["state"] == "connected", 20, "sink connected")

    def seen(connected: bool) -> float:
        """Seconds from the sink's state change to the heartbeat that first shows it."""
        deadline = time.monotonic() + 20
        while True:
            hb = read_heartbeat(db)
            sink = hb["sinks"][0] if hb else {}
            if sink.get("state") is not None and (sink["state"] == "connected") == connected:
                return float(hb["at"] - sink["since"])
            assert time.monotonic() < deadline, f"the sink never became {connected=}: {hb}"
            time.sleep(0.02)

    lateness = []
    for _ in range(3):
        gw.stop(kill=True)
        lateness.append(seen(connected=False))
        gw.start()
        lateness.append(seen(connected=True))
    print(f"status learnt of sink changes after: {[round(x, 2) for x in lateness]} s")
    assert all(0 <= late < 1.5 for late in lateness), f"status learnt of changes late: {lateness}"
    assert agent.stop() == 0

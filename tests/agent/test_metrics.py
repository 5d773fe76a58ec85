"""Metrics scraped over real HTTP show exactly the numbers of the status snapshot."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import (
    FORWARDER_STATES,
    SINK_STATES,
    SOURCE_STATES,
    MetricsServer,
    parse_listen,
)

SNAPSHOT: dict[str, Any] = {
    "schema": 1,
    "agent": {
        "id": "edge-01",
        "plant": "plant7",
        "version": "0.1.0",
        "running": True,
        "pid": 4242,
        "started_at": "2026-11-23T10:00:00+00:00",
        "heartbeat_age_s": 0.4,
    },
    "buffer": {
        "path": "/var/lib/edge-agent/buffer.db",
        "file_bytes": 52_428_800,
        "used_bytes": 31_457_280,
        "max_bytes": 1_073_741_824,
        "on_full": "block",
        "durability": "fsync",
        "epoch": 3,
        "ingest_rate_eps": 120.5,
        "full_in_s": 111_600.0,
        "refused_total": 17,
    },
    "streams": [
        {
            "stream": "line1",
            "sink": "central",
            "priority": "high",
            "last_sequence": 1_000_500,
            "forwarded_sequence": 500,
            "backlog_events": 1_000_000,
            "backlog_bytes": 30_000_000,
            "oldest_unsent_age_s": 7200.5,
            "last_forwarded_at": "2026-11-23T09:00:00Z",
            "last_error": "connect timeout",
            "dead_letters": 2,
            "ingested_total": 1_000_502,
            "forwarded_total": 500,
            "dropped_total": 0,
            "dead_lettered_total": 2,
            "refused_total": 17,
            "state": "retrying",
        },
        {
            "stream": "mes",
            "sink": "central",
            "priority": "normal",
            "last_sequence": 10,
            "forwarded_sequence": 10,
            "backlog_events": 0,
            "backlog_bytes": 0,
            "oldest_unsent_age_s": None,
            "last_forwarded_at": None,
            "last_error": None,
            "dead_letters": 0,
            "ingested_total": 10,
            "forwarded_total": 10,
            "dropped_total": 3,
            "dead_lettered_total": 0,
            "refused_total": 0,
            "state": "idle",
        },
    ],
    "sinks": [
        {
            "name": "central",
            "type": "https",
            "state": "disconnected",
            "since": "2026-11-23T09:00:01Z",
            "last_error": "connect timeout",
        }
    ],
    "sources": [
        {
            "name": "line1",
            "type": "opcua",
            "stream": "line1",
            "state": "connected",
            "since": "2026-11-23T08:00:00Z",
            "last_error": None,
            "detail": {  # the shape adapters/sources/opcua/source.py reports
                "endpoint": "opc.tcp://plc1:4840",
                "security": "Basic256Sha256/SignAndEncrypt",
                "items_configured": 120,
                "items_monitored": 118,
                "failed_nodes": {"ns=2;s=A": "BadNodeIdUnknown", "ns=2;s=B": "BadNodeIdUnknown"},
                "notifications_total": 90_000,
                "notifications_per_second": 450.5,
                "events_committed": 89_990,
                "appends": 400,
                "bad_or_uncertain_values": 7,
                "server_queue_overflows": 1,
                "lost_in_flight": 0,
                "pending": 3,
                "reconnects": 2,
                "unmapped_values": 0,
                "mapping_error": None,
                "backfilled": 12,
                "backfill_errors": {},
                "held_back_by_full_buffer": False,
            },
        },
        {
            "name": "mes",
            "type": "mes_http",
            "stream": "mes",
            "state": "disconnected",
            "since": "2026-11-23T08:00:00Z",
            "last_error": "bind failed",
            "detail": {  # the shape adapters/sources/mes_http/source.py reports
                "listening": False,
                "listen": "127.0.0.1:8080",
                "stream": "mes",
                "requests": 40,
                "accepted": 1234,
                "duplicates": 5,
                "rejected": {"invalid_json": 2, "schema": 1},
                "last_error": {"reason": "schema", "message": "missing order"},
            },
        },
        {
            "name": "drop",
            "type": "drop_folder",
            "stream": "mes",
            "state": "finished",
            "since": "2026-11-23T08:00:00Z",
            "last_error": None,
            "detail": {"accepted": 0, "duplicates": 0, "rejected": {}, "held_back": True},
        },
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class State:
    def __init__(self) -> None:
        self.snapshot = copy.deepcopy(SNAPSHOT)
        self.ready: tuple[bool, dict[str, Any]] = (True, {"sources": {}, "sinks": {}})
        self.fail = False

    def take(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("buffer closed")
        return self.snapshot


@pytest.fixture
async def served() -> AsyncIterator[tuple[MetricsServer, State, httpx.AsyncClient]]:
    state = State()
    server = MetricsServer("127.0.0.1:0", state.take, lambda: state.ready)
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        yield server, state, client
    await server.stop()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scraped: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in scraped, f"{name}{labels} not scraped; have {sorted(k[0] for k in scraped)}"
    return scraped[key]


async def test_metrics_equal_the_status_snapshot(served) -> None:
    server, state, client = served
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    snap = state.snapshot

    assert value(m, "edge_agent_info", version="0.1.0", agent_id="edge-01", plant="plant7") == 1
    assert value(m, "edge_agent_running") == 1
    assert value(m, "edge_agent_status_ok") == 1
    buf = snap["buffer"]
    assert value(m, "edge_agent_buffer_file_bytes") == buf["file_bytes"]
    assert value(m, "edge_agent_buffer_used_bytes") == buf["used_bytes"]
    assert value(m, "edge_agent_buffer_max_bytes") == buf["max_bytes"]
    assert value(m, "edge_agent_buffer_full_in_seconds") == buf["full_in_s"]
    assert value(m, "edge_agent_buffer_refused_total") == buf["refused_total"]
    assert value(m, "edge_agent_buffer_ingest_rate_events_per_second") == buf["ingest_rate_eps"]

    for st in snap["streams"]:
        lv = {"stream": st["stream"], "sink": st["sink"]}
        assert value(m, "edge_agent_events_ingested_total", **lv) == st["ingested_total"]
        assert value(m, "edge_agent_events_forwarded_total", **lv) == st["forwarded_total"]
        assert value(m, "edge_agent_events_dropped_total", **lv) == st["dropped_total"]
        assert value(m, "edge_agent_events_dead_lettered_total", **lv) == st["dead_lettered_total"]
        assert value(m, "edge_agent_events_refused_total", **lv) == st["refused_total"]
        assert value(m, "edge_agent_backlog_events", **lv) == st["backlog_events"]
        assert value(m, "edge_agent_backlog_bytes", **lv) == st["backlog_bytes"]
        assert value(m, "edge_agent_oldest_unsent_age_seconds", **lv) == (
            st["oldest_unsent_age_s"] or 0
        )
        assert value(m, "edge_agent_dead_letters", **lv) == st["dead_letters"]
        assert value(m, "edge_agent_last_sequence", **lv) == st["last_sequence"]
        assert value(m, "edge_agent_forwarded_sequence", **lv) == st["forwarded_sequence"]
    assert value(
        m, "edge_agent_last_forwarded_timestamp_seconds", stream="line1", sink="central"
    ) == pytest.approx(1795424400.0)

    assert (
        value(m, "edge_agent_source_connected", source="line1", type="opcua", stream="line1") == 1
    )
    assert value(m, "edge_agent_source_connected", source="mes", type="mes_http", stream="mes") == 0
    assert value(m, "edge_agent_source_state", source="mes", type="mes_http", state="disconnected")
    assert value(m, "edge_agent_sink_connected", sink="central", type="https") == 0
    assert value(m, "edge_agent_sink_state", sink="central", type="https", state="disconnected")

    # Scrape-time: a change in the snapshot shows on the next scrape, nothing cached.
    snap["streams"][0]["backlog_events"] = 7
    snap["sinks"][0]["state"] = "connected"
    m = samples((await client.get("/metrics")).text)
    assert value(m, "edge_agent_backlog_events", stream="line1", sink="central") == 7
    assert value(m, "edge_agent_sink_connected", sink="central", type="https") == 1
    assert value(m, "edge_agent_sink_state", sink="central", type="https", state="connected") == 1


async def test_buffer_not_filling_is_plus_inf(served) -> None:
    _, state, client = served
    state.snapshot["buffer"]["full_in_s"] = None
    m = samples((await client.get("/metrics")).text)
    assert math.isinf(value(m, "edge_agent_buffer_full_in_seconds"))


async def test_source_detail_per_channel(served) -> None:
    """Issue 4: accepted, rejected by reason, duplicates and OPC UA's numbers per source."""
    _, state, client = served
    m = samples((await client.get("/metrics")).text)
    assert value(m, "edge_agent_source_events_accepted_total", source="mes") == 1234
    assert value(m, "edge_agent_source_events_accepted_total", source="line1") == 89_990
    assert value(m, "edge_agent_source_events_accepted_total", source="drop") == 0
    assert (
        value(m, "edge_agent_source_events_rejected_total", source="mes", reason="invalid_json")
        == 2
    )
    assert value(m, "edge_agent_source_events_rejected_total", source="mes", reason="schema") == 1
    assert value(m, "edge_agent_source_duplicates_total", source="mes") == 5
    assert value(m, "edge_agent_source_duplicates_total", source="drop") == 0
    opc = {"source": "line1"}
    assert value(m, "edge_agent_source_items_configured", **opc) == 120
    assert value(m, "edge_agent_source_items_monitored", **opc) == 118
    assert value(m, "edge_agent_source_failed_nodes", **opc) == 2
    assert value(m, "edge_agent_source_notifications_total", **opc) == 90_000
    assert value(m, "edge_agent_source_notifications_per_second", **opc) == 450.5
    assert value(m, "edge_agent_source_bad_or_uncertain_values_total", **opc) == 7
    assert value(m, "edge_agent_source_server_queue_overflows_total", **opc) == 1
    assert value(m, "edge_agent_source_lost_in_flight_total", **opc) == 0
    assert value(m, "edge_agent_source_reconnects_total", **opc) == 2
    assert value(m, "edge_agent_source_pending", **opc) == 3
    assert value(m, "edge_agent_source_backfilled_total", **opc) == 12
    assert value(m, "edge_agent_source_backfill_errors", **opc) == 0
    assert value(m, "edge_agent_source_held_back", **opc) == 0
    assert value(m, "edge_agent_source_held_back", source="drop") == 1
    # text fields (endpoint, mapping_error, last_error dicts) are not numbers: not exported
    assert not any("endpoint" in k[0] or "mapping_error" in k[0] for k in m)
    # nothing OPC UA-only is invented for a source that does not report it
    assert ("edge_agent_source_items_monitored", frozenset({("source", "mes")})) not in m

    # a source with an odd or missing detail does not break the scrape
    state.snapshot["sources"][1]["detail"] = None
    state.snapshot["sources"][2]["detail"] = {"accepted": "many", "rejected": {"x": None}}
    m = samples((await client.get("/metrics")).text)
    assert value(m, "edge_agent_status_ok") == 1
    assert ("edge_agent_source_events_accepted_total", frozenset({("source", "mes")})) not in m
    assert value(m, "edge_agent_source_events_rejected_total", source="drop", reason="x") == 0


async def test_states_are_enum_gauges(served) -> None:
    """Issue 10: one series per state, 1 for the current; a transition changes values only."""
    _, state, client = served

    def series(m: dict, name: str, **fixed: str) -> dict[str, float]:
        out = {}
        for (n, labels), v in m.items():
            d = dict(labels)
            if n == name and all(d.get(k) == x for k, x in fixed.items()):
                out[d["state"]] = v
        return out

    cases = [
        ("edge_agent_sink_state", {"sink": "central", "type": "https"}, SINK_STATES,
         lambda st: state.snapshot["sinks"][0].__setitem__("state", st)),
        ("edge_agent_source_state", {"source": "line1", "type": "opcua"}, SOURCE_STATES,
         lambda st: state.snapshot["sources"][0].__setitem__("state", st)),
        ("edge_agent_forwarder_state", {"stream": "line1", "sink": "central"}, FORWARDER_STATES,
         lambda st: state.snapshot["streams"][0].__setitem__("state", st)),
    ]  # fmt: skip
    for name, fixed, states, set_state in cases:
        for st in states:
            set_state(st)
            m = samples((await client.get("/metrics")).text)
            got = series(m, name, **fixed)
            assert set(got) == set(states), f"{name}: {sorted(got)}"
            assert got == {x: (1.0 if x == st else 0.0) for x in states}, (name, st, got)
        # a state the list does not know (a newer adapter) is shown, not hidden
        set_state("draining")
        got = series(samples((await client.get("/metrics")).text), name, **fixed)
        assert got["draining"] == 1 and sum(got.values()) == 1 and len(got) == len(states) + 1


async def test_no_created_series_and_process_metrics(served) -> None:
    server, _, client = served
    server.observe_batch("line1", "central", 0.03, 500, "accepted")
    text = (await client.get("/metrics")).text
    assert "_created" not in text
    m = samples(text)
    assert value(m, "edge_agent_batches_total", stream="line1", sink="central",
                 outcome="accepted") == 1  # fmt: skip
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):  # fmt: skip
        assert value(m, name) > 0, name
    assert any(k[0] == "python_info" for k in m)


async def test_states_up_or_down(served) -> None:
    """Up is decided per kind: sources, sinks and forwarders name their states differently."""
    _, state, client = served
    m = samples((await client.get("/metrics")).text)
    src = {"source": "drop", "type": "drop_folder", "stream": "mes"}
    assert value(m, "edge_agent_source_connected", **src) == 1  # finished is not down
    lv = {"stream": "line1", "sink": "central"}
    assert value(m, "edge_agent_forwarder_state", state="retrying", **lv) == 1
    assert value(m, "edge_agent_forwarder_up", **lv) == 0
    assert value(m, "edge_agent_forwarder_state", stream="mes", sink="central", state="idle") == 1
    assert value(m, "edge_agent_forwarder_up", stream="mes", sink="central") == 1

    expect = {
        "source": {"connected": 1, "listening": 1, "finished": 1, "starting": 0,
                   "disconnected": 0, "auth_failed": 0, "error": 0, "stopped": 0},
        "sink": {"connected": 1, "disconnected": 0, "auth_failed": 0, "error": 0,
                 "stopped": 0, "starting": 0},
        "forwarder": {"idle": 1, "sending": 1, "retrying": 0, "auth_failed": 0, "error": 0,
                      "stopped": 0},
    }  # fmt: skip
    for kind, states in expect.items():
        for st, up in states.items():
            if kind == "source":
                state.snapshot["sources"][0]["state"] = st
            elif kind == "sink":
                state.snapshot["sinks"][0]["state"] = st
            else:
                state.snapshot["streams"][0]["state"] = st
            m = samples((await client.get("/metrics")).text)
            if kind == "source":
                got = value(m, "edge_agent_source_connected", source="line1", type="opcua",
                            stream="line1")  # fmt: skip
            elif kind == "sink":
                got = value(m, "edge_agent_sink_connected", sink="central", type="https")
                assert value(m, "edge_agent_sink_state", sink="central", type="https", state=st)
            else:
                got = value(m, "edge_agent_forwarder_up", **lv)
                assert value(m, "edge_agent_forwarder_state", state=st, **lv) == 1
            assert got == up, f"{kind} state {st}: up={got}, expected {up}"


async def test_batch_histogram_and_outcomes(served) -> None:
    server, _, client = served
    server.observe_batch("line1", "central", 0.03, 500, "accepted")
    server.observe_batch("line1", "central", 0.2, 500, "accepted")
    server.observe_batch("line1", "central", 12.0, 10, "retry")
    m = samples((await client.get("/metrics")).text)
    lv = {"stream": "line1", "sink": "central"}
    assert value(m, "edge_agent_batch_latency_seconds_count", **lv) == 3
    assert value(m, "edge_agent_batch_latency_seconds_sum", **lv) == pytest.approx(12.23)
    assert value(m, "edge_agent_batch_latency_seconds_bucket", le="0.05", **lv) == 1
    assert value(m, "edge_agent_batch_latency_seconds_bucket", le="+Inf", **lv) == 3
    assert value(m, "edge_agent_batches_total", outcome="accepted", **lv) == 2
    assert value(m, "edge_agent_batches_total", outcome="retry", **lv) == 1
    assert value(m, "edge_agent_batch_events_total", outcome="accepted", **lv) == 1000


async def test_healthz_and_readyz(served) -> None:
    _, state, client = served
    assert (await client.get("/healthz")).status_code == 200
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    state.ready = (False, {"sinks": {"central": "retrying"}})
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "sinks": {"central": "retrying"}}
    assert (await client.get("/healthz")).status_code == 200  # alive, just not ready


async def test_snapshot_failure_still_answers(served) -> None:
    _, state, client = served
    state.fail = True
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert value(samples(r.text), "edge_agent_status_ok") == 0


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = MetricsServer(f"127.0.0.1:{port}", dict, lambda: (True, {}))
        with pytest.raises(OSError, match=r"metrics: cannot listen on 127\.0\.0\.1:\d+.*listen"):
            await server.start()
        await server.stop()


async def test_stop_closes_the_port() -> None:
    port = _free_port()
    server = MetricsServer(f"127.0.0.1:{port}", dict, lambda: (True, {}))
    await server.start()
    assert server.port == port
    await server.stop()
    await server.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as c:
            await c.get(f"http://127.0.0.1:{port}/healthz")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("9464")


# --------------------------------------------------------------------------- real agent

STREAM_KEYS = (
    "ingested_total",
    "forwarded_total",
    "dropped_total",
    "dead_lettered_total",
    "backlog_events",
    "backlog_bytes",
    "dead_letters",
    "last_sequence",
    "forwarded_sequence",
)


def _status(exe: Path, cfg: Path) -> dict[str, Any]:
    res = subprocess.run(
        [str(exe), "status", "--json", "-c", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def _stream_numbers(status: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {s["stream"]: tuple(s[k] for k in STREAM_KEYS) for s in status["streams"]}


async def test_running_agent_metrics_equal_status(tmp_path: Path) -> None:
    """The real agent: MES events in, sink down; /metrics over HTTP == `status --json`."""
    exe = Path(sys.executable).with_name("edge-agent")
    assert exe.exists(), "edge-agent console script missing: `.venv/bin/pip install -e .`"
    mes_port, metrics_port, sink_port = _free_port(), _free_port(), _free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[agent]
id = "metrics-test"
plant = "p1"
[buffer]
path = "{tmp_path / "buffer.db"}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[sinks.central]
type = "https"
url = "http://127.0.0.1:{sink_port}/v1/batches"
[sources.mes]
type = "mes_http"
listen = "127.0.0.1:{mes_port}"
""",
        encoding="utf-8",
    )
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once; no waiting here
        [str(exe), "run", "-c", str(cfg), "--log-format", "json"], stdout=log, stderr=log
    )
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            base = f"http://127.0.0.1:{metrics_port}"
            for _ in range(100):
                try:
                    if (await client.get(f"{base}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, (tmp_path / "agent.log").read_text()
                await asyncio.sleep(0.1)
            events = [
                {
                    "type": "mfg.production.completed",
                    "time": "2026-11-23T10:15:02.123Z",
                    "id": f"MES-{i}",
                    "data": {
                        "work_order": f"WO-{i}",
                        "item": "PN-100",
                        "good": {"value": i, "uom": "EA"},
                    },
                }
                for i in range(25)
            ]
            r = await client.post(f"http://127.0.0.1:{mes_port}/v1/events", json=events)
            assert r.status_code == 202, r.text
            # wait until status is stable (heartbeat written, nothing moving)
            previous: dict[str, Any] = {}
            for _ in range(40):
                await asyncio.sleep(0.5)
                status = await asyncio.to_thread(_status, exe, cfg)
                if status["agent"]["running"] and _stream_numbers(status) == previous:
                    break
                previous = _stream_numbers(status)
            m = samples((await client.get(f"{base}/metrics")).text)
            after = await asyncio.to_thread(_status, exe, cfg)
            assert _stream_numbers(after) == previous, "status still moving"
            assert (await client.get(f"{base}/readyz")).status_code == 503  # sink is down
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()

    (mes,) = [s for s in after["streams"] if s["stream"] == "mes"]
    assert mes["ingested_total"] >= 25 and mes["forwarded_total"] == 0
    for st in after["streams"]:
        lv = {"stream": st["stream"], "sink": st["sink"]}
        assert value(m, "edge_agent_events_ingested_total", **lv) == st["ingested_total"]
        assert value(m, "edge_agent_events_forwarded_total", **lv) == st["forwarded_total"]
        assert value(m, "edge_agent_backlog_events", **lv) == st["backlog_events"]
        assert value(m, "edge_agent_backlog_bytes", **lv) == st["backlog_bytes"]
        assert value(m, "edge_agent_last_sequence", **lv) == st["last_sequence"]
        assert value(m, "edge_agent_dead_letters", **lv) == st["dead_letters"]
    assert value(m, "edge_agent_buffer_max_bytes") == after["buffer"]["max_bytes"]
    assert value(m, "edge_agent_buffer_used_bytes") == after["buffer"]["used_bytes"]
    for src in after["sources"]:
        assert (
            value(
                m,
                "edge_agent_source_state",
                source=src["name"],
                type=src["type"],
                state=src["state"],
            )
            == 1
        )
    for sink in after["sinks"]:
        lv = {"sink": sink["name"], "type": sink["type"]}
        assert value(m, "edge_agent_sink_connected", **lv) == (sink["state"] == "connected")
        assert value(m, "edge_agent_sink_state", state=sink["state"], **lv) == 1
    # a real agent's scrape: the process collector, no _created series
    assert value(m, "process_resident_memory_bytes") > 0
    assert not [k for k in m if k[0].endswith("_created")]


# --------------------------------------------------------------------------- alert rules

RULES = Path(__file__).resolve().parents[2] / "docs" / "prometheus-rules.yml"

RULES_TEST = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'edge_agent_oldest_unsent_age_seconds{{instance="a",stream="line1",sink="c"}}'
        values: '0x5 1000+60x30'
      - series: 'edge_agent_oldest_unsent_age_seconds{{instance="a",stream="mes",sink="c"}}'
        values: '0x40'
      - series: 'edge_agent_buffer_full_in_seconds{{instance="a"}}'
        values: 'Inf Inf Inf Inf Inf Inf Inf Inf Inf Inf Inf 3600x30'
      - series: 'edge_agent_source_connected{{instance="a",source="plc1",type="opcua",stream="line1"}}'
        values: '1x5 0x30'
      - series: 'edge_agent_events_dead_lettered_total{{instance="a",stream="line1",sink="c"}}'
        values: '0x10 3x30'
      - series: 'edge_agent_sink_connected{{instance="a",sink="c",type="https"}}'
        values: '0x40'
      - series: 'edge_agent_sink_state{{instance="a",sink="c",type="https",state="disconnected"}}'
        values: '1x40'
      - series: 'edge_agent_sink_state{{instance="a",sink="c",type="https",state="auth_failed"}}'
        values: '0x40'
      - series: 'edge_agent_sink_connected{{instance="a",sink="d",type="mqtt"}}'
        values: '1x5 0x35'
      - series: 'edge_agent_sink_state{{instance="a",sink="d",type="mqtt",state="connected"}}'
        values: '1x5 0x35'
      - series: 'edge_agent_sink_state{{instance="a",sink="d",type="mqtt",state="auth_failed"}}'
        values: '0x5 1x35'
    alert_rule_test:
      - eval_time: 8m
        alertname: EdgeAgentBufferFullSoon
        exp_alerts: []
      - eval_time: 30m
        alertname: EdgeAgentBufferFullSoon
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a}}
      - eval_time: 30m
        alertname: EdgeAgentBufferFullVerySoon
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a}}
      - eval_time: 15m
        alertname: EdgeAgentBacklogOld
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, stream: line1, sink: c}}
      - eval_time: 15m
        alertname: EdgeAgentSourceDown
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, source: plc1, type: opcua, stream: line1}}
      - eval_time: 3m
        alertname: EdgeAgentSourceDown
        exp_alerts: []
      - eval_time: 12m
        alertname: EdgeAgentDeadLetters
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, stream: line1, sink: c}}
      - eval_time: 12m
        alertname: EdgeAgentSinkDown
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, sink: c}}
      - eval_time: 20m
        alertname: EdgeAgentSinkDown
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, sink: c}}
          - exp_labels: {{severity: warning, instance: a, sink: d}}
      - eval_time: 5m
        alertname: EdgeAgentCredentialsRefused
        exp_alerts: []
      - eval_time: 10m
        alertname: EdgeAgentCredentialsRefused
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a, sink: d, type: mqtt}}
"""


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise AssertionError(
            "promtool not found: `apt-get install --no-install-recommends prometheus` "
            "(or put promtool from a Prometheus release on PATH)"
        )
    return path


def test_alert_rules_are_valid() -> None:
    res = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_rules_fire_on_the_agents_series(tmp_path: Path) -> None:
    """The documented alerts fire (and stay quiet) on series shaped like the agent's.

    promtool compares annotations too; they are prose (their templates are checked by
    `promtool check rules`), so the expressions are tested on a copy without them.
    """
    text = RULES.read_text(encoding="utf-8")
    logic = re.sub(r"(?m)^ {8}annotations:\n(?: {10}\S.*\n)*", "", text)
    assert "annotations" not in logic and logic.count("- alert:") == text.count("- alert:")
    rules = tmp_path / "rules.yml"
    rules.write_text(logic, encoding="utf-8")
    test_file = tmp_path / "rules_test.yml"
    test_file.write_text(RULES_TEST.format(rules=json.dumps(str(rules))), encoding="utf-8")
    res = subprocess.run(
        [_promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr

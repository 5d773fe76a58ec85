"""Prometheus metrics, ``/healthz`` and ``/readyz`` on one small aiohttp server.

Almost every metric is built *at scrape time* from the same status snapshot that
``edge-agent status --json`` prints, so a dashboard and the operator's table can never
disagree: there is one source of numbers, not two sets of counters kept in step. The only
live instruments are the batch latency histogram and the batch outcome counters, which
need every observation rather than a point-in-time value (:meth:`MetricsServer.observe_batch`).

Exposed (all ``edge_agent_*``; see docs/alerts.md for the alert rules built on them):

=========================================== ======= ==========================================
metric                                      type    labels
=========================================== ======= ==========================================
info                                        info    version, agent_id, plant
running, heartbeat_age_seconds              gauge
status_ok                                   gauge   (0 when the snapshot could not be taken)
events_ingested_total / _forwarded_total    counter stream, sink
events_dropped_total / _dead_lettered_total counter stream, sink
events_refused_total                        counter stream, sink
buffer_refused_total                        counter
backlog_events, backlog_bytes               gauge   stream, sink, priority
oldest_unsent_age_seconds                   gauge   stream, sink (0 when nothing is unsent)
dead_letters                                gauge   stream, sink
last_sequence, forwarded_sequence           gauge   stream, sink
last_forwarded_timestamp_seconds            gauge   stream, sink
forwarder_state                             gauge   stream, sink, state (enum, see below)
forwarder_up                                gauge   stream, sink (1 idle/sending, else 0)
source_connected                            gauge   source, type, stream (1 up / 0 down)
source_state                                gauge   source, type, state (enum, see below)
source_events_accepted_total                counter source
source_events_rejected_total                counter source, reason
source_duplicates_total                     counter source
source_* (OPC UA detail, see SOURCE_DETAIL) mixed   source
sink_connected                              gauge   sink, type (1 connected / 0 otherwise)
sink_state                                  gauge   sink, type, state (enum, see below)
buffer_file_bytes, _used_bytes, _max_bytes  gauge
buffer_ingest_rate_events_per_second        gauge
buffer_full_in_seconds                      gauge   +Inf when the buffer is not filling
batch_latency_seconds                       histo   stream, sink (send round trip per batch)
batches_total, batch_events_total           counter stream, sink, outcome
process_*, python_info, python_gc_*         mixed   the standard process and runtime collectors
=========================================== ======= ==========================================

The ``*_state`` gauges are enums (the prometheus-client ``Enum`` shape): one series per
known state (SINK_STATES, SOURCE_STATES, FORWARDER_STATES), 1 for the current one and 0 for
the others, so a series never changes its labels when the state changes: ``for:`` clauses,
``changes()`` and recording rules keep working across a transition. A state outside the
known list (a newer adapter) is added as one more series, never hidden. No ``_created``
series: counters here restart from the buffer's values, and a creation time would only
double the number of series.

``buffer_full_in_seconds`` is the same forecast as status' "buffer full in ~31 h": used and
free bytes against the recent ingest rate. When the buffer is not filling (status shows
``full_in_s: null``) the gauge is ``+Inf``, so ``edge_agent_buffer_full_in_seconds < 6*3600``
alerts only while an outage is really eating the disk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from agent.interfaces import UP_STATES as UP
from agent.interfaces import State, is_up
from agent.status_model import (
    AgentInfo,
    BufferInfo,
    SinkStatus,
    SourceStatus,
    StatusSnapshot,
    StreamStatus,
)

log = logging.getLogger("edge_agent.metrics")

__all__ = [
    "DEFAULT_LISTEN",
    "LATENCY_BUCKETS",
    "FORWARDER_STATES",
    "FORWARDER_UP_STATES",
    "SINK_STATES",
    "SINK_UP_STATES",
    "SOURCE_DETAIL",
    "SOURCE_STATES",
    "SOURCE_UP_STATES",
    "UP_STATES",
    "MetricsServer",
    "SnapshotCollector",
    "parse_listen",
]

DEFAULT_LISTEN = "127.0.0.1:9464"
#: seconds a scrape in progress gets when the server stops
SHUTDOWN_TIMEOUT = 0.5

#: "Up" (1) in source_connected, sink_connected and forwarder_up is the one rule of
#: agent.interfaces.is_up: connected, listening (a server source waiting for peers),
#: finished (a bounded run is done, not down), idle and sending. Every other state is down.
UP_STATES = UP

#: The enum gauges' states, per kind: every one is exported, 1 for the current, 0 otherwise.
SINK_STATES: tuple[str, ...] = tuple(
    s.value
    for s in (State.STARTING, State.CONNECTED, State.DISCONNECTED, State.AUTH_FAILED,
              State.ERROR, State.STOPPED)
)  # fmt: skip
SOURCE_STATES: tuple[str, ...] = tuple(
    s.value
    for s in (State.STARTING, State.CONNECTED, State.LISTENING, State.DISCONNECTED,
              State.AUTH_FAILED, State.ERROR, State.FINISHED, State.STOPPED)
)  # fmt: skip
FORWARDER_STATES: tuple[str, ...] = tuple(
    s.value
    for s in (State.IDLE, State.SENDING, State.RETRYING, State.AUTH_FAILED, State.ERROR,
              State.STOPPED)
)  # fmt: skip
#: The up states of each kind (all from the one rule), kept for callers of the old names.
SOURCE_UP_STATES = frozenset(s for s in SOURCE_STATES if is_up(s))
SINK_UP_STATES = frozenset(s for s in SINK_STATES if is_up(s))
FORWARDER_UP_STATES = frozenset(s for s in FORWARDER_STATES if is_up(s))


def _enum(fam: GaugeMetricFamily, labels: list[str], current: str, states: Iterable[str]) -> None:
    """One series per state, 1 for ``current`` (added when it is not a known state)."""
    known = list(states)
    if current and current not in known:
        known.append(current)
    for st in known:
        fam.add_metric([*labels, st], 1 if st == current else 0)


#: Numeric ``sources[].detail`` keys exported per source, beyond accepted / rejected /
#: duplicates: (detail key, metric name, kind, help). A dict value counts its entries
#: (failed_nodes: node -> error), a bool is 0/1. Keys a source does not report are skipped.
SOURCE_DETAIL: tuple[tuple[str, str, str, str], ...] = (
    ("items_configured", "edge_agent_source_items_configured", "gauge",
     "OPC UA items in the config"),
    ("items_monitored", "edge_agent_source_items_monitored", "gauge",
     "OPC UA items the server accepted for monitoring"),
    ("failed_nodes", "edge_agent_source_failed_nodes", "gauge",
     "OPC UA nodes the server refused (see status for the reasons)"),
    ("notifications_total", "edge_agent_source_notifications", "counter",
     "OPC UA data change notifications received"),
    ("notifications_per_second", "edge_agent_source_notifications_per_second", "gauge",
     "OPC UA notifications per second, recent"),
    ("bad_or_uncertain_values", "edge_agent_source_bad_or_uncertain_values", "counter",
     "OPC UA samples with a Bad or Uncertain status code"),
    ("server_queue_overflows", "edge_agent_source_server_queue_overflows", "counter",
     "OPC UA server-side queue overflows (samples lost at the server)"),
    ("lost_in_flight", "edge_agent_source_lost_in_flight", "counter",
     "OPC UA samples lost between the subscription and the buffer (reconnects)"),
    ("reconnects", "edge_agent_source_reconnects", "counter",
     "Reconnects to the source's peer"),
    ("pending", "edge_agent_source_pending", "gauge",
     "Samples received and not yet committed to the buffer"),
    ("unmapped_values", "edge_agent_source_unmapped_values", "counter",
     "Values with no mapping (e.g. a machine state code not in states)"),
    ("backfilled", "edge_agent_source_backfilled", "counter",
     "Events recovered by history backfill after an outage"),
    ("backfill_errors", "edge_agent_source_backfill_errors", "gauge",
     "Nodes whose history backfill failed"),
    ("held_back_by_full_buffer", "edge_agent_source_held_back", "gauge",
     "1 while the source holds back input because the buffer is full"),
    ("held_back", "edge_agent_source_held_back", "gauge",
     "1 while the source holds back input because the buffer is full"),
)  # fmt: skip

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: returns the status snapshot (typed; a schema-1 dict is read with StatusSnapshot.from_dict)
Snapshot = Callable[[], StatusSnapshot | Mapping[str, Any]]
Readiness = Callable[[], tuple[bool, dict[str, Any]]]


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` / ``"[::1]:9464"`` / ``"0.0.0.0:0"`` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics.listen '{listen}' must be HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]"), int(port)


def _num(value: Any, default: float = 0.0) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _detail_num(value: Any) -> float | None:
    """A detail value as a number: bool -> 0/1, dict/list -> its size, else float or None."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, dict | list | tuple):
        return float(len(value))
    if isinstance(value, int | float):
        return float(value)
    return None


class SnapshotCollector(Collector):
    """Turns one status snapshot into metric families, on every scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Any]:
        # Unchecked collector: families depend on the snapshot, not known at registration.
        return []

    def collect(self) -> Iterator[Any]:
        ok = GaugeMetricFamily(
            "edge_agent_status_ok", "1 when the status snapshot behind these metrics was taken"
        )
        try:
            snap = StatusSnapshot.of(self._snapshot())
        except Exception:  # a scrape must still answer, and say the numbers are missing
            log.exception("metrics: status snapshot failed")
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        yield from self._agent(snap.agent)
        yield from self._buffer(snap.buffer)
        yield from self._streams(snap.streams)
        yield from self._sources(snap.sources)
        yield from self._sinks(snap.sinks)

    @staticmethod
    def _agent(agent: AgentInfo) -> Iterator[Any]:
        info = InfoMetricFamily("edge_agent", "Agent build and identity", labels=[])
        info.add_metric([], {"version": agent.version, "agent_id": agent.id, "plant": agent.plant})
        yield info
        running = GaugeMetricFamily("edge_agent_running", "1 while the agent runtime is running")
        running.add_metric([], 1 if agent.running else 0)
        yield running
        if agent.heartbeat_age_s is not None:
            hb = GaugeMetricFamily(
                "edge_agent_heartbeat_age_seconds", "Seconds since the runtime last heartbeat"
            )
            hb.add_metric([], agent.heartbeat_age_s)
            yield hb

    @staticmethod
    def _buffer(buf: BufferInfo) -> Iterator[Any]:
        for value, name, doc in (
            (buf.file_bytes, "edge_agent_buffer_file_bytes", "Size of the buffer file on disk"),
            (buf.used_bytes, "edge_agent_buffer_used_bytes", "Bytes of unsent and kept events"),
            (buf.max_bytes, "edge_agent_buffer_max_bytes", "buffer.max_bytes from the config"),
            (
                buf.ingest_rate_eps,
                "edge_agent_buffer_ingest_rate_events_per_second",
                "Recent ingest rate into the buffer",
            ),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        c = CounterMetricFamily(
            "edge_agent_buffer_refused",
            "Events refused because the buffer was full (on_full = block)",
        )
        c.add_metric([], float(buf.refused_total))
        yield c
        g = GaugeMetricFamily(
            "edge_agent_buffer_full_in_seconds",
            "Forecast seconds until the buffer is full at the recent ingest rate "
            "(+Inf when it is not filling)",
        )
        g.add_metric([], math.inf if buf.full_in_s is None else buf.full_in_s)
        yield g

    @staticmethod
    def _streams(streams: Iterable[StreamStatus]) -> Iterator[Any]:
        labels = ["stream", "sink"]
        counters = {
            key: CounterMetricFamily(f"edge_agent_events_{name}", doc, labels=labels)
            for key, name, doc in (
                ("ingested_total", "ingested", "Events committed to the buffer"),
                ("forwarded_total", "forwarded", "Events accepted by the sink"),
                ("dropped_total", "dropped", "Events dropped (buffer full, drop_oldest)"),
                ("dead_lettered_total", "dead_lettered", "Events the sink rejected for good"),
                ("refused_total", "refused", "Events refused at ingest (buffer full, block)"),
            )
        }
        gauges = {
            key: GaugeMetricFamily(f"edge_agent_{name}", doc, labels=labels)
            for key, name, doc in (
                ("backlog_events", "backlog_events", "Events buffered and not yet forwarded"),
                ("backlog_bytes", "backlog_bytes", "Bytes buffered and not yet forwarded"),
                (
                    "oldest_unsent_age_s",
                    "oldest_unsent_age_seconds",
                    "Age of the oldest event not yet forwarded (0 when none)",
                ),
                ("dead_letters", "dead_letters", "Events held in the dead-letter table"),
                ("last_sequence", "last_sequence", "Highest sequence committed"),
                ("forwarded_sequence", "forwarded_sequence", "Highest sequence forwarded"),
            )
        }
        last_fwd = GaugeMetricFamily(
            "edge_agent_last_forwarded_timestamp_seconds",
            "Unix time of the last accepted batch",
            labels=labels,
        )
        fwd_state = GaugeMetricFamily(
            "edge_agent_forwarder_state",
            "Stream forwarder state as an enum: one series per state, 1 for the current "
            "(idle, sending, retrying, auth_failed, error, stopped)",
            labels=[*labels, "state"],
        )
        fwd_up = GaugeMetricFamily(
            "edge_agent_forwarder_up",
            "1 while the stream forwarder is idle or sending, 0 when retrying, "
            "auth_failed, error or stopped",
            labels=labels,
        )
        for s in streams:
            lv = [s.stream, s.sink]
            if s.state is not None:
                _enum(fwd_state, lv, s.state, FORWARDER_STATES)
                fwd_up.add_metric(lv, 1 if s.up else 0)
            for key, counter in counters.items():
                counter.add_metric(lv, _num(getattr(s, key)))
            for key, gauge in gauges.items():
                gauge.add_metric(lv, _num(getattr(s, key)))
            ts = _timestamp(s.last_forwarded_at)
            if ts is not None:
                last_fwd.add_metric(lv, ts)
        yield from counters.values()
        yield from gauges.values()
        yield last_fwd
        yield fwd_state
        yield fwd_up

    @staticmethod
    def _sources(sources: Iterable[SourceStatus]) -> Iterator[Any]:
        connected = GaugeMetricFamily(
            "edge_agent_source_connected",
            "1 when the source is connected (or listening), else 0",
            labels=["source", "type", "stream"],
        )
        state = GaugeMetricFamily(
            "edge_agent_source_state",
            "Source state as an enum: one series per state, 1 for the current",
            labels=["source", "type", "state"],
        )
        accepted = CounterMetricFamily(
            "edge_agent_source_events_accepted",
            "Events the source committed to the buffer (duplicates not counted)",
            labels=["source"],
        )
        rejected = CounterMetricFamily(
            "edge_agent_source_events_rejected",
            "Input the source refused, by reason (malformed, unmapped, too large, ...)",
            labels=["source", "reason"],
        )
        duplicates = CounterMetricFamily(
            "edge_agent_source_duplicates",
            "Input the buffer recognised as already committed (redelivery, re-import)",
            labels=["source"],
        )
        extra: dict[str, Any] = {}
        for s in sources:
            name = s.name
            connected.add_metric([name, s.type, s.stream], 1 if s.up else 0)
            _enum(state, [name, s.type], s.state, SOURCE_STATES)
            detail = s.detail
            # OPC UA reports what it committed as events_committed; the others as accepted
            acc = detail.get("accepted", detail.get("events_committed"))
            if isinstance(acc, int | float) and not isinstance(acc, bool):
                accepted.add_metric([name], _num(acc))
            if isinstance(detail.get("rejected"), dict):
                for reason, n in sorted(detail["rejected"].items()):
                    rejected.add_metric([name, _s(reason)], _num(n))
            if isinstance(detail.get("duplicates"), int | float):
                duplicates.add_metric([name], _num(detail["duplicates"]))
            for key, metric, kind, doc in SOURCE_DETAIL:
                v = _detail_num(detail.get(key))
                if v is None:
                    continue
                fam = extra.get(metric)
                if fam is None:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    fam = extra[metric] = cls(metric, doc, labels=["source"])
                if not any(x.labels.get("source") == name for x in fam.samples):
                    fam.add_metric([name], v)
        yield connected
        yield state
        yield accepted
        yield rejected
        yield duplicates
        yield from extra.values()

    @staticmethod
    def _sinks(sinks: Iterable[SinkStatus]) -> Iterator[Any]:
        fam = GaugeMetricFamily(
            "edge_agent_sink_connected",
            "1 when the sink is connected, else 0 (edge_agent_sink_state says which state)",
            labels=["sink", "type"],
        )
        state = GaugeMetricFamily(
            "edge_agent_sink_state",
            "Sink state as an enum: one series per state, 1 for the current "
            "(auth_failed: the central side refuses our credentials)",
            labels=["sink", "type", "state"],
        )
        for s in sinks:
            lv = [s.name, s.type]
            fam.add_metric(lv, 1 if s.up else 0)
            _enum(state, lv, s.state, SINK_STATES)
        yield fam
        yield state


class MetricsServer:
    """Serves /metrics, /healthz and /readyz; owns its own CollectorRegistry.

    ``snapshot`` returns the status snapshot (the dict ``status --json`` prints); ``ready``
    returns ``(is_ready, detail)``. Both are called on the event loop, per request, so they
    must be cheap and must not block. Lifecycle: ``await start()`` binds (raising OSError if
    the port is taken), ``await stop()`` closes; both idempotent.
    """

    def __init__(self, listen: str, snapshot: Snapshot, ready: Readiness) -> None:
        self._host, self._port = parse_listen(listen)
        self._snapshot = snapshot
        self._ready = ready
        # No *_created series (see the module docstring); prometheus-client's switch is
        # process-wide, and this process serves no other registry.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client: untyped
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, _resident_...
        PlatformCollector(registry=self.registry)  # python_info
        GCCollector(registry=self.registry)
        self._latency = Histogram(
            "edge_agent_batch_latency_seconds",
            "Seconds from sending a batch to the sink's answer",
            ["stream", "sink"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batches = Counter(
            "edge_agent_batches",
            "Batches sent, by outcome (accepted, retry, rejected, error)",
            ["stream", "sink", "outcome"],
            registry=self.registry,
        )
        self._batch_events = Counter(
            "edge_agent_batch_events",
            "Events in batches sent, by outcome",
            ["stream", "sink", "outcome"],
            registry=self.registry,
        )
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._bound_port: int | None = None

    # -- live instruments ----------------------------------------------------------------

    def observe_batch(
        self, stream: str, sink: str, seconds: float, events: int, outcome: str
    ) -> None:
        """Record one batch send: its latency and its outcome."""
        self._latency.labels(stream, sink).observe(max(0.0, seconds))
        self._batches.labels(stream, sink, outcome).inc()
        self._batch_events.labels(stream, sink, outcome).inc(max(0, events))

    # -- HTTP ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen = "127.0.0.1:0"``)."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def render(self) -> bytes:
        """The Prometheus text exposition (what GET /metrics returns)."""
        return generate_latest(self.registry)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready, detail = self._ready()
        except Exception as exc:
            log.exception("readiness check failed")
            ready, detail = False, {"error": f"readiness check failed: {exc}"}
        body = orjson.dumps({"ready": bool(ready), **detail}, default=str)
        return web.Response(
            body=body, status=200 if ready else 503, content_type="application/json"
        )

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        # a scrape in progress at stop gets half a second: the metrics server's part of the
        # stop budget's "service" share (agent/lifecycle.py); aiohttp's default is 60 s
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno,
                f"metrics: cannot listen on {self._host}:{self._port}: {exc.strerror} "
                "(another process uses the port? change [metrics] listen or set enabled = false)",
            ) from exc
        self._runner, self._site = runner, site
        addresses = runner.addresses  # the bound sockets' names: the real port for port 0
        if addresses:
            self._bound_port = addresses[0][1]
        log.info("metrics on %s/metrics", self.url)

    async def stop(self) -> None:
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

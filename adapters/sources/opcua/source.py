"""The OPC UA source: subscriptions in, grouped buffer appends out, reconnect forever.

Data flow and why::

    server ──Publish──▶ lean_publish (the session's decode: data changes as tuples)
                          ▼
                       _on_publish (asyncua's publish loop)
                          │ one call per PublishResponse, no task per notification
                          ▼
                     bounded asyncio.Queue (max_pending notifications)
                          │ full: _on_publish awaits, so the client stops sending Publish
                          │ requests and the server's per-item queues absorb (backpressure;
                          │ what the server discards there is flagged and counted)
                          ▼
                     _writer: drains up to batch_max, maps, ONE ingest.append per batch

Nothing is dropped silently: notifications in hand when a session dies are counted
(``lost_in_flight``), server-side queue overflows are counted (``server_overflows``), and the
buffer refusing an append (BufferFull) holds the writer back rather than discarding.

A session lives in ``_session``; ``_connection_loop`` reopens it with capped exponential
backoff. Loss is detected by asyncua's watchdog (a read every liveness_timeout/3), by a
bad StatusChangeNotification (subscription timed out, server shutdown), or by our own
liveness check: no publish response or keep-alive within ``liveness_timeout``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import Client, ua

from agent.errors import BufferError_, BufferFull, SourceError
from agent.interfaces import ComponentState, Ingest, NewEvent, Source

from . import lean_publish, library_logs
from .config import Config, NodeConfig
from .connection import AuthRefused, close_quietly, open_client, translate
from .mapping import NodeMapper, known, overflowed, status_name

log = logging.getLogger("edge_agent.source.opcua")
library_logs.install()

#: the most monitored items asked for in one CreateMonitoredItems call
_CREATE_CHUNK = 1000


class ConnectionLost(SourceError):
    pass


#: one queued notification: the item, then value, variant type name, status code, source
#: and server timestamp as decoded (lean_publish.Change without the handle), when received
_Record = tuple["_Item", Any, str | None, int, datetime | None, datetime | None, datetime]


@dataclass(slots=True)
class _Item:
    index: int
    node: NodeConfig
    mapper: NodeMapper | None = None
    node_id: ua.NodeId | None = None


async def resolve_node(client: Client, node: NodeConfig, ns_array: list[str]) -> ua.NodeId:
    """A configured node_id (``ns=``/``nsu=``) or browse path as the server's NodeId."""
    if node.node_id is not None:
        text = node.node_id.strip()
        if text.startswith("nsu="):
            uri, sep, rest = text[4:].partition(";")
            if not sep:
                raise SourceError(f"node_id '{text}': expected nsu=URI;s=... (or i=, g=, b=)")
            if uri not in ns_array:
                raise SourceError(
                    f"node_id '{text}': the server has no namespace '{uri}' "
                    f"(it has: {', '.join(ns_array)})"
                )
            text = f"ns={ns_array.index(uri)};{rest}"
        try:
            return ua.NodeId.from_string(text)
        except Exception as exc:  # noqa: BLE001 - asyncua raises several types
            raise SourceError(
                f"node_id '{node.node_id}' is not a NodeId (use e.g. ns=2;s=Line1.Counter)"
            ) from exc
    assert node.browse_path is not None
    parts = [p for p in node.browse_path.strip("/").split("/") if p]
    if parts and parts[0] in ("Root", "0:Root"):
        parts = parts[1:]
    path = [p if ":" in p and p.split(":", 1)[0].isdigit() else f"0:{p}" for p in parts]
    try:
        target = await client.nodes.root.get_child(path)
    except ua.UaStatusCodeError as exc:
        raise SourceError(
            f"browse_path '{node.browse_path}' not found ({status_name(int(exc.code))}); "
            "list the server's nodes with: edge-agent opcua browse ENDPOINT"
        ) from exc
    return target.nodeid


def monitoring_request(handle: int, node_id: ua.NodeId, node: NodeConfig) -> Any:
    params = ua.MonitoringParameters()
    params.ClientHandle = handle
    params.SamplingInterval = node.sampling_interval * 1000.0
    # Always explicit: 0 would mean "server default" (10,000 on an asyncua server).
    params.QueueSize = node.queue_size
    params.DiscardOldest = node.discard_oldest
    if node.deadband_type != "none":
        filt = ua.DataChangeFilter()
        filt.Trigger = ua.DataChangeTrigger.StatusValue
        filt.DeadbandType = 1 if node.deadband_type == "absolute" else 2
        filt.DeadbandValue = node.deadband
        params.Filter = filt
    rv = ua.ReadValueId()
    rv.NodeId = node_id
    rv.AttributeId = ua.AttributeIds.Value
    req = ua.MonitoredItemCreateRequest()
    req.ItemToMonitor = rv
    req.MonitoringMode = ua.MonitoringMode.Reporting
    req.RequestedParameters = params
    return req


class OpcUaSource(Source):
    """One OPC UA server, one session, one stream."""

    def __init__(self, name: str, config: Config, *, stream: str, state_dir: Path) -> None:
        self.name = name
        self.stream = stream
        self.cfg = config
        self.state_dir = state_dir
        self._items = [_Item(i, n) for i, n in enumerate(config.nodes)]
        self._handles: dict[int, _Item] = {}
        self._queue: asyncio.Queue[_Record] | None = None
        self._state = ComponentState(state="starting", since=time.time())
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._last_publish = time.monotonic()
        self._blocked = False
        # counters (monotonic, for status and metrics)
        self.notifications = 0
        self.events_committed = 0
        self.appends = 0
        self.bad_values = 0
        self.server_overflows = 0
        self.lost_in_flight = 0
        self.reconnects = 0
        self._sessions = 0
        self.monitored = 0
        self.failed_nodes: dict[str, str] = {}
        self.backfilled = 0
        self.backfill_errors: dict[str, str] = {}
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0
        self._buffer_full_since: float | None = None
        self._publish_decode = "asyncua"  # or "lean": lean_publish in the session (status)

    # ------------------------------------------------------------------ status

    def _set_state(self, state: str, error: str | None = None) -> None:
        self._state.change(state, error)

    def state(self) -> ComponentState:
        now = time.monotonic()
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            self._rate = (self.notifications - mark_n) / (now - mark_t)
            self._rate_mark = (now, self.notifications)
        q = self._queue
        mappers = [it.mapper for it in self._items if it.mapper is not None]
        self._state.detail = {
            "endpoint": self.cfg.endpoint,
            "security": f"{self.cfg.security_policy}/{self.cfg.mode}",
            "items_configured": len(self._items),
            "items_monitored": self.monitored,
            "failed_nodes": dict(self.failed_nodes),
            "notifications_total": self.notifications,
            "notifications_per_second": round(self._rate, 1),
            "events_committed": self.events_committed,
            "appends": self.appends,
            "bad_or_uncertain_values": self.bad_values,
            "server_queue_overflows": self.server_overflows,
            "lost_in_flight": self.lost_in_flight,
            "pending": q.qsize() if q is not None else 0,
            "reconnects": self.reconnects,
            "unmapped_values": sum(m.unmapped for m in mappers),
            "mapping_error": next((m.last_error for m in mappers if m.last_error), None),
            "backfilled": self.backfilled,
            "backfill_errors": dict(self.backfill_errors),
            "held_back_by_full_buffer": self._buffer_full_since is not None,
            "publish_decode": self._publish_decode,
        }
        return dataclasses.replace(self._state, detail=dict(self._state.detail))

    # ------------------------------------------------------------------ lifecycle

    async def run(self, ingest: Ingest) -> None:
        self._queue = asyncio.Queue(maxsize=self.cfg.max_pending)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer(ingest), name=f"opcua-writer-{self.name}")
                tg.create_task(self._connection_loop(), name=f"opcua-session-{self.name}")
        finally:
            self._set_state("stopped")

    async def _connection_loop(self) -> None:
        delay = self.cfg.reconnect_initial
        while True:
            started = time.monotonic()
            wait = 0.0
            try:
                await self._session()
            except AuthRefused as exc:
                self._set_state("auth_failed", str(exc))
                log.error("source %s: %s", self.name, exc)
                wait = self.cfg.auth_retry_interval
            except ConnectionLost:
                pass  # reported by _session the moment it was detected
            except SourceError as exc:
                self._disconnected(str(exc))
            except (OSError, TimeoutError, ua.UaError) as exc:
                self._disconnected(str(translate(exc, self.cfg)))
            except Exception as exc:  # noqa: BLE001 - a library quirk must not end the source
                log.exception("source %s: unexpected error in the session", self.name)
                self._set_state("error", str(translate(exc, self.cfg)))
            if not wait:
                if time.monotonic() - started > 2 * self.cfg.reconnect_max:
                    delay = self.cfg.reconnect_initial  # it was up for a while: start over
                wait = delay * (0.8 + 0.4 * random.random())  # noqa: S311 - jitter only
                delay = min(delay * 2, self.cfg.reconnect_max)
            log.info("source %s: reconnecting in %.1fs", self.name, wait)
            await asyncio.sleep(wait)

    def _disconnected(self, message: str) -> None:
        was = self._state.state
        self._set_state("disconnected", message)
        level = logging.WARNING if was == "connected" else logging.INFO
        log.log(level, "source %s: %s", self.name, message)

    async def _session(self) -> None:
        self._lost = asyncio.Event()
        self._lost_reason = ""
        client, _own = await open_client(self.cfg, self.name, self.state_dir)
        # before the subscriptions start its publish loop
        self._publish_decode = "lean" if lean_publish.install(client) else "asyncua"

        async def on_lost(exc: Exception) -> None:
            self._mark_lost(str(translate(exc, self.cfg)))

        client.connection_lost_callback = on_lost
        try:
            await self._subscribe(client)
            if self._sessions:
                self.reconnects += 1
            self._sessions += 1
            # nodes the server refused stay the last error once connected
            self._set_state("connected", self._state.last_error if self.failed_nodes else None)
            log.info(
                "source %s: connected to %s (%s), %d of %d items monitored",
                self.name,
                self.cfg.endpoint,
                f"{self.cfg.security_policy}/{self.cfg.mode}",
                self.monitored,
                len(self._items),
            )
            await self._watch()
        except ConnectionLost as exc:
            # Say so now: closing a session on a frozen server can take its whole grace.
            self.monitored = 0
            self._disconnected(str(exc))
            raise
        finally:
            self.monitored = 0
            await close_quietly(client)

    def _mark_lost(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    async def _watch(self) -> None:
        """Return never; raise ConnectionLost when the session is gone or silent."""
        step = min(1.0, self.cfg.liveness_timeout / 4)
        self._last_publish = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(step):
                    await self._lost.wait()
            except TimeoutError:
                pass
            if self._lost.is_set():
                raise ConnectionLost(self._lost_reason)
            now = time.monotonic()
            if self._blocked:
                self._last_publish = now  # we are holding the server back, not it us
            elif now - self._last_publish > self.cfg.liveness_timeout:
                raise ConnectionLost(
                    f"no publish response or keep-alive from {self.cfg.endpoint} for "
                    f"{self.cfg.liveness_timeout:g}s (liveness_timeout)"
                )

    # ------------------------------------------------------------------ subscribe

    async def _subscribe(self, client: Client) -> None:
        ns_array = await client.get_namespace_array()
        self.failed_nodes = {}
        self._handles = {}
        by_sub: dict[str, list[_Item]] = {}
        for item in self._items:
            try:
                node_id = await resolve_node(client, item.node, ns_array)
            except SourceError as exc:
                self.failed_nodes[item.node.label] = str(exc)
                log.warning("source %s: %s", self.name, exc)
                continue
            # keep a node's mapper (counter baseline, last state) across reconnects; only a
            # browse path that now leads to another node starts afresh
            if item.mapper is None or (item.node.node_id is None and item.node_id != node_id):
                item.mapper = NodeMapper(
                    item.node,
                    node_id=item.node.node_id or node_id.to_string(),
                    browse_path=item.node.browse_path,
                    attributes=self.cfg.attributes_of(item.node),
                )
            item.node_id = node_id
            by_sub.setdefault(item.node.subscription, []).append(item)
        if self._sessions:
            await self._backfill(client, [it for items in by_sub.values() for it in items])
        monitored = 0
        for sub_name, items in by_sub.items():
            sub_id = await self._create_subscription(client, sub_name)
            for start in range(0, len(items), _CREATE_CHUNK):
                chunk = items[start : start + _CREATE_CHUNK]
                params = ua.CreateMonitoredItemsParameters()
                params.SubscriptionId = sub_id
                params.TimestampsToReturn = ua.TimestampsToReturn.Both
                params.ItemsToCreate = [
                    monitoring_request(it.index + 1, it.node_id, it.node)  # type: ignore[arg-type]
                    for it in chunk
                ]
                for it in chunk:
                    self._handles[it.index + 1] = it
                results = await client.uaclient.create_monitored_items(params)
                for it, res in zip(chunk, results, strict=True):
                    if res.StatusCode.is_good():
                        monitored += 1
                        if res.RevisedQueueSize and res.RevisedQueueSize < it.node.queue_size:
                            log.warning(
                                "source %s: server revised queue_size of %s from %d to %d: "
                                "values may be discarded between publishes (counted as "
                                "server_queue_overflows)",
                                self.name,
                                it.node.label,
                                it.node.queue_size,
                                res.RevisedQueueSize,
                            )
                        continue
                    self._handles.pop(it.index + 1, None)
                    why = f"cannot monitor {it.node.label}: {res.StatusCode.name}"
                    self.failed_nodes[it.node.label] = why
                    log.warning("source %s: %s", self.name, why)
        self.monitored = monitored
        if self.failed_nodes:
            self._state.note_error(
                f"{len(self.failed_nodes)} node(s) not monitored, e.g. "
                f"{next(iter(self.failed_nodes.values()))}"
            )

    async def _backfill(self, client: Client, items: list[_Item]) -> None:
        """Read the outage gap from the server's history, before the subscriptions exist.

        For nodes with ``backfill = true``: the raw history from the last source timestamp
        collected to now (at most ``backfill_max``), merged across nodes in source-timestamp
        order and queued ahead of any new notification. Values at or before what was
        already collected are skipped, and the subscription's first value repeating the
        last backfilled one is not emitted again (NodeMapper.is_repeat).
        """
        now = datetime.now(UTC)
        earliest = now - timedelta(seconds=self.cfg.backfill_max)
        found: list[tuple[datetime, int, _Item, ua.DataValue]] = []
        for item in items:
            last = item.mapper.last_source_timestamp if item.mapper is not None else None
            if not item.node.backfill or last is None or item.node_id is None:
                continue
            start = max(last, earliest)
            try:
                values = await client.get_node(item.node_id).read_raw_history(
                    start, now, numvalues=0, return_bounds=False
                )
            except ua.UaStatusCodeError as exc:
                why = f"no backfill for {item.node.label}: {status_name(int(exc.code))}"
                self.backfill_errors[item.node.label] = why
                log.warning("source %s: %s", self.name, why)
                continue
            self.backfill_errors.pop(item.node.label, None)
            for dv in values:
                ts = dv.SourceTimestamp
                if ts is None:
                    continue
                ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
                if ts > last:
                    found.append((ts, item.index, item, dv))
        if not found:
            return
        found.sort(key=lambda f: (f[0], f[1]))
        assert self._queue is not None
        for _, _, item, dv in found:
            await self._queue.put((item, *_fields(dv), now))
        self.backfilled += len(found)
        log.info("source %s: backfilled %d values from history", self.name, len(found))

    async def _create_subscription(self, client: Client, sub_name: str) -> int:
        sub = self.cfg.subscription(sub_name)
        interval_ms = max(sub.publishing_interval * 1000.0, 1.0)
        # keep-alives at least 3 times per liveness_timeout, so silence means trouble
        keepalive = max(1, math.floor(self.cfg.liveness_timeout * 1000.0 / 3 / interval_ms))
        lifetime = max(3 * keepalive, math.ceil(self.cfg.session_timeout * 1000.0 / interval_ms))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval_ms
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = lifetime
        params.MaxNotificationsPerPublish = sub.max_notifications_per_publish
        params.PublishingEnabled = True
        params.Priority = sub.priority

        async def callback(result: ua.PublishResult) -> None:
            await self._on_publish(result)

        created = await client.uaclient.create_subscription(params, callback)
        return int(created.SubscriptionId)

    # ------------------------------------------------------------------ receive

    async def _on_publish(self, result: ua.PublishResult) -> None:
        """Called by asyncua's publish loop once per PublishResponse (or keep-alive)."""
        self._last_publish = time.monotonic()
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        received = datetime.now(UTC)
        for notif in data:
            if type(notif) is lean_publish.DataChanges:  # what lean_publish decodes
                await self._enqueue(notif.items, received)
            elif isinstance(notif, ua.DataChangeNotification):  # asyncua's decode
                changes = [(mi.ClientHandle, *_fields(mi.Value)) for mi in notif.MonitoredItems]
                await self._enqueue(changes, received)
            elif isinstance(notif, ua.StatusChangeNotification):
                status = notif.Status
                if not status.is_good():
                    self._mark_lost(f"subscription ended by {self.cfg.endpoint}: {status.name}")

    async def _enqueue(self, changes: list[lean_publish.Change], received: datetime) -> None:
        assert self._queue is not None
        queue = self._queue
        handles = self._handles
        for n, (handle, value, vt, code, src, srv) in enumerate(changes):
            item = handles.get(handle)
            if item is None:
                continue
            rec = (item, value, vt, code, src, srv, received)
            try:
                queue.put_nowait(rec)
            except asyncio.QueueFull:
                self._blocked = True
                try:
                    await queue.put(rec)
                except asyncio.CancelledError:
                    self.lost_in_flight += len(changes) - n
                    log.warning(
                        "source %s: session closed with %d notifications not yet "
                        "queued (counted as lost_in_flight)",
                        self.name,
                        len(changes) - n,
                    )
                    raise
                finally:
                    self._blocked = False

    # ------------------------------------------------------------------ commit

    async def _writer(self, ingest: Ingest) -> None:
        assert self._queue is not None
        queue = self._queue
        linger = self.cfg.batch_linger
        batch_max = self.cfg.batch_max
        # One append in flight at a time (so batches commit in order, and a refused one is
        # retried before anything after it), but the next batch is taken and mapped while
        # the previous one commits: the fsync wait no longer stalls the whole source.
        # The append in flight is a task of the writer's own group: cancelled with it.
        committing: asyncio.Task[None] | None = None
        async with asyncio.TaskGroup() as tg:
            while True:
                events = await self._next_events(queue, linger, batch_max)
                if committing is not None:
                    await committing
                    committing = None
                if events:
                    committing = tg.create_task(
                        self._append(ingest, events), name=f"opcua-append:{self.name}"
                    )

    async def _next_events(
        self,
        queue: asyncio.Queue[_Record],
        linger: float,
        batch_max: int,
    ) -> list[NewEvent]:
        """Up to batch_max queued notifications (waiting for the first, lingering a moment
        for more), mapped to events."""
        while True:
            records = [await queue.get()]
            if linger > 0 and queue.qsize() < batch_max:
                await asyncio.sleep(linger)
            while len(records) < batch_max and not queue.empty():
                records.append(queue.get_nowait())
            events: list[NewEvent] = []
            # known() once per distinct timestamp object: lean_publish gives the items of
            # one tick the same datetime objects
            src_in = srv_in = src_known = srv_known = None
            for item, value, vt, code, src, srv, received in records:
                if code:  # Good (0) is nearly every sample
                    if code & 0xC0000000:
                        self.bad_values += 1
                    if overflowed(code):
                        self.server_overflows += 1
                if src is not src_in:
                    src_in, src_known = src, known(src)
                if srv is not srv_in:
                    srv_in, srv_known = srv, known(srv)
                mapper = item.mapper
                assert mapper is not None
                events.extend(mapper.map_values(value, code, src_known, srv_known, received, vt))
            self.notifications += len(records)
            if events:
                return events

    async def _append(self, ingest: Ingest, events: list[NewEvent]) -> None:
        """Append until it sticks: a full buffer holds us (and so the server) back."""
        while True:
            try:
                await ingest.append(self.stream, events)
            except BufferFull as exc:
                if self._buffer_full_since is None:
                    self._buffer_full_since = time.monotonic()
                    log.warning("source %s: %s; holding back", self.name, exc)
                await asyncio.sleep(0.2)  # ingest.has_room() turns true when it drains
                continue
            except BufferError_ as exc:
                log.error("source %s: buffer append failed: %s; retrying in 1s", self.name, exc)
                self._state.note_error(f"buffer: {exc}")
                await asyncio.sleep(1.0)
                continue
            self._buffer_full_since = None
            self.appends += 1
            self.events_committed += len(events)
            return


def _fields(dv: ua.DataValue) -> tuple[Any, str | None, int, datetime | None, datetime | None]:
    """What the source reads from an asyncua DataValue, as lean_publish gives it."""
    variant = dv.Value
    return (
        variant.Value if variant is not None else None,
        variant.VariantType.name if variant is not None else None,
        dv.StatusCode.value if dv.StatusCode is not None else 0,
        dv.SourceTimestamp,
        dv.ServerTimestamp,
    )

"""Reference consumer for the NATS binding: read a JetStream stream into a gateway file.

The JetStream stream already holds one copy of each batch (Nats-Msg-Id dedupe); this
consumer reads it in stream order with one durable pull consumer and stores every batch
into the same SQLite file as the reference gateway (gateway/store.py), so
``edge-agent gateway report --db FILE`` proves "nothing lost, order kept" on the scaled
path exactly as on the HTTPS one: received, duplicates, gaps per stream and epoch,
checkpoints.

A message is acknowledged (AckPolicy.ALL, the last of each fetch) only after the batch is
committed to the file, so a consumer killed mid-way re-reads the tail; a batch already in
the file (same Idempotency-Key) is counted under ``replayed_batches`` and not stored again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.store import GatewayStore
from gateway.validate import BatchError, parse_batch

log = logging.getLogger("edge_agent.gateway.nats")


@dataclass
class ConsumeStats:
    messages: int = 0
    stored_batches: int = 0
    replayed_batches: int = 0
    refused: int = 0
    events: int = 0
    duplicates: int = 0
    #: (stream, epoch) -> last sequence seen, to notice a batch that overtakes another
    out_of_order_batches: int = 0
    last: dict[tuple[str, str], int] = field(default_factory=dict)
    seconds: float = 0.0


def contract_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The message's headers as parse_batch reads them (Nats-Msg-Id stands in for a
    missing Idempotency-Key: they carry the same batch id)."""
    out = dict(headers or {})
    if "Idempotency-Key" not in out and "Nats-Msg-Id" in out:
        out["Idempotency-Key"] = out["Nats-Msg-Id"]
    return out


def store_message(store: GatewayStore, headers: Mapping[str, str] | None, data: bytes,
                  stats: ConsumeStats) -> None:  # fmt: skip
    """Validate and store one JetStream message as the gateway stores one POST."""
    stats.messages += 1
    try:
        batch = parse_batch(contract_headers(headers), data)
    except BatchError as exc:
        stats.refused += 1
        store.bump("rejected_400")
        log.warning("message refused (not a contract batch): %s", exc.message)
        return
    if store.lookup_batch(batch.key) is not None:
        stats.replayed_batches += 1
        store.bump("replayed_batches")
        return
    key = (batch.stream, batch.epoch)
    if batch.first <= stats.last.get(key, 0):
        stats.out_of_order_batches += 1
    stats.last[key] = max(stats.last.get(key, 0), batch.last)
    accepted, dups, _ = store.store_batch(
        batch, lambda a, d: orjson.dumps({"accepted": a, "duplicates": d})
    )
    stats.stored_batches += 1
    stats.events += accepted
    stats.duplicates += dups


#: seconds to keep asking a JetStream that does not answer before giving up
SUBSCRIBE_PATIENCE = 60.0


async def _subscribe(
    js: Any, subject: str, durable: str, stream: str, cfg: Any, patience: float
) -> Any:
    """pull_subscribe, asked again while JetStream does not answer.

    A cluster that has just lost a node holding its meta or stream leader answers its API
    only once the others have elected a new one, seconds later (longer on a loaded
    machine): the first consumer request then times out, or gets 503. That is the moment
    a central team reads the stream to see what the failover did, so the report waits for
    the cluster instead of failing on it; a stream that does not exist (404) or refused
    credentials still fail at once."""
    import nats.errors
    import nats.js.errors

    deadline = time.monotonic() + patience
    said = False
    while True:
        try:
            return await js.pull_subscribe(subject, durable=durable, stream=stream, config=cfg)
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.ServiceUnavailableError,
        ) as exc:
            if time.monotonic() >= deadline:
                raise
            if not said:
                said = True
                log.warning(
                    "JetStream did not answer for stream %s (%s: %s); asking again for up to "
                    "%.0f s (a cluster electing a new leader answers once it has one)",
                    stream,
                    type(exc).__name__,
                    exc or "no answer",
                    patience,
                )
            await asyncio.sleep(1.0)


async def consume(
    servers: list[str],
    stream: str,
    db: Path | str,
    *,
    durable: str = "edge-gateway-report",
    subject: str | None = None,
    until_idle: float | None = 2.0,
    fetch: int = 256,
    connect: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    patience: float = SUBSCRIBE_PATIENCE,
) -> ConsumeStats:
    """Read ``stream`` into the gateway file ``db`` until it has been idle ``until_idle``
    seconds with nothing pending (None: until ``stop`` is set). A JetStream that does not
    answer its API (a cluster electing a new leader) is asked again for ``patience`` s."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    stats = ConsumeStats()
    t0 = time.monotonic()
    store = GatewayStore.open(db)

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s: %s", type(exc).__name__, exc)

    nc = await nats.connect(
        servers=servers, max_reconnect_attempts=-1, error_cb=on_error, **(connect or {})
    )
    try:
        js = nc.jetstream(timeout=10)
        cfg = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=fetch * 4,
            ack_wait=60,
        )
        sub = await _subscribe(js, subject or "", durable, stream, cfg, patience)
        idle_since = time.monotonic()
        while stop is None or not stop.is_set():
            try:
                msgs = await sub.fetch(fetch, timeout=1.0)
            except TimeoutError:  # nats-py raises both its own and the builtin one
                msgs = []
            if msgs:
                for m in msgs:
                    store_message(store, m.headers, m.data, stats)
                await msgs[-1].ack_sync()  # AckPolicy.ALL: everything up to here is stored
                idle_since = time.monotonic()
                continue
            if until_idle is not None and time.monotonic() - idle_since >= until_idle:
                info = await sub.consumer_info()
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
    finally:
        with_timeout = asyncio.wait_for(nc.close(), 5)
        try:
            await with_timeout
        finally:
            store.close()
    stats.seconds = time.monotonic() - t0
    return stats

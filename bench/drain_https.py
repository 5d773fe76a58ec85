"""Figure 2: drain a backlog over HTTP(S) with the in-process forwarder (StreamForwarder +
HttpsSink, gzip level 1), three ways, each against raw httpx replaying the agent's own
recorded requests byte for byte to the same kind of peer:

* ``drain_http_count``: a receiver that only counts (bench/counting_receiver.py), plain HTTP
  (the honest limit, issue 16);
* ``drain_http_process``: the whole agent process (``python -m agent run``) to that receiver,
  timed by its acknowledged cursor (read from the file), against a replay of the requests it sent;
* ``drain_https_count``: the in-process forwarder to the same receiver over TLS;
* ``drain_https``: the reference gateway over TLS (a fresh one per side), which caps both.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.agent_process import drain_process
from bench.common import Ctx, copy_db, figure, fill, ratio, wait_until
from bench.receivers import CountingReceiver, GatewayHost, replay, write_server_cert


def start_gateway(d: Path) -> Any:
    """The reference gateway as a subprocess with a trustme certificate (TLS), in-process
    control (the figures that stop and start it: latency, outage, memory)."""
    from tests.fixtures.gateway import GatewayProcess

    return GatewayProcess(d, tls=True, control=False).start()


async def agent_drain(
    url: str, ca_file: Path | None, path: Path, stream: str, n: int, level: int
) -> float:
    """The in-process forwarder (StreamForwarder + HttpsSink) draining the backlog."""
    from adapters.sinks.https import Config, HttpsSink
    from agent.buffer import Buffer
    from agent.forwarder import ForwarderSettings, StreamForwarder

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    sink = HttpsSink("central", Config(url=url, ca_file=ca_file, gzip_level=level))
    await sink.start()
    fw = StreamForwarder(buf, stream, sink, ForwarderSettings())
    t = time.perf_counter()
    task = asyncio.create_task(fw.run())
    try:
        await wait_until(lambda: buf.stream_state(stream)[1] >= n, 600, "HTTPS drain")
        el = time.perf_counter() - t
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.stop()
        await buf.close()
    return n / el


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("drain_https")
    n = ctx.n(200_000, 50_000)
    asyncio.run(fill(d / "src.db", n, "line1"))
    # the same backlog (same event ids, so the same batch bodies) for each drain
    dbs = {k: d / f"{k}.db" for k in ("http", "https", "gw", "process")}
    for db in dbs.values():
        copy_db(d / "src.db", db)
    tls = write_server_cert(d / "tls")
    out: dict[str, Any] = {}
    detail = f"{n:,} event backlog, fsync buffer, gzip 1"

    # 1. plain HTTP to the counting receiver, which records the agent's requests
    rx = CountingReceiver(record=True).start()
    try:
        agent = asyncio.run(agent_drain(rx.url, None, dbs["http"], "line1", n, 1))
        got = rx.count()["events"]
        recorded = rx.recorded(d / "requests.pickle")
        rx.reset()
        raw = asyncio.run(replay(rx.url, None, recorded))
        raw_got = rx.count()["events"]
    finally:
        rx.stop()
    out["drain_http_count"] = figure(
        value=agent,
        unit="events/s",
        raw=raw,
        raw_label="httpx replaying the agent's own requests byte for byte, plain HTTP",
        target=">= 0.8",
        met=ratio(agent, raw) >= 0.8,
        detail=f"{detail}; receiver that only counts got {got:,} (agent), {raw_got:,} (raw)",
    )

    # 1b. the whole agent process, plain HTTP, against a replay of its own requests
    rx = CountingReceiver(record=True).start()
    try:
        sink = f'type = "https"\nurl = "{rx.url}"\ngzip_level = 1\n'
        proc, proc_note = drain_process(
            dbs["process"], d / "process", n, sink, lambda: rx.count()["first_at"]
        )
        proc_recorded = rx.recorded(d / "process-requests.pickle")
        rx.reset()
        raw = asyncio.run(replay(rx.url, None, proc_recorded))
    finally:
        rx.stop()
    out["drain_http_process"] = figure(
        value=proc,
        unit="events/s",
        raw=raw,
        raw_label="httpx replaying the agent process's own requests byte for byte, plain HTTP",
        target=">= 0.8",
        met=ratio(proc, raw) >= 0.8,
        detail=(
            f"`python -m agent run` draining {n:,} events to the receiver that only counts: "
            f"{proc_note}"
        ),
    )
    del proc_recorded

    # 2. the same over TLS
    rx = CountingReceiver(tls=tls).start()
    try:
        agent = asyncio.run(agent_drain(rx.url, rx.ca_file, dbs["https"], "line1", n, 1))
        rx.reset()
        raw = asyncio.run(replay(rx.url, rx.ca_file, recorded))
    finally:
        rx.stop()
    out["drain_https_count"] = figure(
        value=agent,
        unit="events/s",
        raw=raw,
        raw_label="httpx replaying the agent's own requests byte for byte, TLS",
        target=">= 0.8",
        met=ratio(agent, raw) >= 0.8,
        detail=f"{detail}; receiver that only counts, TLS (trustme)",
    )

    # 3. the reference gateway (TLS), a fresh one for each side: it caps both
    gw = GatewayHost(d / "gw-agent").start()
    try:
        agent = asyncio.run(agent_drain(gw.url, gw.ca_file, dbs["gw"], "line1", n, 1))
        got = gw.count("line1")
    finally:
        gw.stop()
    gw = GatewayHost(d / "gw-raw").start()
    try:
        raw = asyncio.run(replay(gw.url, gw.ca_file, recorded))
    finally:
        gw.stop()
    out["drain_https"] = figure(
        value=agent,
        unit="events/s",
        raw=raw,
        raw_label="httpx replaying the agent's own requests to a fresh reference gateway, TLS",
        target=">= 0.6",
        met=ratio(agent, raw) >= 0.6,
        detail=f"{detail}; gateway stored {got:,}; the gateway caps both sides",
    )
    return out

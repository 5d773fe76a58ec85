"""Figure ``gateway``: how many events per second the reference gateway accepts (issue 16:
>= 100,000 without fsync, >= 50,000 with ``--fsync``), against the raw limit of the same
load client posting to a receiver that only counts.

The load: the agent's own requests, byte for byte. A Buffer is filled with 4 streams and
cut into 1000-event batches by ``take_batch`` (new ids and sequences in every batch, so
nothing is a duplicate), and each batch goes through the HTTPS sink's own ``send`` (gzip
level 1, its headers, its Idempotency-Key) into a recording transport. The load client
(bench/gateway_client.py, its own process, httpx) then posts them on one keep-alive
connection per stream, in order, the four streams concurrently.

The peers, each a fresh process from this checkout, alternated in one round:

* bench/counting_receiver.py, plain HTTP and TLS: the raw limit (what the client, loopback
  and TLS cost, with nothing parsed or stored);
* ``python -m gateway`` (a fresh database each time), plain HTTP and TLS, without and with
  ``--fsync``. A run counts only if every request was answered 2xx and the gateway's file
  holds every event at the end (``received_count``).

Figures: ``gateway_http``, ``gateway_http_fsync``, ``gateway_https``, ``gateway_https_fsync``;
each value = events accepted per second (wall time from the first send to the last answer),
raw = the same client against the counting receiver over the same transport. The detail
also gives the gateway's CPU seconds (user + sys, from /proc) and events per CPU second,
less noisy than the wall rate on a shared machine, and the load average at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import EVENTS_1000, REPO, Ctx, figure
from bench.receivers import CountingReceiver, write_server_cert

STREAMS = 4
_CONNECTION_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
Request = tuple[list[tuple[str, str]], bytes]


async def build_batches(path: Path, per_stream: int) -> dict[str, list[Request]]:
    """The agent's requests for ``STREAMS`` streams of ``per_stream`` events each, as the
    HTTPS sink builds them (its send(), into a transport that records instead of sending)."""
    import httpx

    from adapters.sinks.https import Config, HttpsSink
    from agent.buffer import Buffer

    recorded: list[Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        h = [(k, v) for k, v in request.headers.items() if k.lower() not in _CONNECTION_HEADERS]
        recorded.append((h, request.read()))
        return httpx.Response(200)

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="os", max_bytes=8 << 30)
    sink = HttpsSink("central", Config(url="https://gateway.invalid/v1/batches", gzip_level=1))
    await sink.start()
    assert sink._client is not None
    await sink._client.aclose()
    sink._client = httpx.AsyncClient(
        transport=httpx.MockTransport(record), headers={"User-Agent": "edge-agent"}
    )
    out: dict[str, list[Request]] = {}
    try:
        for s in range(STREAMS):
            stream = f"line{s + 1}"
            for start in range(0, per_stream, 1000):
                await buf.append(stream, EVENTS_1000[: min(1000, per_stream - start)])
            after = 0
            while (b := await buf.take_batch(stream, after, 1000, 1 << 20)) is not None:
                result = await sink.send(b)
                assert result.outcome.value == "accepted", result
                after = b.last_sequence
            out[stream], recorded[:] = list(recorded), []
    finally:
        await sink.stop()
        await buf.close()
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, batches: Path, ca: Path | None) -> dict[str, Any]:
    """One run of the load client process; its JSON result."""
    cmd = [sys.executable, "-m", "bench.gateway_client", url, str(batches)]
    if ca is not None:
        cmd += ["--ca", str(ca)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"load client failed ({done.returncode}): {done.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if "refused" in res:
        raise RuntimeError(f"the peer refused a batch: {res['refused']}")
    return res


def against_receiver(tls: tuple[Path, Path, Path] | None, batches: Path, n: int) -> dict[str, Any]:
    rx = CountingReceiver(tls=tls).start()
    try:
        res = load(rx.url, batches, rx.ca_file)
        got = rx.count()["events"]
    finally:
        rx.stop()
    if got != n or res["events"] != n:
        raise RuntimeError(f"counting receiver got {got:,} of {n:,} events")
    return res


def against_gateway(d: Path, tls: bool, fsync: bool, batches: Path, n: int) -> dict[str, Any]:
    """A fresh gateway from this checkout; the client's result plus the gateway's CPU."""
    from gateway.store import received_count
    from tests.fixtures.gateway import GatewayProcess

    gw = GatewayProcess(d, tls=tls, control=False, extra_args=["--fsync"] if fsync else [])
    gw.start()
    try:
        assert gw.pid is not None
        cpu0 = _cpu_seconds(gw.pid)
        res = load(gw.url, batches, gw.ca_file)
        res["gateway_cpu"] = _cpu_seconds(gw.pid) - cpu0
    finally:
        gw.stop()
    stored = received_count(gw.db_path)
    if stored != n or res["events"] != n:
        raise RuntimeError(f"gateway accepted {res['events']:,}, stored {stored:,} of {n:,}")
    res["stored"] = stored
    return res


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("gateway")
    per_stream = ctx.n(50_000, 12_500)
    n = per_stream * STREAMS
    streams = asyncio.run(build_batches(d / "agent.db", per_stream))
    batches = d / "batches.pickle"
    with open(batches, "wb") as f:
        pickle.dump(streams, f, protocol=pickle.HIGHEST_PROTOCOL)
    nbatches = sum(len(v) for v in streams.values())
    wire = sum(len(body) for v in streams.values() for _, body in v)
    del streams
    tls = write_server_cert(d / "tls")
    what = (
        f"{n:,} events in {nbatches} gzip-1 batches of 1000 ({wire / nbatches / 1024:.0f} KiB "
        f"on the wire each), {STREAMS} streams on {STREAMS} keep-alive connections"
    )

    out: dict[str, Any] = {}
    for scheme, cert in (("http", None), ("https", tls)):
        raw = against_receiver(cert, batches, n)
        raw_rate = n / raw["seconds"]
        for fsync in (False, True):
            key = f"gateway_{scheme}" + ("_fsync" if fsync else "")
            res = against_gateway(d / key, cert is not None, fsync, batches, n)
            rate = n / res["seconds"]
            load_avg = os.getloadavg()[0]
            target = 50_000 if fsync else 100_000
            out[key] = figure(
                value=rate,
                unit="events/s",
                raw=raw_rate,
                raw_label=f"the same client to the receiver that only counts, {scheme.upper()}",
                target=f">= {target:,} events/s" if scheme == "http" else "",
                met=rate >= target if scheme == "http" else None,
                gateway_cpu_per_100k=round(res["gateway_cpu"] * 100_000 / n, 3),
                #: events per second of the gateway's own CPU: its rate on a core of its own
                per_cpu_second=round(n / res["gateway_cpu"]) if res["gateway_cpu"] else None,
                load_average=round(load_avg, 1),
                median_by="value",  # the targets are rates, not ratios
                detail=(
                    f"{what}; gateway {'--fsync' if fsync else 'without --fsync'}, "
                    f"stored {res['stored']:,}; gateway CPU {res['gateway_cpu']:.2f} s "
                    f"({n / max(res['gateway_cpu'], 1e-9):,.0f} events per CPU second), "
                    f"client CPU {res['client_cpu']:.2f} s; load average {load_avg:.1f} "
                    f"on {os.cpu_count()} CPUs"
                ),
            )
    return out

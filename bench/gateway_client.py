"""``python -m bench.gateway_client URL BATCHES.pickle [--ca PEM]``: the load client of the
gateway figure, in its own process so its CPU is not the gateway's.

BATCHES.pickle holds ``{stream: [(headers, body), ...]}``: the agent's own request bodies
(bench/gateway.py builds them with the Buffer and the HTTPS sink's body builder). One
keep-alive connection per stream posts that stream's batches in order, one at a time, as
the agent's sink does (``max_in_flight = 1``); the streams run concurrently, like the
several streams (or agents) a central gateway serves at once.

Prints one JSON line: events and requests answered 2xx, the wall time from the first send
to the last answer, the client's CPU seconds, and the first refusal, if any.

Imports nothing from agent/, adapters/ or gateway/: only httpx, like the raw side of the
drain figures (bench/receivers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import ssl
import sys
import time
from typing import Any

import httpx

Request = tuple[list[tuple[str, str]], bytes]


async def _post_stream(
    c: httpx.AsyncClient, url: str, batches: list[Request], totals: dict[str, Any]
) -> None:
    for headers, body in batches:
        r = await c.post(url, content=body, headers=headers)
        if r.status_code // 100 != 2:
            totals.setdefault("refused", f"{r.status_code} {r.text[:300]}")
            return
        low = {k.lower(): v for k, v in headers}
        first, last = int(low["x-edge-first-sequence"]), int(low["x-edge-last-sequence"])
        totals["events"] += last - first + 1
        totals["requests"] += 1


async def run(url: str, ca: str | None, streams: dict[str, list[Request]]) -> dict[str, Any]:
    verify: Any = ssl.create_default_context(cafile=ca) if ca else False
    totals: dict[str, Any] = {"events": 0, "requests": 0}
    limits = httpx.Limits(max_keepalive_connections=1, max_connections=1)
    clients = [httpx.AsyncClient(verify=verify, timeout=120, limits=limits) for _ in streams]
    try:
        # open every connection (and finish its TLS handshake) before the clock starts
        health = url.split("/", 3)
        health_url = "/".join(health[:3]) + "/healthz"
        await asyncio.gather(*(c.get(health_url) for c in clients))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(
            *(
                _post_stream(c, url, batches, totals)
                for c, batches in zip(clients, streams.values(), strict=True)
            )
        )
        totals["seconds"] = time.perf_counter() - t0
        totals["client_cpu"] = time.process_time() - cpu0
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    totals["connections"] = len(clients)
    return totals


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_client", description=__doc__)
    p.add_argument("url")
    p.add_argument("batches")
    p.add_argument("--ca")
    args = p.parse_args()
    with open(args.batches, "rb") as f:
        streams = pickle.load(f)
    print(json.dumps(asyncio.run(run(args.url, args.ca, streams))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

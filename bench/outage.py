"""Figure 8: backlog and drain rate through a gateway outage (the gateway process really
stopped for 60 s), ingest at a fixed rate throughout; PNG plot for docs/performance.md.
Also the agent's row in the peers table: events lost, order violations, drain rate."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import EVENTS_1000, REPO, Ctx, Deadline, figure
from bench.drain_https import start_gateway

RATE = 1000  # events/s, in appends of 10 every 10 ms


async def scenario(gw: Any, path: Path, online: float, outage: float) -> dict[str, Any]:
    from adapters.sinks.https import Config, HttpsSink
    from agent.buffer import Buffer
    from agent.forwarder import ForwarderSettings, StreamForwarder

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync")
    sink = HttpsSink("central", Config(url=gw.url, ca_file=gw.ca_file))
    await sink.start()
    await buf.append("line1", EVENTS_1000[:1])
    fw = StreamForwarder(buf, "line1", sink, ForwarderSettings())
    fwd = asyncio.create_task(fw.run())
    stop_ingest = asyncio.Event()
    samples: list[tuple[float, int, int, int]] = []  # t, backlog, forwarded, ingested
    t0 = time.perf_counter()

    async def produce() -> None:
        i = 0
        while not stop_ingest.is_set():
            i += 1
            delay = t0 + i * 0.01 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await buf.append("line1", EVENTS_1000[:10])

    async def sample() -> None:
        while True:
            last, fwd_seq = buf.stream_state("line1")
            samples.append((time.perf_counter() - t0, last - fwd_seq, fwd_seq, last))
            await asyncio.sleep(0.5)

    prod = asyncio.create_task(produce())
    samp = asyncio.create_task(sample())
    marks: dict[str, float] = {}
    try:
        await asyncio.sleep(online)
        marks["down"] = time.perf_counter() - t0
        await asyncio.to_thread(gw.stop)
        await asyncio.sleep(outage)
        await asyncio.to_thread(gw.start)
        marks["up"] = time.perf_counter() - t0
        dl = Deadline(outage + 180)
        while not dl.over():  # until the backlog is back to its online level
            await asyncio.sleep(0.5)
            if samples[-1][1] <= 100 and time.perf_counter() - t0 > marks["up"] + 2:
                break
        marks["drained"] = time.perf_counter() - t0
        await asyncio.sleep(online / 2)
        stop_ingest.set()
        await prod
        last = buf.stream_state("line1")[0]
        dl = Deadline(60)
        while buf.stream_state("line1")[1] < last and not dl.over():  # noqa: ASYNC110 (polling a counter, bounded)
            await asyncio.sleep(0.1)
    finally:
        for t in (prod, samp, fwd):
            t.cancel()
        await asyncio.gather(prod, samp, fwd, return_exceptions=True)
        await sink.stop()
        await buf.close()
    return {"samples": samples, "marks": marks, "ingested": last}


def plot(samples: list[tuple[float, int, int, int]], marks: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    backlog = [s[1] for s in samples]
    rate = [0.0] + [
        (samples[i][2] - samples[i - 1][2]) / (samples[i][0] - samples[i - 1][0])
        for i in range(1, len(samples))
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    ax.plot(t, backlog, color="tab:red", label="backlog (events)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("backlog (events)", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(t, rate, color="tab:blue", label="forwarded (events/s)", alpha=0.7)
    ax2.set_ylabel("forwarded events/s", color="tab:blue")
    ax.axvspan(marks["down"], marks["up"], color="grey", alpha=0.2, label="gateway stopped")
    ax.set_title(f"Gateway outage: ingest {RATE:,} events/s, HTTPS, fsync buffer")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def run(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("outage")
    outage = ctx.n(60, 20)
    gw = start_gateway(d / "gw")
    try:
        res = asyncio.run(scenario(gw, d / "o.db", 10.0, outage))
    finally:
        gw.stop()
    from gateway.report import read_report

    rep = read_report(gw.db_path)
    st = [s for s in rep["streams"] if s["stream"] == "line1"]
    missing = sum(s["missing_count"] for s in st)
    ooo = sum(s["out_of_order"] for s in st)
    dups = sum(s["duplicates"] for s in st)
    received = sum(s["received"] for s in st)
    samples, marks = res["samples"], res["marks"]
    peak = max(s[1] for s in samples)
    after = [s for s in samples if marks["up"] <= s[0] <= marks["drained"]]
    # delivery resumes at the forwarder's next retry (backoff), not when the gateway is up
    resumed = next(
        (a for a, b in zip(after, after[1:], strict=False) if b[2] > a[2]),
        after[0] if after else None,
    )
    span = [s for s in after if resumed is not None and s[0] >= resumed[0]]
    drain_rate = (span[-1][2] - span[0][2]) / (span[-1][0] - span[0][0]) if len(span) > 1 else 0.0
    wait = (resumed[0] - marks["up"]) if resumed is not None else 0.0
    png = REPO / "docs" / "img" / "outage.png"
    plot(samples, marks, png)
    lost = res["ingested"] - received
    return {
        "outage": figure(
            value=drain_rate,
            unit="events/s catching up",
            lost=lost,
            missing=missing,
            out_of_order=ooo,
            duplicates=dups,
            peak_backlog=peak,
            catch_up_s=round(marks["drained"] - marks["up"], 1),
            resumed_after_s=round(wait, 1),
            outage_s=outage,
            plot="docs/img/outage.png",
            detail=(
                f"{outage} s outage at {RATE:,} ev/s ingest: peak backlog {peak:,}, caught up "
                f"{marks['drained'] - marks['up']:.0f} s after the gateway came back; delivery resumed "
                f"{wait:.0f} s after it was up (the forwarder's backoff: full jitter up to 15 s), then "
                f"drained at {drain_rate:,.0f}/s; gateway report: "
                f"{received:,} received of {res['ingested']:,}, missing {missing}, "
                f"out of order {ooo}, duplicates {dups}"
            ),
        )
    }

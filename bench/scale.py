"""How cost grows (issue 16, item 4): ``python -m bench --only scale`` (not in the default
run: the 10M backlog alone takes about ten minutes to fill and drain).

* **Backlog sweep** (10k, 100k, 1M, 10M events; ``--quick``: 10k, 100k, 300k): each backlog
  filled with Buffer.append (1000-event appends, durability "os", bench/common.fill) into a
  fresh file, then

  - ``python -m agent status --json -c CFG`` wall time, best of 3, agent not running;
  - the whole agent process (``python -m agent run``) draining it over plain HTTP, gzip 1,
    to the receiver that only counts, timed like bench/agent_process.py: from the first
    batch at the receiver to the acknowledged cursor, read from the file, covering the
    backlog; start-up (process start to first batch) reported beside it, because opening
    an existing file runs ``PRAGMA quick_check``, which reads all of it;
  - the agent process's peak RSS during that drain: VmRSS sampled every 0.1 s (as
    bench/memory.py does) and the kernel's own high-water mark, VmHWM, read last.

  Backlogs up to 1M are drained three times (copies of one filled file) and report the
  median; 10M once.
* **Streams**: ingest through Buffer.append (fsync, 500-event appends, 4 tasks) of the same
  total spread over 1, 10 and 100 streams, three interleaved rounds, wall rate and the
  process's CPU time per event.
* **A simulated week**: 7 days, each a shift's worth of events ingested (fsync, 500-event
  appends) while the gateway is up, then down for part of the day (the backlog grows),
  then up again until the backlog is drained; forwarding through the buffer's own
  take_batch/ack (what the forwarder does), housekeeping every HOUSEKEEPING_INTERVAL as
  the runtime runs it, and after the drain until it frees nothing (the quiet rest of the
  day, compressed). File size (main file + WAL) at each day's peak and at its end.

Writes docs/img/scale.png (log-log) and the table between the ``bench:scale`` markers of
docs/performance.md."""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.agent_process import POLL, acknowledged
from bench.common import EVENTS_1000, REPO, Ctx, Deadline, copy_db, db_size, figure, fill, spawn
from bench.memory import status_time
from bench.receivers import CountingReceiver

DOC = REPO / "docs" / "performance.md"
PNG = REPO / "docs" / "img" / "scale.png"
BEGIN = "<!-- bench:scale:begin (written by python -m bench --only scale; do not edit) -->"
END = "<!-- bench:scale:end -->"

#: the week's gateway outage per day, as a share of the day's events
OUTAGE_SHARE = [0.25, 0.5, 1.0, 0.25, 0.75, 0.5, 0.25]


def _remove_db(db: Path) -> None:
    for ext in ("", "-wal", "-shm"):
        (db.parent / (db.name + ext)).unlink(missing_ok=True)


def write_config(d: Path, db: Path, url: str) -> Path:
    """The agent as bench/agent_process.py runs it (fsync buffer), metrics off."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "agent.toml"
    cfg.write_text(
        f"""[agent]
id = "a"
plant = "p"

[buffer]
path = "{db}"
durability = "fsync"
max_bytes = "16GiB"

[metrics]
enabled = false

[log]
level = "warning"
format = "text"

[sinks.central]
type = "https"
url = "{url}"
gzip_level = 1
"""
    )
    return cfg


def _hwm_kb(pid: int) -> int:
    """VmHWM of ``pid`` (the kernel's peak resident set), kB; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def drain_sampled(
    cfg: Path, db: Path, n: int, rx: CountingReceiver, limit: float
) -> dict[str, float]:
    """``python -m agent run -c cfg`` until its acknowledged cursor covers ``n``: the clock
    of bench/agent_process.drain_process (first batch at the receiver to the cursor read
    from the file), plus start-up and peak RSS (sampled VmRSS and VmHWM)."""
    rx.reset()
    log_path = cfg.parent / "agent.log"
    log = open(log_path, "wb")
    t_start = time.monotonic()
    proc = spawn([sys.executable, "-m", "agent", "run", "-c", str(cfg)], stdout=log, stderr=log)
    ps = psutil.Process(proc.pid)
    dl = Deadline(limit)
    peak = hwm = 0
    next_rss = 0.0

    def tick() -> None:
        nonlocal peak, next_rss
        if proc.poll() is not None:
            raise RuntimeError(
                f"agent exited with {proc.returncode}: {log_path.read_text()[-800:]}"
            )
        dl.check(f"whole-agent drain of {n:,}")
        now = time.monotonic()
        if now >= next_rss:
            peak = max(peak, ps.memory_info().rss)
            next_rss = now + 0.1

    try:
        while (t0 := rx.count()["first_at"]) is None:
            tick()
            time.sleep(POLL)
        while True:
            tick()
            got = acknowledged(db, "line1")
            now = time.monotonic()
            if got >= n:
                break
            time.sleep(POLL)
        hwm = _hwm_kb(proc.pid) * 1024
        delivered = rx.count()["events"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
        log.close()
    el = now - t0
    return {
        "rate": n / el,
        "drain_s": el,
        "startup_s": t0 - t_start,
        "rss_mb": peak / 1e6,
        "hwm_mb": hwm / 1e6,
        "delivered": delivered,
    }


def backlog_sweep(ctx: Ctx, rx: CountingReceiver) -> list[dict[str, Any]]:
    sizes = [10_000, 100_000, 300_000] if ctx.quick else [10_000, 100_000, 1_000_000, 10_000_000]
    out = []
    for n in sizes:
        d = ctx.dir(f"scale/backlog{n}")
        src = d / "src.db"
        t = time.perf_counter()
        asyncio.run(fill(src, n, "line1"))
        fill_s = time.perf_counter() - t
        size = db_size(src)
        cfg = write_config(d, src, rx.url)
        status = min(status_time(cfg)[0] for _ in range(3))
        runs = []
        repeats = 1 if n > 1_000_000 else 3
        for r in range(repeats):
            if repeats > 1:
                db = d / f"run{r}.db"
                copy_db(src, db)
            else:
                db = src  # the 10M file is drained in place (no room, no time for a copy)
            rcfg = write_config(d / f"run{r}", db, rx.url) if db != src else cfg
            runs.append(drain_sampled(rcfg, db, n, rx, 1500))
            if db != src:
                _remove_db(db)
        _remove_db(src)
        rates = [x["rate"] for x in runs]
        mid = statistics.median_low(rates)
        chosen = next(x for x in runs if x["rate"] == mid)
        row = {
            "backlog": n,
            "fill_s": round(fill_s, 1),
            "file_mb": round(size / 1e6, 1),
            "status_s": round(status, 3),
            "drain_eps": round(mid),
            "drain_eps_runs": [round(x) for x in rates],
            "drain_s": round(chosen["drain_s"], 2),
            "startup_s": round(chosen["startup_s"], 2),
            "startup_s_runs": [round(x["startup_s"], 2) for x in runs],
            "rss_mb": round(max(x["rss_mb"] for x in runs), 1),
            "hwm_mb": round(max(x["hwm_mb"] for x in runs), 1),
            "delivered": min(x["delivered"] for x in runs),
        }
        print(f"   scale backlog {n:,}: {row}", flush=True)
        out.append(row)
    return out


async def ingest_streams(
    path: Path, total: int, streams: int, tasks: int = 4
) -> tuple[float, float]:
    """Buffer.append (fsync) of ``total`` events in 500-event appends by ``tasks`` tasks,
    the appends spread round-robin over ``streams`` streams. Returns (events/s, CPU s)."""
    from agent.buffer import Buffer

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    names = [f"s{i:03d}" for i in range(streams)]
    appends = [names[i % streams] for i in range(total // 500)]
    evs = EVENTS_1000[:500]
    dl = Deadline(300)

    async def one(k: int) -> None:
        for name in appends[k::tasks]:
            await buf.append(name, evs)
            dl.check("stream ingest")

    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(tasks)))
        el = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await buf.close()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return len(appends) * 500 / el, cpu


def stream_sweep(ctx: Ctx) -> list[dict[str, Any]]:
    total = ctx.n(200_000, 50_000)
    counts = [1, 10, 100]
    got: dict[int, list[tuple[float, float]]] = {c: [] for c in counts}
    d = ctx.dir("scale/streams")
    for rnd in range(3):  # interleaved: 1, 10, 100, 1, 10, 100, ...
        for c in counts:
            db = d / f"s{c}-{rnd}.db"
            got[c].append(asyncio.run(ingest_streams(db, total, c)))
            _remove_db(db)
    out = []
    for c in counts:
        rates = [r for r, _ in got[c]]
        cpu_us = [cpu / total * 1e6 for _, cpu in got[c]]
        out.append(
            {
                "streams": c,
                "events": total,
                "eps": round(statistics.median(rates)),
                "eps_range": [round(min(rates)), round(max(rates))],
                "cpu_us_per_event": round(statistics.median(cpu_us), 1),
                "cpu_us_range": [round(min(cpu_us), 1), round(max(cpu_us), 1)],
            }
        )
    return out


async def week(path: Path, per_day: int) -> list[dict[str, Any]]:
    """Seven days of fill, outage and drain on one buffer file (see the module doc)."""
    from agent.buffer import Buffer
    from agent.runtime import HOUSEKEEPING_INTERVAL

    buf = await Buffer.open(path, plant="p", agent_id="a", durability="fsync", max_bytes=8 << 30)
    up = asyncio.Event()
    dl = Deadline(900)

    async def forward() -> None:
        while True:
            await up.wait()
            b = await buf.take_batch("line1", buf.stream_state("line1")[1], 1000, 1 << 20)
            if b is None:
                await asyncio.sleep(0.005)
                continue
            await buf.ack(b)

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            await buf.housekeeping()

    await buf.append("line1", EVENTS_1000[:1])  # the stream exists before its forwarder
    fw = asyncio.create_task(forward())
    hk = asyncio.create_task(housekeeping())

    def check() -> None:
        dl.check("simulated week")
        for task in (fw, hk):  # a task that died must stop the figure, not hang it
            if task.done():
                task.result()
                raise RuntimeError("a simulated-week task ended")

    days = []
    try:
        appends = per_day // 500
        for day, share in enumerate(OUTAGE_SHARE, 1):
            down_from = int(appends * (1 - share) / 2)
            down_to = down_from + int(appends * share)
            peak_backlog = peak_size = 0
            t = time.perf_counter()
            for i in range(appends):
                if i == down_from:
                    up.clear()
                elif i == down_to or (i == 0 and down_from > 0):
                    up.set()
                await buf.append("line1", EVENTS_1000[:500])
                if i == down_to - 1:
                    last, fwd = buf.stream_state("line1")
                    peak_backlog, peak_size = last - fwd, db_size(path)
                check()
            up.set()
            while True:  # the gateway is back: drain the day's backlog
                last, fwd = buf.stream_state("line1")
                if fwd >= last:
                    break
                check()
                await asyncio.sleep(0.01)
            for _ in range(1000):  # the rest of the day: housekeeping until nothing is left
                if not await buf.housekeeping():
                    break
            days.append(
                {
                    "day": day,
                    "outage_share": share,
                    "peak_backlog": peak_backlog,
                    "peak_mb": round(peak_size / 1e6, 1),
                    "end_mb": round(db_size(path) / 1e6, 1),
                    "main_kb": round(path.stat().st_size / 1e3),  # noqa: ASYNC240 (a stat between days)
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
            print(f"   scale week: {days[-1]}", flush=True)
    finally:
        for task in (fw, hk):
            task.cancel()
        await asyncio.gather(fw, hk, return_exceptions=True)
        await buf.close()
    return days


def _n(v: float) -> str:
    if v >= 1_000_000 and v % 1_000_000 == 0:
        return f"{v / 1e6:.0f}M"
    if v >= 1000 and v % 1000 == 0:
        return f"{v / 1e3:.0f}k"
    return f"{v:,.0f}"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["backlog"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    a.loglog(x, [r["drain_eps"] for r in rows], "o-", color="tab:blue")
    a.set_xlabel("backlog (events)")
    a.set_ylabel("drain rate (events/s)")
    a.set_title("Whole agent draining to a counting receiver")
    a.set_ylim(min(r["drain_eps"] for r in rows) / 3, max(r["drain_eps"] for r in rows) * 3)
    b.loglog(x, [r["status_s"] for r in rows], "o-", color="tab:green", label="status --json")
    b.loglog(
        x, [r["startup_s"] for r in rows], "s-", color="tab:orange", label="start-up to first batch"
    )
    b.loglog(x, [r["drain_s"] for r in rows], "^-", color="tab:blue", label="drain")
    b.set_xlabel("backlog (events)")
    b.set_ylabel("seconds")
    b.set_title("Time against backlog")
    b.legend()
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def tables(
    backlog: list[dict[str, Any]],
    streams: list[dict[str, Any]],
    days: list[dict[str, Any]],
    stamp: str,
    cmd: str,
) -> str:
    lines = [
        f"Measured {stamp} by `{cmd}` (machine: {os.cpu_count()} CPUs, shared).",
        "",
        "| backlog | file (MB) | fill (s) | `status --json` (s, best of 3) | start-up to first batch (s) | drain (events/s) | drain runs | peak RSS (MB, VmRSS / VmHWM) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in backlog:
        lines.append(
            f"| {_n(r['backlog'])} | {r['file_mb']:,.0f} | {r['fill_s']:.0f} | {r['status_s']:.2f} "
            f"| {r['startup_s']:.2f} | {r['drain_eps']:,} | {', '.join(f'{v:,}' for v in r['drain_eps_runs'])} "
            f"| {r['rss_mb']:.0f} / {r['hwm_mb']:.0f} |"
        )
    lines += [
        "",
        "| streams | ingest (events/s, median of 3) | range | CPU per event (us, median) | range |",
        "|---|---|---|---|---|",
    ]
    for s in streams:
        lines.append(
            f"| {s['streams']} | {s['eps']:,} | {s['eps_range'][0]:,}-{s['eps_range'][1]:,} "
            f"| {s['cpu_us_per_event']} | {s['cpu_us_range'][0]}-{s['cpu_us_range'][1]} |"
        )
    lines += [
        "",
        "| day | gateway down for | peak backlog | file + WAL at the peak (MB) | at the day's end (MB) | main file alone (kB) |",
        "|---|---|---|---|---|---|",
    ]
    for w in days:
        lines.append(
            f"| {w['day']} | {w['outage_share']:.0%} of the day's events | {w['peak_backlog']:,} "
            f"| {w['peak_mb']} | {w['end_mb']} | {w['main_kb']:,} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        doc += "\n## How cost grows\n\n" + BEGIN + "\n" + END + "\n"
    pre, rest = doc.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    DOC.write_text(pre + BEGIN + "\n" + text + END + post)


def run(ctx: Ctx) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cmd = "python -m bench --only scale" + (" --quick" if ctx.quick else "")
    streams = stream_sweep(ctx)
    days = asyncio.run(week(ctx.dir("scale/week") / "week.db", ctx.n(200_000, 40_000)))
    rx = CountingReceiver().start()
    try:
        backlog = backlog_sweep(ctx, rx)
    finally:
        rx.stop()
    plot(backlog, PNG)
    write_tables(tables(backlog, streams, days, stamp, cmd))
    big = backlog[-1]
    by = {_n(r["backlog"]): r for r in backlog}
    first, last = days[0]["end_mb"], days[-1]["end_mb"]
    top = max(w["peak_mb"] for w in days)
    bounded = last <= max(first, days[len(days) // 2]["end_mb"]) * 1.1 + 4
    s1 = next(s for s in streams if s["streams"] == 1)
    s100 = next(s for s in streams if s["streams"] == 100)
    return {
        "scale_drain": figure(
            value=big["drain_eps"],
            unit=f"events/s draining {_n(big['backlog'])}",
            by_backlog={k: r["drain_eps"] for k, r in by.items()},
            startup_s={k: r["startup_s"] for k, r in by.items()},
            backlogs=backlog,
            plot="docs/img/scale.png",
            detail=(
                "whole agent process, plain HTTP, gzip 1, to the receiver that only counts: "
                + ", ".join(f"{k} {r['drain_eps']:,}/s" for k, r in by.items())
                + "; start-up to the first batch "
                + ", ".join(f"{k} {r['startup_s']:.1f} s" for k, r in by.items())
            ),
        ),
        "scale_status": figure(
            value=big["status_s"],
            unit=f"s with {_n(big['backlog'])} unsent",
            target="< 1 s",
            met=big["status_s"] < 1.0,
            by_backlog={k: r["status_s"] for k, r in by.items()},
            detail="best of 3 `python -m agent status --json`: "
            + ", ".join(f"{k} {r['status_s']:.2f} s" for k, r in by.items()),
        ),
        "scale_rss": figure(
            value=big["hwm_mb"],
            unit=f"MB peak RSS draining {_n(big['backlog'])}",
            target="< 80 MB",
            met=big["hwm_mb"] < 80,
            by_backlog={k: r["hwm_mb"] for k, r in by.items()},
            detail="VmHWM of the agent process (sampled VmRSS peak): "
            + ", ".join(f"{k} {r['hwm_mb']:.0f} ({r['rss_mb']:.0f}) MB" for k, r in by.items()),
        ),
        "scale_streams": figure(
            value=s100["eps"],
            unit="events/s over 100 streams",
            raw=s1["eps"],
            raw_label="the same appends into 1 stream, same run",
            by_streams={str(s["streams"]): s["eps"] for s in streams},
            streams=streams,
            detail="Buffer.append, fsync, 500-event appends, 4 tasks, medians of 3 interleaved rounds: "
            + ", ".join(
                f"{s['streams']} streams {s['eps']:,}/s ({s['eps_range'][0]:,}-{s['eps_range'][1]:,}), "
                f"{s['cpu_us_per_event']} us CPU/event"
                for s in streams
            ),
        ),
        "scale_week": figure(
            value=last,
            unit="MB after day 7",
            target="bounded",
            met=bounded,
            days=days,
            detail=(
                f"7 days of {ctx.n(200_000, 40_000):,} events, gateway down for "
                + "/".join(f"{w['outage_share']:.0%}" for w in days)
                + f" of each day: file+WAL at the day's end {', '.join(str(w['end_mb']) for w in days)} MB, "
                f"at the peaks up to {top} MB"
            ),
        ),
    }

"""Logs that fit journald and long outages (issue 10, item 5).

- A failing sink logs its first failure (a warning), then at most one summary a minute,
  then one info line with the outage's length: counted over a simulated three-day outage
  (the clock driven, 17,280 retries at the 15 s cap), and over a real one: the real agent
  as a subprocess, the real gateway really stopped, two streams to the one sink, with the
  summary interval scaled down to one second so that "long" costs seconds (the count is
  checked against the outage's length over the interval, whatever the retry rate).
- Under systemd (JOURNAL_STREAM names stderr's device and inode) every line starts with its
  syslog priority, ``<4>`` for a warning, ``<6>`` info; a stderr redirected elsewhere
  (JOURNAL_STREAM inherited but not matching) gets none.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.logs import (
    JournalPriorityFormatter,
    JsonFormatter,
    TextFormatter,
    setup_logging,
    stream_is_journal,
    syslog_priority,
)
from agent.outage import SinkOutage
from tests.fixtures.common import AgentProcess, agent_config, https_sink

pytestmark = pytest.mark.timeout(240)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> Any:
    h = Collect()
    logger = logging.getLogger("edge_agent.forwarder")
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield h
    logger.removeHandler(h)
    logger.setLevel(old)


def _outage(clock: Clock, collected: Collect, seconds: float, every: float,
            streams: tuple[str, ...] = ("line1",)) -> list[logging.LogRecord]:  # fmt: skip
    out = SinkOutage("central", interval=60.0, clock=clock)
    start = len(collected.records)
    figures_calls = 0

    async def figures(s: set[str]) -> tuple[int, float | None]:
        nonlocal figures_calls
        figures_calls += 1
        return 12_345, clock.now - t0

    async def run() -> None:
        end = clock.now + seconds
        while clock.now < end:
            for st in streams:
                await out.failed(st, "cannot reach https://gw/v1/batches: refused",
                                 retry_in=every, figures=figures)  # fmt: skip
            clock.now += every
        for st in streams:
            await out.delivered(st, figures=figures)

    t0 = clock.now
    asyncio.run(run())
    assert figures_calls <= seconds / 60 + 2  # the buffer is read for the summaries only
    return collected.records[start:]


@pytest.mark.parametrize(
    ("seconds", "every", "streams"),
    [
        (3 * 86400, 15.0, ("line1",)),  # the three days at the 15 s cap
        (600, 0.5, ("line1", "line2", "mes")),  # ten minutes, fast retries, three streams
        (30, 1.0, ("line1",)),  # shorter than one interval
    ],
)
def test_outage_lines_are_bounded_by_its_length_not_its_retries(
    collected: Collect, seconds: float, every: float, streams: tuple[str, ...]
) -> None:
    records = _outage(Clock(), collected, seconds, every, streams)
    retries = int(seconds / every) * len(streams)
    assert len(records) <= seconds / 60 + 2, (len(records), retries)
    assert len(records) >= max(2, seconds // 60)  # ... and each minute is still said
    first, *summaries, last = records
    assert first.levelno == logging.WARNING and first.getMessage().startswith(
        "sink central failing (stream line1): cannot reach https://gw/v1/batches"
    )
    assert all(r.levelno == logging.WARNING for r in summaries)
    for r in summaries:
        assert re.match(
            r"sink central still failing for \S+: [\d,]+ retries, backlog 12,345, oldest \S+ "
            r"\(last error: cannot reach", r.getMessage()), r.getMessage()  # fmt: skip
    assert last.levelno == logging.INFO
    assert last.getMessage().startswith("sink central delivering again after an outage of ")
    assert f"({retries - 1:,} retries)" in last.getMessage(), last.getMessage()
    assert last.__dict__["outage_s"] == pytest.approx(int(seconds / every) * every, abs=every)


def test_summaries_are_an_interval_apart_and_a_change_of_kind_is_said_at_once(
    collected: Collect,
) -> None:
    clock = Clock()
    out = SinkOutage("central", interval=60.0, clock=clock)
    times: list[float] = []

    async def run() -> None:
        for i in range(400):  # 200 s failing, then 200 s refused credentials
            before = len(collected.records)
            await out.failed("line1", "HTTP 401" if i >= 200 else "HTTP 503", auth=i >= 200)
            if len(collected.records) > before:
                times.append(clock.now)
            clock.now += 1.0
        await out.delivered("line1")

    asyncio.run(run())
    levels = [r.levelno for r in collected.records]
    msgs = [r.getMessage() for r in collected.records]
    assert msgs[0].startswith("sink central failing (stream line1): HTTP 503")
    (switch,) = [i for i, m in enumerate(msgs) if "REFUSES OUR CREDENTIALS" in m]
    assert times[switch] == 1200.0 and levels[switch] == logging.ERROR  # at once, loudly
    assert all(b - a >= 60.0 for a, b in zip(times, times[1:switch], strict=False))
    assert all(b - a >= 60.0 for a, b in zip(times[switch:], times[switch + 1 :], strict=False))
    assert all(levels[i] == logging.ERROR for i in range(switch, len(levels) - 1))  # -p err
    assert levels[-1] == logging.INFO and len(msgs) <= 400 / 60 + 3


def test_a_stream_still_failing_keeps_the_outage_open(collected: Collect) -> None:
    clock = Clock()
    out = SinkOutage("central", interval=60.0, clock=clock)

    async def run() -> None:
        await out.failed("a", "down")
        await out.failed("b", "down")
        await out.delivered("a")  # b still fails: not recovered
        assert out.ongoing
        clock.now += 90
        await out.delivered("b")

    asyncio.run(run())
    msgs = [r.getMessage() for r in collected.records]
    assert len(msgs) == 2 and "delivering again after an outage of 1m30s" in msgs[1], msgs


# ------------------------------------------------------------------ journald priorities


def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("edge_agent.x", level, __file__, 1, msg, None, exc_info)


def test_priority_prefix_per_level_and_on_every_line() -> None:
    assert [syslog_priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    text = JournalPriorityFormatter(TextFormatter())
    line = text.format(_record(logging.ERROR, "it broke", exc=True))
    assert line.count("\n") >= 3 and all(x.startswith("<3>") for x in line.split("\n")), line
    js = JournalPriorityFormatter(JsonFormatter()).format(_record(logging.WARNING, "w", exc=True))
    assert js.startswith("<4>{") and "\n" not in js  # JSON: the traceback stays in its line
    assert json.loads(js[3:])["level"] == "warning"


def test_journal_stream_must_be_our_stderr(tmp_path: Path) -> None:
    f = open(tmp_path / "stderr", "w")  # noqa: SIM115
    other = tmp_path / "other"
    other.write_text("")
    try:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stream_is_journal(f, env)
        o = os.stat(other)
        assert not stream_is_journal(f, {"JOURNAL_STREAM": f"{o.st_dev}:{o.st_ino}"})
        assert not stream_is_journal(f, {})
        assert not stream_is_journal(f, {"JOURNAL_STREAM": "garbage"})
        assert not stream_is_journal(io.StringIO(), env)
    finally:
        f.close()


def test_setup_logging_prefixes_only_under_the_journal(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("info", "auto", stream=f)
        logging.getLogger("edge_agent.t").warning("journal line")
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        setup_logging("info", "auto", stream=f)
        logging.getLogger("edge_agent.t").warning("plain line")
    first, second = path.read_text().splitlines()
    assert first.startswith("<4>{") and json.loads(first[3:])["msg"] == "journal line"
    assert second.startswith("{") and json.loads(second)["msg"] == "plain line"
    logging.getLogger().removeHandler(next(h for h in logging.getLogger().handlers
                                           if h.get_name() == "edge_agent"))  # fmt: skip


# ------------------------------------------------------------------ the real thing

INTERVAL = 1.0  # seconds: a minute scaled down 60 times


def _lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        m = re.match(r"^<(\d)>(\{.*\})$", raw)
        assert m, f"a line without its priority prefix under the journal: {raw!r}"
        out.append((int(m.group(1)), json.loads(m.group(2))))
    return out


def test_real_outage_is_a_few_lines_with_priorities(gateway: Any, tmp_path: Path) -> None:
    gw = gateway()
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw)},
        sources={"a": {"type": "simulator", "rate": 20, "seed": 1, "stream": "line1"},
                 "b": {"type": "simulator", "rate": 20, "seed": 2, "stream": "line2"}},
        forwarder={"backoff_initial": 0.05, "backoff_max": 0.3},
    )  # fmt: skip
    agent = AgentProcess(tmp_path, cfg, env={"EDGE_AGENT_LOG_SUMMARY_INTERVAL": str(INTERVAL)})
    # stderr is the log file; JOURNAL_STREAM names it, as systemd names its journal socket
    agent.log_path.touch()
    st = os.stat(agent.log_path)
    agent.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        agent.start()
        gw.wait_received(40, timeout=60)
        before = len(_lines(agent.log_path))
        down_at = time.time()
        gw.stop()
        outage = 12.0
        time.sleep(outage)  # the outage itself: the gateway is down this long, on purpose
        gw.start()
        deadline = time.monotonic() + 60
        while not any("delivering again" in d["msg"] for _, d in _lines(agent.log_path)[before:]):
            assert time.monotonic() < deadline, agent.log()[-3000:]
            time.sleep(0.2)
        up_at = time.time()
        assert agent.stop() == 0
    finally:
        agent.kill()
    during = [
        (p, d) for p, d in _lines(agent.log_path)[before:]
        if down_at <= datetime.fromisoformat(d["ts"]).timestamp() <= up_at
    ]  # fmt: skip
    fwd = [(p, d) for p, d in during if d["logger"] == "edge_agent.forwarder"]
    first, *summaries, last = fwd
    assert first[0] == 4 and first[1]["msg"].startswith("sink central failing (stream "), first
    assert {"stream", "batch_id", "first_sequence", "last_sequence"} <= set(first[1])
    assert all(p == 4 and "still failing for" in d["msg"] for p, d in summaries), summaries
    assert last[0] == 6 and last[1]["msg"].startswith("sink central delivering again after an ")
    length = up_at - down_at
    # one outage for the sink, not one per stream; one summary per interval at most
    assert len(summaries) <= length / INTERVAL + 1, [d["msg"] for _, d in fwd]
    assert len(summaries) >= 3, [d["msg"] for _, d in fwd]  # it did go on: it was said
    retries = int(re.search(r"\(([\d,]+) retries\)", last[1]["msg"]).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert retries > 2 * len(fwd), (retries, len(fwd))  # retries are not lines any more
    # nothing else chatters during the outage either (the HTTPS sink logs nothing per retry)
    others = [d["msg"] for _, d in during if d["logger"] != "edge_agent.forwarder"]
    assert len(others) <= 2, others
    print(f"real outage of {length:.1f} s, summary interval {INTERVAL:g} s: {len(during)} log "
          f"lines ({len(fwd)} from the forwarder), {retries} retries")  # fmt: skip


def test_streams_racing_through_the_figures_say_things_once(collected: Collect) -> None:
    """Found by the 10-minute measurement: two streams' forwarders recovering together
    both logged the recovery while one awaited the buffer's figures."""
    clock = Clock()
    out = SinkOutage("central", interval=60.0, clock=clock)

    async def slow(_: set[str]) -> tuple[int, float | None]:
        await asyncio.sleep(0.01)
        return 5, 1.0

    async def run() -> None:
        await out.failed("a", "down", figures=slow)
        await out.failed("b", "down", figures=slow)
        clock.now += 61
        await asyncio.gather(out.failed("a", "down", figures=slow),
                             out.failed("b", "down", figures=slow))  # fmt: skip
        await asyncio.gather(out.delivered("a", figures=slow), out.delivered("b", figures=slow))

    asyncio.run(run())
    msgs = [r.getMessage() for r in collected.records]
    assert [m.split(" ")[2] for m in msgs] == ["failing", "still", "delivering"], msgs

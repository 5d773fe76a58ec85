"""SIGHUP reload (issue 6 item 7), with a real agent process, real gateways and real MES pushes.

- A valid changed config (sink moved to another gateway, batch size changed, a source added
  on a new port, one removed) applies while an MES keeps pushing; every acknowledged event
  arrives at the new gateway, in order per stream, nothing missing, the batches that were
  in flight before the reload resent under their keys.
- An invalid config (unknown key, bad URL, dangling stream->sink reference) is refused with
  one log line naming the key path; the running config goes on (same port, same gateway,
  the source not even restarted); a fixed config then applies.
- A config file that vanished, became a directory or is not UTF-8 at SIGHUP: refused the
  same way, the agent keeps collecting and forwarding.

The gateway's report is the judge of delivery (tests.fixtures.campaign.check_delivery):
missing_count 0, out_of_order 0, id_conflicts 0, every 202 answered event present under
the id and sequence it was acknowledged with.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from adapters.sinks.https import HttpsSink
from tests.fixtures.campaign import (
    MesClient,
    check_delivery,
    mes_source,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import AgentProcess, agent_config, free_port, https_sink, to_toml

REFUSED = "reload refused"
APPLIED = "reloading: restarting sources, sinks and forwarders"


# ------------------------------------------------------------------------------ helpers


def log_lines(agent: AgentProcess, needle: str) -> list[str]:
    return [line for line in agent.log().splitlines() if needle in line]


def wait_log(agent: AgentProcess, needle: str, count: int, timeout: float = 30) -> list[str]:
    """Until the agent's log has ``count`` lines containing ``needle`` (the agent alive)."""
    deadline = time.monotonic() + timeout
    while True:
        assert agent.proc is not None
        assert agent.proc.poll() is None, (
            f"agent exited with {agent.proc.returncode}:\n{agent.log()[-4000:]}"
        )
        lines = log_lines(agent, needle)
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, (
            f"{len(lines)} of {count} log lines with {needle!r}\n{agent.log()[-3000:]}"
        )
        time.sleep(0.1)


def assert_refused(agent: AgentProcess, nth: int, *fragments: str) -> dict[str, Any]:
    """The nth refusal is exactly one JSON log line (error level) naming ``fragments``."""
    lines = wait_log(agent, REFUSED, nth)
    time.sleep(0.3)  # a second line about the same refusal would show up by now
    lines = log_lines(agent, REFUSED)
    assert len(lines) == nth, lines
    doc = json.loads(lines[-1])  # one line holds the whole record
    assert doc["level"] == "error", doc
    msg = doc["msg"]
    assert "\n" not in msg and "exc" not in doc, doc
    assert msg.startswith("reload refused, the running config is kept: "), msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert log_lines(agent, APPLIED) == [], "a refused config was applied"
    return doc


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def push_acked(client: MesClient, http: httpx.Client, count: int, per_request: int = 5) -> None:
    """Push ``count`` new events through ``client``; each request must get 202 at once."""
    for start in range(client.next_number, client.next_number + count, per_request):
        numbers = list(range(start, min(start + per_request, client.next_number + count)))
        assert client.push_once(http, numbers) == 202, client.problems
    client.next_number += count
    assert client.problems == [], client.problems


def status_with(agent: AgentProcess, config_file: Path) -> dict[str, Any]:
    """status --json reading the buffer named by ``config_file`` (the agent's own config
    file may be missing or broken at that moment)."""
    res = agent.cli("status", "--json", "-c", str(config_file))
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def wait_configured(
    agent: AgentProcess, sources: dict[str, int], sink: str, config_file: Path | None = None
) -> dict[str, Any]:
    """Until status shows the agent running with exactly these sources (name -> port) and
    this sink, all connected (status reads a heartbeat written every 2 s)."""

    def as_configured(st: dict[str, Any]) -> bool:
        return (
            st["agent"]["running"] is True
            and [s["name"] for s in st["sinks"]] == [sink]
            and st["sinks"][0]["state"] == "connected"
            and {s["name"]: s["state"] for s in st["sources"]}
            == dict.fromkeys(sources, "connected")
            and {s["name"]: s["detail"]["listen"] for s in st["sources"]}
            == {n: f"127.0.0.1:{p}" for n, p in sources.items()}
        )

    deadline = time.monotonic() + 30
    while True:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-3000:]
        st = status_with(agent, config_file or agent.config_path)
        if as_configured(st):
            return st
        assert time.monotonic() < deadline, (st["agent"], st["sinks"], st["sources"])
        time.sleep(0.3)


def open_batches(buffer_db: Path) -> dict[str, list[tuple[str, int, int]]]:
    """The agent's persisted in-flight batches per stream: (batch id, first, last)."""
    conn = sqlite3.connect(f"file:{buffer_db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT s.name, b.batch_id, b.first_seq, b.last_seq FROM batches b "
            "JOIN streams s ON s.sid = b.sid ORDER BY b.first_seq"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, list[tuple[str, int, int]]] = {}
    for stream, key, first, last in rows:
        out.setdefault(stream, []).append((key, first, last))
    return out


def gateway_batches(gw: Any, stream: str) -> list[tuple[str, int, int]]:
    """Batches the gateway accepted for ``stream``, in arrival order: (key, first, last)."""
    conn = sqlite3.connect(f"file:{gw.db_path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT b.key, b.first_sequence, b.last_sequence FROM batches b "
            "JOIN streams s ON s.sk = b.sk WHERE s.stream = ? ORDER BY b.bn",
            (stream,),
        ).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------------------ valid reload


def test_valid_reload_moves_sink_and_sources_without_losing_or_reordering_events(
    gateway, agent_process, tmp_path
):
    gw_a = gateway()
    gw_b = gateway()
    gw_a.stop()  # the old sink's gateway is down: everything stays buffered
    p_mes, p_legacy, p_line2 = free_port(), free_port(), free_port()
    old = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw_a)},
        sources={"mes": mes_source(p_mes), "legacy": mes_source(p_legacy, stream="legacy")},
        forwarder={"max_events": 50, "linger_ms": 5},
    )
    agent = agent_process(old, workdir=tmp_path).start(wait_ready=False)
    wait_listening(agent, p_mes)
    wait_listening(agent, p_legacy)

    mes = MesClient(p_mes, batch=5, pause=0.01).start()
    legacy = MesClient(p_legacy, next_number=100_000)
    with httpx.Client(timeout=10) as http:
        push_acked(legacy, http, 40)
    deadline = time.monotonic() + 60
    while len(mes.acked) < 150:
        assert time.monotonic() < deadline, f"only {len(mes.acked)} events acked: {mes.statuses}"
        time.sleep(0.1)

    # the backlog is real: nothing reached a gateway, the first batch of each stream is
    # formed and stuck on the wire to the dead gateway A
    st = agent.wait(
        lambda s: (
            s["sinks"][0]["state"] == "disconnected"
            and {x["stream"] for x in s["streams"]} == {"mes", "legacy"}
            and all(x["forwarded_total"] == 0 and x["backlog_events"] > 0 for x in s["streams"])
        ),
        timeout=30,
        what="both streams backlogged, sink A disconnected",
    )
    buffer_db = Path(old["buffer"]["path"])
    deadline = time.monotonic() + 20
    while set(before := open_batches(buffer_db)) != {"mes", "legacy"}:
        assert time.monotonic() < deadline, f"no in-flight batch per stream: {before}"
        time.sleep(0.1)
    # one batch on the wire, and up to the HTTPS sink's read_ahead behind it, contiguous
    # from sequence 1
    for held in before.values():
        assert 1 <= len(held) <= 1 + HttpsSink.read_ahead and held[0][1] == 1, before
        assert all(b[1] == a[2] + 1 for a, b in zip(held, held[1:], strict=False)), before
    assert gw_b.report()["totals"]["received"] == 0

    # the new config: sink -> gateway B (another name), batch size 7, legacy source removed,
    # line2 added on a new port; the MES keeps pushing to the unchanged source throughout
    new = agent_config(
        tmp_path,
        sinks={"central_b": https_sink(gw_b)},
        sources={"mes": mes_source(p_mes), "line2": mes_source(p_line2, stream="line2")},
        forwarder={"max_events": 7, "linger_ms": 5},
    )
    agent.write_config(new)
    acked_at_hup = len(mes.acked)
    agent.signal(signal.SIGHUP)
    wait_log(agent, APPLIED, 1)
    wait_listening(agent, p_line2)
    assert refuses_connections(p_legacy), "the removed source still listens"
    gw_a.start()  # A is back, but no longer configured: it must get nothing from now on

    line2 = MesClient(p_line2, next_number=200_000)
    with httpx.Client(timeout=10) as http:
        push_acked(line2, http, 30)
    deadline = time.monotonic() + 60
    while len(mes.acked) < acked_at_hup + 100:  # the MES pushed on through the reload
        assert time.monotonic() < deadline, f"MES stalled after the reload: {mes.statuses}"
        time.sleep(0.1)
    mes.stop()
    assert mes.problems == [], mes.problems

    wait_drained(agent, timeout=90)
    st = wait_configured(agent, {"mes": p_mes, "line2": p_line2}, "central_b")
    assert {x["stream"]: x["sink"] for x in st["streams"]} == dict.fromkeys(
        ("mes", "legacy", "line2"), "central_b"
    )
    assert agent.stop() == 0

    # delivery, judged by gateway B: all three streams complete, in order, ids as acked
    for stream, client in (("mes", mes), ("legacy", legacy), ("line2", line2)):
        summary = check_delivery(gw_b, client.acked, stream=stream)
        assert summary["acked"] == len(client.acked) > 0, (stream, summary)
        rep = gw_b.stream_report(stream)
        assert rep is not None and rep["complete_up_to"] == rep["highest_sequence"], rep
    assert gw_b.stream_report("mes")["highest_sequence"] == len(mes.acked)  # type: ignore[index]
    assert gw_a.report()["totals"]["received"] == 0, "events went to the old sink"

    # the batches in flight before the reload went to B first, under the same keys and
    # ranges; every batch formed afterwards respects the new max_events = 7
    for stream, pending in before.items():
        got = gateway_batches(gw_b, stream)
        assert got[: len(pending)] == pending, (stream, got[:3], pending)
        sizes = [last - first + 1 for _, first, last in got[len(pending) :]]
        # legacy's 40 events may all have been held before the reload (read-ahead); mes
        # went on pushing, so it always has batches formed afterwards
        assert (sizes or stream != "mes") and max(sizes, default=0) <= 7, (stream, sizes)
    assert 7 in [b - a + 1 for _, a, b in gateway_batches(gw_b, "mes")]
    log = agent.log()
    assert len(log_lines(agent, APPLIED)) == 1 and REFUSED not in log


# ------------------------------------------------------------------------------ refused reloads


def _running_agent(
    gateway: Any, agent_process: Any, tmp_path: Path
) -> tuple[Any, Any, int, MesClient]:
    """An agent with one mes_http source on a free port that has delivered 20 events."""
    gw = gateway()
    port = free_port()
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"mes": mes_source(port)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_listening(agent, port)
    mes = MesClient(port)
    with httpx.Client(timeout=10) as http:
        push_acked(mes, http, 20)
    gw.wait_received(20, stream="mes", timeout=30)
    return gw, agent, port, mes


def _still_running_old_config(
    agent: AgentProcess, gw: Any, mes: MesClient, port: int, config_file: Path, moved_to: int
) -> None:
    """The agent runs on with the old config: its source still on ``port`` (never restarted),
    the new config's port closed, pushes accepted and forwarded, status says so."""
    assert agent.proc is not None and agent.proc.poll() is None
    assert refuses_connections(moved_to), "the refused config's new port is listening"
    with httpx.Client(timeout=10) as http:
        push_acked(mes, http, 20)
    gw.wait_received(len(mes.acked), stream="mes", timeout=30)
    wait_configured(agent, {"mes": port}, "central", config_file)
    assert len(log_lines(agent, f"mes: listening on http://127.0.0.1:{port}")) == 1


def test_invalid_config_is_refused_with_one_line_and_the_running_one_kept(
    gateway, agent_process, tmp_path
):
    gw, agent, port, mes = _running_agent(gateway, agent_process, tmp_path)
    good = agent.config
    moved = free_port()
    moved_source = mes_source(moved)
    copy = tmp_path / "good.toml"  # status reads the buffer through it while agent.toml is bad
    copy.write_text(to_toml(good))

    broken: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        # a typo'd key in a source table (the same config also moves the source)
        (
            {**good, "sources": {"mes": {**moved_source, "retry_afterr": "2s"}}},
            ("sources.mes.retry_afterr: unknown key",),
        ),
        # a sink URL that is not https
        (
            {
                **good,
                "sources": {"mes": moved_source},
                "sinks": {"central": {**good["sinks"]["central"], "url": "ftp://gw.example/x"}},
            },
            ("sinks.central.url:", "https://"),
        ),
        # a stream routed to a sink that does not exist (checked across sections)
        (
            {**good, "sources": {"mes": moved_source}, "streams": {"mes": {"sink": "nowhere"}}},
            ("streams.mes.sink:", "nowhere"),
        ),
    ]
    for nth, (doc, fragments) in enumerate(broken, start=1):
        agent.write_config(doc)
        agent.signal(signal.SIGHUP)
        assert_refused(agent, nth, *fragments)
        _still_running_old_config(agent, gw, mes, port, copy, moved)

    # fixed: the same move, valid this time, applies
    agent.write_config({**good, "sources": {"mes": moved_source}})
    _the_move_applies_and_everything_arrives(agent, gw, mes, port, moved)


def _the_move_applies_and_everything_arrives(
    agent: AgentProcess, gw: Any, mes: MesClient, port: int, moved: int
) -> None:
    """After the SIGHUP of a valid config that moves the source from ``port`` to ``moved``:
    it applies, and every event acknowledged before and after arrives in order."""
    agent.signal(signal.SIGHUP)
    wait_log(agent, APPLIED, 1)
    wait_listening(agent, moved)
    assert refuses_connections(port), "the old port still listens after the move"
    moved_mes = MesClient(moved, next_number=mes.next_number, acked=mes.acked)
    with httpx.Client(timeout=10) as http:
        push_acked(moved_mes, http, 20)
    wait_drained(agent)
    wait_configured(agent, {"mes": moved}, "central")
    assert agent.stop() == 0
    summary = check_delivery(gw, moved_mes.acked)
    assert summary["acked"] == 20 + 3 * 20 + 20 == summary["highest_sequence"], summary
    assert len(log_lines(agent, REFUSED)) == 3


def test_missing_or_unreadable_config_at_sighup_is_refused_and_the_agent_keeps_running(
    gateway, agent_process, tmp_path
):
    gw, agent, port, mes = _running_agent(gateway, agent_process, tmp_path)
    good = agent.config
    path = agent.config_path
    copy = tmp_path / "good.toml"
    copy.write_text(to_toml(good))
    moved = free_port()
    moved_toml = to_toml({**good, "sources": {"mes": mes_source(moved)}})

    # 1. the file is gone (an operator moved it away, a package upgrade removed it)
    path.unlink()
    agent.signal(signal.SIGHUP)
    assert_refused(agent, 1, str(path), "no such file")
    _still_running_old_config(agent, gw, mes, port, copy, moved)

    # 2. a directory where the file was: cannot be read
    path.mkdir()
    agent.signal(signal.SIGHUP)
    assert_refused(agent, 2, str(path), "cannot read")
    _still_running_old_config(agent, gw, mes, port, copy, moved)
    path.rmdir()

    # 3. not UTF-8 (saved as Latin-1 by an editor): refused, not a crash
    path.write_bytes(("# Halle S\u00fcd, Linie 2\n" + moved_toml).encode("latin-1"))
    agent.signal(signal.SIGHUP)
    assert_refused(agent, 3, str(path), "UTF-8")
    _still_running_old_config(agent, gw, mes, port, copy, moved)

    # the file is back, valid and changed: it applies
    path.write_text(moved_toml)
    _the_move_applies_and_everything_arrives(agent, gw, mes, port, moved)


def test_reload_whose_sink_cannot_start_goes_back_to_the_running_config(
    gateway, agent_process, tmp_path
):
    """The file is valid but its sink fails at start (a CA file that is not PEM): refused in
    one line, the previous config runs again, nothing acknowledged is lost."""
    gw, agent, port, mes = _running_agent(gateway, agent_process, tmp_path)
    good = agent.config
    not_pem = tmp_path / "ca-not-pem.crt"
    not_pem.write_text("this is not a certificate\n")
    moved = free_port()
    agent.write_config(
        {
            **good,
            "sources": {"mes": mes_source(moved)},
            "sinks": {"central": {**good["sinks"]["central"], "ca_file": str(not_pem)}},
        }
    )
    agent.signal(signal.SIGHUP)
    lines = wait_log(agent, REFUSED, 1)
    doc = json.loads(lines[0])
    assert doc["level"] == "error" and "sinks.central" in doc["msg"], doc
    assert "\n" not in doc["msg"] and "exc" not in doc, doc
    # the previous generation runs again: the old port (not the refused one) takes pushes
    wait_listening(agent, port)
    assert refuses_connections(moved), "the refused config's port is listening"
    with httpx.Client(timeout=10) as http:
        push_acked(mes, http, 20)
    wait_drained(agent)
    agent.write_config(good)  # status reads the buffer through the (good) config file
    wait_configured(agent, {"mes": port}, "central")
    assert agent.stop() == 0
    summary = check_delivery(gw, mes.acked)
    assert summary["acked"] == 40 == summary["highest_sequence"], summary

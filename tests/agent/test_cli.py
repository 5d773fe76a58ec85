"""The command line (issue 2, item 8), run as an operator runs it: ``python -m agent ...``
as a subprocess, against real agent processes, real buffer files and the real reference
gateway.

- ``--version`` is the package's version; exit codes are 0 ok, 2 usage or config error,
  1 runtime failure; expected errors are one line (usage errors too, with where to get
  help), never a traceback.
- ``status`` (table and ``--json`` schema 1) while the agent runs and after it stopped,
  reading the buffer without changing a byte of it; the table fits 100 columns and has no
  colour codes when piped.
- ``dead-letter list|show|retry|drop`` on a real dead letter (the gateway's poison event), and
  ``replay --from-sequence`` / ``--since``: the gateway counts the re-sent events as
  duplicates under the very ids it already holds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import sqlite3
import subprocess
import time
import tomllib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.encoding import stored_json
from tests.fixtures.common import (
    AgentProcess,
    agent_config,
    free_port,
    https_sink,
    run_cli,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "example.toml"
SINK = {"type": "https", "url": "https://gw.example.com/v1/batches"}


def edge_agent(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The real CLI; stdout and stderr are pipes, as in a script or a ticket."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env["TERM"] = "xterm-256color"  # only the pipe may keep colour out
    env["COLUMNS"] = "240"  # a wide terminal must not widen piped output
    return run_cli(*args, env=env, cwd=cwd)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr
    return res.stdout


def one_line_error(res: subprocess.CompletedProcess[str], code: int) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == code, (res.returncode, out)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    return lines[0]


def usage_error(res: subprocess.CompletedProcess[str]) -> str:
    """A usage error: exit 2, one ``Error:`` line ending in where to get help; the line
    returned without that hint."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    line, sep, hint = lines[0].rpartition(" (see: edge-agent")
    assert sep and hint.endswith(" --help)"), lines[0]
    return line


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(to_toml(doc), encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ version, exit codes


def test_version_is_the_package_metadata() -> None:
    meta = importlib.metadata.version("plant-edge-agent")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert meta == project, "installed metadata is stale: reinstall the package"
    for flag in ("--version", "-V"):
        res = edge_agent(flag)
        assert ok(res) == f"edge-agent, version {meta}\n"
        assert res.stderr == ""


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["status", "--bogus"], "No such option '--bogus'"),
        (["nosuchcommand"], "No such command 'nosuchcommand'"),
        (
            ["status", "--interval", "soon"],
            "Invalid value for '--interval': 'soon' is not a valid float",
        ),
        (["replay", "-c", str(EXAMPLE)], "Missing option '--stream'"),
        (
            ["replay", "--stream", "mes", "--since", "2026-01-01", "--from-sequence", "1"],
            "give exactly one of --since or --from-sequence",
        ),
        (["replay", "--stream", "mes"], "give exactly one of --since or --from-sequence"),
        (["dead-letter", "retry"], "name event ids, or --all"),
        (["dead-letter", "drop"], "name event ids, or --all"),
        (["config", "check"], "Missing argument 'FILE'"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40],
)
def test_usage_errors_exit_2_without_traceback(args: list[str], error: str) -> None:
    line = usage_error(edge_agent(*args))
    assert line in (f"Error: {error}.", f"Error: {error}"), line


def test_without_c_the_default_config_path_is_named(tmp_path: Path) -> None:
    """No -c: the packaged default /etc/edge-agent/edge-agent.toml; absent here -> exit 2."""
    for args in (["status"], ["run"], ["dead-letter", "list"]):
        line = one_line_error(edge_agent(*args, cwd=tmp_path), 2)
        assert line == (
            "config error: /etc/edge-agent/edge-agent.toml: no such file "
            "(pass -c PATH to a config file)"
        )


def test_config_error_exits_2_for_every_command(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "bad.toml", {"buffer": {"max_bytes": "lots"}, "sinks": {"central": SINK}}
    )
    for args in (
        ["status"],
        ["status", "--json"],
        ["dead-letter", "list"],
        ["dead-letter", "show", "01JABC"],
        ["replay", "--stream", "mes", "--from-sequence", "1"],
    ):
        line = one_line_error(edge_agent(*args, "-c", str(cfg)), 2)
        assert line.startswith("config error: buffer.max_bytes: 'lots' is not a size"), line


def test_status_without_a_buffer_is_a_runtime_failure(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "edge-agent.toml",
        {"buffer": {"path": str(tmp_path / "buffer.db")}, "sinks": {"central": SINK}},
    )
    for args in (["status"], ["status", "--json"]):
        line = one_line_error(edge_agent(*args, "-c", str(cfg)), 1)
        assert line == (
            f"Error: no buffer at {tmp_path / 'buffer.db'}: the agent has not run with this "
            "config yet (start it: edge-agent run -c FILE)"
        )
    for args in (["dead-letter", "list"], ["replay", "--stream", "s", "--from-sequence", "1"]):
        line = one_line_error(edge_agent(*args, "-c", str(cfg)), 1)
        assert line.startswith(f"Error: no buffer at {tmp_path / 'buffer.db'}"), line
    assert not (tmp_path / "buffer.db").exists(), "status must not create the buffer"


def test_status_on_a_corrupt_buffer_fails_with_one_line_and_leaves_it_alone(
    tmp_path: Path,
) -> None:
    buf = tmp_path / "buffer.db"
    buf.write_bytes(b"this is not an SQLite database, whatever it once was\n" * 200)
    before = sha256(buf)
    cfg = write_config(
        tmp_path / "edge-agent.toml", {"buffer": {"path": str(buf)}, "sinks": {"central": SINK}}
    )
    for args in (["status"], ["status", "--json"]):
        line = one_line_error(edge_agent(*args, "-c", str(cfg)), 1)
        assert line.startswith(f"Error: cannot read buffer {buf}: "), line
        assert "not a database" in line, line
    # status only reads: the file is neither rewritten nor quarantined (that is run's job)
    assert sha256(buf) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer.db", "edge-agent.toml"]


# ------------------------------------------------------------------ status

AGENT_KEYS = {"id", "plant", "version", "running", "pid", "started_at", "heartbeat_age_s"}
BUFFER_KEYS = {"path", "file_bytes", "used_bytes", "max_bytes", "on_full", "durability",
               "epoch", "ingest_rate_eps", "full_in_s", "refused_total"}  # fmt: skip
STREAM_KEYS = {"stream", "sink", "priority", "last_sequence", "forwarded_sequence",
               "backlog_events", "backlog_bytes", "oldest_unsent_age_s", "last_forwarded_at",
               "last_error", "state", "dead_letters", "ingested_total", "forwarded_total",
               "dropped_total", "dead_lettered_total", "refused_total"}  # fmt: skip
SINK_KEYS = {"name", "type", "state", "since", "last_error"}
SOURCE_KEYS = {"name", "type", "stream", "state", "since", "last_error", "detail"}


def test_schema_in_this_test_is_the_documented_one() -> None:
    """The key sets above are copied from agent/status.py's documented schema 1."""
    import agent.status

    doc = agent.status.__doc__ or ""
    for keys in (AGENT_KEYS, BUFFER_KEYS, STREAM_KEYS, SINK_KEYS, SOURCE_KEYS):
        for key in keys:
            assert f'"{key}"' in doc, key
    assert '"schema": 1' in doc


def check_schema(snap: dict[str, Any]) -> None:
    assert set(snap) == {"schema", "agent", "buffer", "streams", "sinks", "sources"}, set(snap)
    assert snap["schema"] == 1
    assert set(snap["agent"]) == AGENT_KEYS
    assert BUFFER_KEYS <= set(snap["buffer"]), BUFFER_KEYS - set(snap["buffer"])
    for s in snap["streams"]:
        assert STREAM_KEYS <= set(s), STREAM_KEYS - set(s)
    for s in snap["sinks"]:
        assert SINK_KEYS <= set(s), SINK_KEYS - set(s)
    for s in snap["sources"]:
        assert SOURCE_KEYS <= set(s), SOURCE_KEYS - set(s)


def check_table(text: str, snap: dict[str, Any], *must: str) -> None:
    """Plain text, at most 100 columns, and nothing an operator reads is cut short: every
    column header whole, every stream's state whole (a long stream name gives way)."""
    assert "\x1b" not in text, "colour codes in piped output"
    lines = text.splitlines()
    wide = [line for line in lines if len(line) > 100]
    assert not wide, f"lines over 100 columns: {wide}"
    for word in must:
        assert word in text, (word, text)
    (header,) = [line for line in lines if line.startswith("stream ")]
    assert re.split(r"\s{2,}", header.strip()) == STREAM_COLUMNS, text
    for s in snap["streams"]:
        (row,) = [line for line in lines if line.startswith(s["stream"][:20])]
        cells = re.split(r"\s{2,}", row.strip())
        assert cells[1] in STREAM_STATES, (cells, text)  # (it may have moved on since snap)
        if s["state"] == "stopped":
            assert cells[1] == "stopped", (cells, text)


STREAM_COLUMNS = ["stream", "state", "backlog", "oldest", "last sent", "sent", "dropped", "dead"]
STREAM_STATES = {"idle", "sending", "retrying", "auth_failed", "error", "stopped"}
LONG_STREAM = "quality-inspection-station-07-final-assembly-east"


def status_json(cfg: Path) -> dict[str, Any]:
    snap: dict[str, Any] = json.loads(ok(edge_agent("status", "--json", "-c", str(cfg))))
    check_schema(snap)
    return snap


def by_name(items: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {x[key]: x for x in items}


def test_status_running_and_stopped(gateway: Any, tmp_path: Path) -> None:
    """Two streams: line1 goes to the gateway; a long-named one goes to a sink nobody
    listens on, so status has a backlog, a retrying sink and a last error to show."""
    gw = gateway()
    dead = f"https://127.0.0.1:{free_port()}/v1/batches"
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw), "backup": https_sink(gw, url=dead)},
        sources={
            "line1": {"type": "simulator", "rate": 200, "limit": 120, "seed": 1},
            "qa": {"type": "simulator", "rate": 200, "limit": 25, "seed": 2, "stream": LONG_STREAM},
        },  # fmt: skip
        streams={LONG_STREAM: {"sink": "backup", "priority": "high"}},
    )
    agent = AgentProcess(tmp_path, cfg)
    c = agent.config_path
    try:
        agent.start(wait_ready=False)
        gw.wait_received(120, stream="line1", timeout=60)
        deadline = time.monotonic() + 40
        while True:
            snap = status_json(c)
            streams = by_name(snap["streams"], "stream")
            line1, qa = streams.get("line1"), streams.get(LONG_STREAM)
            if (
                snap["agent"]["running"]
                and line1 is not None
                and line1["forwarded_total"] == 120
                and qa is not None
                and qa["backlog_events"] == 25
                and qa["last_error"]
                and by_name(snap["sinks"], "name").get("central", {}).get("state") == "connected"
            ):
                break
            assert time.monotonic() < deadline, f"status never settled: {snap}"
            time.sleep(0.5)
        # running: agent facts, per stream and per sink
        assert agent.proc is not None
        assert snap["agent"]["pid"] == agent.proc.pid
        assert snap["agent"]["id"] == "test-agent" and snap["agent"]["plant"] == "test-plant"
        assert snap["agent"]["heartbeat_age_s"] < 10
        assert snap["buffer"]["path"] == cfg["buffer"]["path"]
        assert line1["backlog_events"] == 0 and line1["last_forwarded_at"] is not None
        assert line1["sink"] == "central" and line1["forwarded_sequence"] == 120
        assert qa["sink"] == "backup" and qa["priority"] == "high"
        assert qa["forwarded_total"] == 0 and qa["oldest_unsent_age_s"] > 0
        sinks = by_name(snap["sinks"], "name")
        assert sinks["backup"]["state"] != "connected" and sinks["backup"]["last_error"]
        assert {s["name"] for s in snap["sources"]} == {"line1", "qa"}
        table = ok(edge_agent("status", "-c", str(c)))
        check_table(table, snap, f"RUNNING (pid {agent.proc.pid}", "line1", LONG_STREAM,
                    "sink central", "sink backup", "last errors:")  # fmt: skip

        assert agent.stop() == 0
    finally:
        agent.kill()

    # stopped: read-only, and every figure kept
    buf = Path(cfg["buffer"]["path"])
    files = sorted(p for p in tmp_path.iterdir() if p.name.startswith("buffer.db"))
    before = {p.name: sha256(p) for p in files}
    stopped = status_json(c)  # --json: 0 whenever it prints the snapshot
    res = edge_agent("status", "-c", str(c))
    assert res.returncode == 3, (res.returncode, res.stderr)  # the table: 3 = not running
    assert "Traceback" not in res.stdout + res.stderr and res.stderr == ""
    table = res.stdout
    assert {p.name: sha256(p) for p in files} == before, "status changed the buffer"
    assert buf in files
    assert stopped["agent"]["running"] is False and stopped["agent"]["pid"] is None
    assert stopped["agent"]["heartbeat_age_s"] >= 0
    streams = by_name(stopped["streams"], "stream")
    assert streams["line1"]["forwarded_total"] == 120 and streams["line1"]["backlog_events"] == 0
    assert streams[LONG_STREAM]["backlog_events"] == 25
    assert streams[LONG_STREAM]["last_error"] == qa["last_error"]
    assert {s["state"] for s in stopped["streams"]} == {"stopped"}
    assert {s["state"] for s in stopped["sinks"] + stopped["sources"]} == {"stopped"}
    check_table(table, stopped, "NOT RUNNING", "line1", LONG_STREAM, "stopped")
    assert "RUNNING (pid" not in table

    # keep_forwarded = 0: nothing is kept for a replay, said in one line
    line = one_line_error(
        edge_agent("replay", "--stream", "line1", "--from-sequence", "1", "-c", str(c)), 1
    )
    assert line == (
        "Error: no forwarded events of stream line1 are kept: buffer.keep_forwarded = 0 "
        'deletes them once forwarded (set it, e.g. "7d", to allow replays)'
    )
    line = one_line_error(
        edge_agent("replay", "--stream", "nope", "--from-sequence", "1", "-c", str(c)), 1
    )
    assert line.startswith("Error: no stream 'nope' in the buffer (streams: "), line
    assert "line1" in line and LONG_STREAM in line
    line = usage_error(edge_agent("replay", "--stream", "line1", "--since", "soon", "-c", str(c)))
    assert line == "Error: Invalid value: use ISO 8601, e.g. 2026-11-23T08:00:00Z", line


# ------------------------------------------------------------------ dead letters, replay


def mes_event(i: int, subject: str | None = None) -> dict[str, Any]:
    return {
        "type": "mfg.production.completed",
        "time": "2026-11-23T10:15:02.123Z",
        "id": f"MES-{i}",
        "subject": subject or f"WO-{4700 + i}",
        "data": {"work_order": f"WO-{4700 + i}", "item": "PN-100",
                 "good": {"value": 10 + i, "uom": "EA"}},
    }  # fmt: skip


def push(port: int, events: list[dict[str, Any]]) -> list[str]:
    deadline = time.monotonic() + 30
    while True:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/events", json=events, timeout=10)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "MES port never answered"
            time.sleep(0.1)
    assert r.status_code == 202, r.text
    return [e["id"] for e in r.json()["events"]]


def sent_batches(gw: Any) -> list[list[dict[str, Any]]]:
    """Every batch the gateway accepted (a replay arrives under a new Idempotency-Key)."""
    conn = sqlite3.connect(f"file:{gw.db_path}?mode=ro", uri=True)
    try:
        # the gateway keeps a gzip body as it arrived (gateway/encoding.py)
        rows = conn.execute("SELECT body FROM batches ORDER BY bn")
        return [orjson.loads(stored_json(b)) for (b,) in rows]
    finally:
        conn.close()


def wait_duplicates(gw: Any, stream: str, n: int, timeout: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rep = gw.stream_report(stream)
        if rep is not None and rep["duplicates"] >= n:
            return rep  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"gateway counted {rep and rep['duplicates']} of {n}"
        time.sleep(0.2)


def test_dead_letters_and_replay_with_the_same_ids(gateway: Any, tmp_path: Path) -> None:
    gw = gateway(poison=["POISON-1"])
    port = free_port()
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw)},
        sources={"mes": {"type": "mes_http", "stream": "mes", "listen": f"127.0.0.1:{port}"}},
        forwarder={"linger_ms": 300},
        buffer={"keep_forwarded": "1h"},
    )
    agent = AgentProcess(tmp_path, cfg)
    c = str(agent.config_path)
    try:
        agent.start(wait_ready=False)
        events = [mes_event(i) for i in range(1, 31)]
        events[9]["subject"] = "POISON-1"  # sequence 10
        ids = push(port, events)
        poison_id = ids[9]
        gw.wait_received(29, stream="mes", timeout=40)
        deadline = time.monotonic() + 20
        while not json.loads(ok(edge_agent("dead-letter", "list", "--json", "-c", c))):
            assert time.monotonic() < deadline, "the poison event was never dead-lettered"
            time.sleep(0.3)
        since = datetime.now(UTC)
        time.sleep(0.05)
        ids += push(port, [mes_event(i) for i in range(31, 41)])
        gw.wait_received(39, stream="mes", timeout=40)

        # dead-letter list | show | retry | drop
        dl = json.loads(ok(edge_agent("dead-letter", "list", "--json", "-c", c)))
        assert [(d["stream"], d["sequence"], d["id"], d["status"]) for d in dl] == [
            ("mes", 10, poison_id, 422)
        ]
        # the reason is the gateway's whole answer, with its own words for this event
        answer = json.loads(dl[0]["reason"].removeprefix("HTTP 422: "))
        (refused,) = answer["rejected"]
        assert refused["id"] == poison_id and refused["reason"] == "poison subject 'POISON-1'"
        listed = ok(edge_agent("dead-letter", "list", "-c", c)).splitlines()
        assert len(listed) == 1 and listed[0].startswith(f"mes  #10  {poison_id}  "), listed
        assert "HTTP 422" in listed[0]
        assert listed[0].endswith(f"  {dl[0]['reason']}"), listed  # in full, not cut off
        assert len(dl[0]["reason"]) > 120, dl  # (the old list cut it at 120 characters)
        assert ok(edge_agent("dead-letter", "list", "--stream", "other", "-c", c)) == (
            "no dead letters\n"
        )
        shown = ok(edge_agent("dead-letter", "show", poison_id, "-c", c))
        assert shown.startswith("reason: ") and "poison" in shown.splitlines()[0]
        assert shown.splitlines()[1] == "status: 422"
        body = json.loads(shown.split("\n", 2)[2])
        assert body["id"] == poison_id and body["subject"] == "POISON-1"
        assert int(body["sequence"]) == 10
        line = one_line_error(edge_agent("dead-letter", "show", "01NOSUCHID", "-c", c), 1)
        assert line == "Error: no dead letter with id 01NOSUCHID (edge-agent dead-letter list)"
        # retry while the gateway still refuses it: tried again, refused again, kept
        rejected = gw.report()["requests"]["rejected_422"]
        assert ok(edge_agent("dead-letter", "retry", poison_id, "-c", c)).startswith(
            "1 dead letter(s) marked for retry"
        )
        deadline = time.monotonic() + 30
        while True:
            dl = json.loads(ok(edge_agent("dead-letter", "list", "--json", "-c", c)))
            assert [d["id"] for d in dl] == [poison_id], dl
            if not dl[0]["retry_requested"]:
                break
            assert time.monotonic() < deadline, "the running agent never retried it"
            time.sleep(0.3)
        assert dl[0]["status"] == 422 and "poison" in dl[0]["reason"], dl
        assert gw.report()["requests"]["rejected_422"] == rejected + 1
        assert ok(edge_agent("dead-letter", "drop", poison_id, "-c", c)) == (
            "1 dead letter(s) dropped\n"
        )
        assert ok(edge_agent("dead-letter", "list", "-c", c)) == "no dead letters\n"
        assert json.loads(ok(edge_agent("dead-letter", "list", "--json", "-c", c))) == []
        assert ok(edge_agent("dead-letter", "drop", "--all", "-c", c)) == (
            "0 dead letter(s) dropped\n"
        )

        # replay --from-sequence: 5..40 without the dropped 10 -> 35 events again
        gw.control(poison=[])
        st = agent.stream("mes")
        assert st["last_sequence"] == 40 and st["forwarded_sequence"] == 40, st
        out = ok(edge_agent("replay", "--stream", "mes", "--from-sequence", "5", "-c", c))
        assert out == (
            "replay of 35 event(s) of stream mes (sequences 5-40) queued; "
            "the running agent sends them with their original ids\n"
        )
        rep = wait_duplicates(gw, "mes", 35)
        assert rep["duplicates"] == 35 and rep["id_conflicts"] == 0, rep

        # replay --since, queued while the agent is stopped: sent once it is back
        assert agent.stop() == 0
        stamp = since.isoformat().replace("+00:00", "Z")
        out = ok(edge_agent("replay", "--stream", "mes", "--since", stamp, "-c", c))
        assert out.startswith("replay of 10 event(s) of stream mes (sequences 31-40) queued")
        agent.start(wait_ready=False)
        rep = wait_duplicates(gw, "mes", 45)
        assert agent.stop() == 0
    finally:
        agent.kill()

    # the gateway's verdict: every replayed event is a duplicate of one it holds, same id
    rep = gw.stream_report("mes")
    assert rep["duplicates"] == 45, rep
    assert rep["received"] == 39 and rep["id_conflicts"] == 0 and rep["out_of_order"] == 0, rep
    assert rep["missing_count"] == 0, rep
    held = {int(e["sequence"]): e["id"] for e in gw.events("mes")}
    assert held == {i + 1: eid for i, eid in enumerate(ids) if i != 9}
    times: Counter[int] = Counter()
    for batch in sent_batches(gw):
        for ev in batch:
            seq = int(ev["sequence"])
            if ev["type"].startswith("mfg.agent."):
                continue
            assert ev["id"] == held[seq], (seq, ev["id"], held[seq])
            times[seq] += 1
    expected = {s: 1 + (s >= 5) + (s >= 31) for s in held}
    assert dict(times) == expected

"""Forwarding end to end: the real agent process -> HTTPS -> the real reference gateway.

Covers issue 2's forwarding tests: TLS with a test CA, mTLS plus bearer token, a wrong CA
and a wrong token (everything kept, said loudly in status), gateway down then up, 500 then
429 with Retry-After (timed in-process through the forwarder's observe hook), a poison
event dead-lettered alone (and the dead-letter commands), and checkpoints proving
completeness at the gateway.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from adapters.sinks.https import Config as HttpsConfig
from adapters.sinks.https import HttpsSink
from agent.buffer import Buffer
from agent.forwarder import ForwarderSettings, StreamForwarder
from agent.interfaces import NewEvent
from tests.fixtures.common import agent_config, free_port, https_sink
from tests.fixtures.forwarding import (
    arrival_sequences,
    assert_complete,
    drained,
    mes_event,
    mes_source,
    simulator,
    stream_of,
    wait_port,
)

# ------------------------------------------------------------------------------ helpers


def push(port: int, events: list[dict[str, Any]], timeout: float = 10) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/events", json=events, timeout=timeout)


# ------------------------------------------------------------------------------ TLS and auth


def test_tls_with_test_ca_delivers_in_order(gateway, agent_process, tmp_path):
    gw = gateway()
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"line1": simulator(rate=300, limit=600)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()
    gw.wait_received(600, stream="line1", timeout=30)
    st = agent.wait(drained("line1", 600), timeout=20, what="line1 drained")
    assert st["sinks"][0]["state"] == "connected", st["sinks"]
    assert_complete(gw, "line1", 600)
    seqs = arrival_sequences(gw, "line1")
    assert seqs == sorted(seqs) and len(seqs) == 600
    assert agent.stop() == 0


def test_mtls_and_bearer_token_from_file(gateway, agent_process, tmp_path):
    gw = gateway(mtls=True, token="gw-secret-token-123")
    token_file = tmp_path / "gateway.token"
    token_file.write_text("gw-secret-token-123\n")
    sink = https_sink(gw, token_file=str(token_file))
    assert "cert_file" in sink and "client_cert" not in sink
    cfg = agent_config(tmp_path, sinks={"central": sink},
                       sources={"line1": simulator(rate=300, limit=300)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()
    gw.wait_received(300, stream="line1", timeout=30)
    assert_complete(gw, "line1", 300)
    # the same gateway refuses a client without a certificate: mTLS really is on
    with httpx.Client(verify=gw.ssl_context(client_cert=False), timeout=5) as c:
        try:
            r = c.post(gw.url, content=b"[]", headers=gw.auth_headers())
            raised = False
            assert r.status_code != 200
        except (httpx.TransportError, httpx.RemoteProtocolError):
            raised = True
    assert raised or r.status_code >= 400
    st = agent.status()
    assert "gw-secret-token-123" not in json.dumps(st)
    assert agent.stop() == 0
    assert "gw-secret-token-123" not in agent.log()


def test_wrong_ca_keeps_events_and_says_tls_verification_failed(
    gateway, agent_process, tmp_path, tls_ca
):
    import trustme

    gw = gateway()
    other = trustme.CA()
    wrong_ca = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(wrong_ca))
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw, ca_file=str(wrong_ca))},
                       sources={"line1": simulator(rate=200, limit=100)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()

    def tls_failed(s: dict[str, Any]) -> bool:
        sink = s["sinks"][0]
        line = [x for x in s["streams"] if x["stream"] == "line1"]
        return (
            "TLS verification" in (sink["last_error"] or "")
            and bool(line)
            and line[0]["backlog_events"] == 100
        )

    st = agent.wait(tls_failed, timeout=30, what="TLS verification failure in status")
    assert st["sinks"][0]["state"] == "error"
    assert "ca_file" in st["sinks"][0]["last_error"]
    assert stream_of(st, "line1")["forwarded_total"] == 0
    assert gw.report()["totals"]["received"] == 0

    # fixed: the right CA (and the source removed, so nothing new comes in), SIGHUP ->
    # everything buffered arrives, in order
    agent.write_config(agent_config(tmp_path, sinks={"central": https_sink(gw)}))
    agent.signal(signal.SIGHUP)
    gw.wait_received(100, stream="line1", timeout=30)
    assert_complete(gw, "line1", 100)
    assert arrival_sequences(gw, "line1") == list(range(1, 101))
    assert agent.stop() == 0


def test_wrong_token_is_auth_failed_keeps_everything_and_resumes_when_fixed(
    gateway, agent_process, tmp_path
):
    gw = gateway(token="the-right-token-42")
    token_file = tmp_path / "gateway.token"
    token_file.write_text("a-wrong-token-99\n")
    cfg = agent_config(tmp_path,
                       sinks={"central": https_sink(gw, token_file=str(token_file))},
                       sources={"line1": simulator(rate=200, limit=150)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()

    def auth_failed(s: dict[str, Any]) -> bool:
        line = [x for x in s["streams"] if x["stream"] == "line1"]
        return (
            s["sinks"][0]["state"] == "auth_failed"
            and bool(line)
            and line[0]["backlog_events"] == 150
            and line[0]["state"] == "auth_failed"
        )

    st = agent.wait(auth_failed, timeout=30, what="auth_failed in status --json")
    line = stream_of(st, "line1")
    assert line["last_error"].startswith("AUTH: HTTP 401"), line
    assert line["forwarded_total"] == 0 and line["dropped_total"] == 0
    assert gw.report()["requests"]["unauthorized"] >= 1
    assert gw.report()["totals"]["received"] == 0
    # the table says it loudly too
    table = agent.cli("status", "-c", str(agent.config_path)).stdout
    assert "auth_failed" in table
    assert "CREDENTIALS" in agent.log()

    # fixed token file + SIGHUP: the sink re-reads the token and everything flows in order
    # (the reload restarts the simulator, which then emits up to its limit again)
    token_file.write_text("the-right-token-42\n")
    agent.signal(signal.SIGHUP)
    # 150 held back + 150 from the restarted simulator
    gw.wait_received(300, stream="line1", timeout=30)
    # (sink states reach status with the heartbeat, a moment after the counters)
    st = agent.wait(
        lambda s: drained("line1", 300)(s) and s["sinks"][0]["state"] == "connected",
        timeout=20,
        what="drained after fix, sink connected",
    )
    assert agent.stop() == 0  # nothing more is emitted: the gateway's view is final
    last = stream_of(st, "line1")["last_sequence"]
    assert last >= 300
    rep = gw.stream_report("line1")
    assert rep["missing_count"] == 0 and rep["out_of_order"] == 0, rep
    assert rep["id_conflicts"] == 0 and rep["complete_up_to"] >= last, rep
    assert arrival_sequences(gw, "line1") == list(range(1, rep["complete_up_to"] + 1))
    assert st["sinks"][0]["state"] == "connected"
    log = agent.log()
    assert "the-right-token-42" not in log and "a-wrong-token-99" not in log


# ------------------------------------------------------------------------------ outages


def test_gateway_down_then_up_loses_nothing_and_keeps_order(gateway, agent_process, tmp_path):
    gw = gateway()
    total = 1500
    # 15 s of production: the outage starts well before the last event, even on a loaded
    # machine where the first 200 take a while to be seen at the gateway
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"line1": simulator(rate=100, limit=total)})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()
    gw.wait_received(200, stream="line1", timeout=30)
    gw.stop()  # a real outage: the process is gone, the port refuses connections
    st = agent.wait(
        lambda s: (
            s["sinks"][0]["state"] == "disconnected" and stream_of(s, "line1")["backlog_events"] > 0
        ),
        timeout=30,
        what="sink disconnected with a backlog",
    )
    assert "cannot reach" in st["sinks"][0]["last_error"]
    time.sleep(1.0)
    gw.start()  # same port, same database
    gw.wait_received(total, stream="line1", timeout=60)
    st = agent.wait(drained("line1", total), timeout=30, what="drained after outage")
    last = stream_of(st, "line1")["last_sequence"]
    assert last == total
    assert_complete(gw, "line1", last)
    seqs = arrival_sequences(gw, "line1")
    assert seqs == list(range(1, total + 1))
    assert agent.stop() == 0


async def _forward_in_process(
    buf: Buffer,
    gw: Any,
    stream: str,
    n: int,
    timeout: float = 30,  # noqa: ASYNC109
) -> list[tuple[float, str]]:
    """Run one StreamForwarder with the real HTTPS sink until n events are acknowledged;
    return (monotonic time, outcome) of every attempt, from the observe hook."""
    attempts: list[tuple[float, str]] = []

    def observe(_stream: str, _sink: str, seconds: float, _events: int, outcome: str) -> None:
        attempts.append((time.monotonic(), outcome))

    sink = HttpsSink("central", HttpsConfig(url=gw.url, ca_file=gw.ca_file))
    await sink.start()
    fw = StreamForwarder(
        buf, stream, sink,
        ForwarderSettings(backoff_initial=0.05, backoff_max=0.2, linger_ms=0),
        observe=observe,
    )  # fmt: skip
    task = asyncio.create_task(fw.run())
    try:
        await gw.await_received(n, stream=stream, timeout=timeout)
        # The gateway holds them before its answer reaches the forwarder: wait for the ack
        # (the observe hook runs before it), or the last outcome may not be recorded yet.
        async with asyncio.timeout(timeout):
            while buf.stream_state(stream)[1] < n:  # noqa: ASYNC110 - state of another task
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.stop()
    return attempts


def _events(n: int, subject: str = "tag") -> list[NewEvent]:
    return [
        NewEvent(
            type="mfg.machine.state_changed",
            data={"machine": "press-01", "state": "running"},
            time="2026-11-23T10:15:02.123Z",
            subject=f"{subject}-{i}",
        )
        for i in range(n)
    ]


async def test_500_then_recovery_then_429_honours_retry_after(gateway, tmp_path):
    gw = gateway(fail_status=500, fail_count=3)
    buf = await Buffer.open(tmp_path / "buf.db", plant="p", agent_id="a")
    try:
        await buf.append("s1", _events(50))
        attempts = await _forward_in_process(buf, gw, "s1", 50)
        outcomes = [o for _, o in attempts]
        assert outcomes[:3] == ["retry"] * 3, outcomes
        assert outcomes[3] == "accepted", outcomes
        assert gw.report()["requests"]["injected_failures"] == 3

        # 429 with Retry-After: 1 s, twice: each retry waits at least that long, although
        # the configured backoff is at most 0.2 s
        gw.control(fail_status=429, fail_count=2, retry_after=1)
        await buf.append("s1", _events(20, "later"))
        attempts = await _forward_in_process(buf, gw, "s1", 70)
        outcomes = [o for _, o in attempts]
        assert outcomes[:3] == ["retry", "retry", "accepted"], outcomes
        gaps = [attempts[i + 1][0] - attempts[i][0] for i in range(2)]
        assert all(g >= 0.95 for g in gaps), gaps
        assert all(g < 5 for g in gaps), gaps
        assert_complete(gw, "s1", 70)
        seqs = arrival_sequences(gw, "s1")
        assert seqs == list(range(1, 71))
    finally:
        await buf.close()


# ------------------------------------------------------------------------------ poison


def test_poison_event_is_dead_lettered_alone_and_can_be_retried_or_dropped(
    gateway, agent_process, tmp_path
):
    gw = gateway(poison=["POISON-1"])
    port = free_port()
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"mes": mes_source(port)},
                       forwarder={"linger_ms": 300})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_port(agent, port)
    events = [mes_event(i) for i in range(1, 41)]
    events[16]["subject"] = "POISON-1"  # sequence 17
    r = push(port, events)
    assert r.status_code == 202, r.text
    poison_id = r.json()["events"][16]["id"]
    gw.wait_received(39, stream="mes", timeout=30)

    c = str(agent.config_path)
    dl = json.loads(agent.cli("dead-letter", "list", "--json", "-c", c).stdout)
    assert len(dl) == 1, dl
    assert dl[0]["id"] == poison_id and dl[0]["sequence"] == 17 and dl[0]["stream"] == "mes"
    assert dl[0]["status"] == 422 and "poison" in dl[0]["reason"], dl
    got = gw.events("mes")
    assert [int(e["sequence"]) for e in got] == [s for s in range(1, 41) if s != 17]
    assert poison_id not in {e["id"] for e in got}
    rep = gw.stream_report("mes")
    assert rep["out_of_order"] == 0 and rep["id_conflicts"] == 0

    shown = agent.cli("dead-letter", "show", poison_id, "-c", c).stdout
    assert "poison" in shown and poison_id in shown and "POISON-1" in shown

    # retry while still poisoned: stays a dead letter; after the fix: delivered, same id
    gw.control(poison=[])
    out = agent.cli("dead-letter", "retry", poison_id, "-c", c).stdout
    assert "1 dead letter(s)" in out
    gw.wait_received(40, stream="mes", timeout=30)
    ids = [e["id"] for e in gw.events("mes")]
    assert ids.count(poison_id) == 1
    deadline = time.monotonic() + 15
    while json.loads(agent.cli("dead-letter", "list", "--json", "-c", c).stdout):
        assert time.monotonic() < deadline, "delivered dead letter still listed"
        time.sleep(0.5)

    # a second poison: drop it for good
    gw.control(poison=["POISON-2"])
    more = [mes_event(i) for i in range(41, 46)]
    more[2]["subject"] = "POISON-2"
    r = push(port, more)
    assert r.status_code == 202
    drop_id = r.json()["events"][2]["id"]
    gw.wait_received(44, stream="mes", timeout=30)
    deadline = time.monotonic() + 15
    while True:
        dl = json.loads(agent.cli("dead-letter", "list", "--json", "-c", c).stdout)
        if dl:
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert [d["id"] for d in dl] == [drop_id]
    out = agent.cli("dead-letter", "drop", drop_id, "-c", c).stdout
    assert "1 dead letter(s) dropped" in out
    assert json.loads(agent.cli("dead-letter", "list", "--json", "-c", c).stdout) == []
    res = agent.cli("dead-letter", "show", drop_id, "-c", c, check=False)
    assert res.returncode == 1 and "no dead letter" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert agent.stop() == 0


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_lets_the_gateway_say_complete_up_to_its_sequence(
    gateway, agent_process, tmp_path
):
    gw = gateway()
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"line1": simulator(rate=200, limit=100)},
                       buffer={"checkpoint_interval": "1s"})  # fmt: skip
    agent = agent_process(cfg, workdir=tmp_path).start()
    deadline = time.monotonic() + 30
    cp = None
    while time.monotonic() < deadline:
        rep = gw.stream_report("line1")
        cp = rep and rep["last_checkpoint"]
        if cp and cp["last_sequence"] >= 100:
            break
        time.sleep(0.3)
    assert cp and cp["last_sequence"] >= 100, gw.report()
    cp_events = [e for e in gw.events("line1") if e["type"] == "mfg.agent.checkpoint"]
    assert cp_events, "no checkpoint event arrived"
    assert cp["complete"] is True, cp
    rep = gw.stream_report("line1")
    assert rep["complete_up_to"] >= cp["last_sequence"]
    assert rep["missing_count"] == 0
    assert agent.stop() == 0


def test_helpers_are_wired(tmp_path: Path) -> None:
    """The tiny TOML writer handles what these tests give it (a broken writer would make
    every agent test above fail for the wrong reason)."""
    from tests.fixtures.common import to_toml

    text = to_toml({"a": {"x": 1, "y": "s"}, "sinks": {"c": {"type": "https", "url": "u"}}})
    import tomllib

    assert tomllib.loads(text) == {
        "a": {"x": 1, "y": "s"},
        "sinks": {"c": {"type": "https", "url": "u"}},
    }

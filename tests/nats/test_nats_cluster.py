"""The NATS sink against a real 3-node JetStream cluster (replicas = 3) on loopback.

One cluster for the module (elections take seconds); every test uses its own stream and
subject prefix, and the fixture brings every node back and waits for JetStream before
each test, so a test that kills nodes does not leak into the next one. The agent is the
real ``edge-agent run`` process (tests/fixtures/common.py: AgentProcess).

The judge is the stream itself (every message read back directly) and the reference
consumer (gateway/nats_consume.py), whose gateway-file report must say: no missing
sequence, no duplicate, no event out of order.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.nats_consume import consume
from gateway.report import read_report
from tests.fixtures.common import agent_config, run_cli
from tests.fixtures.nats_cluster import (
    ADMIN,
    ADMIN_PASSWORD,
    INSTALL_HINT,
    LIMITED,
    LIMITED_PASSWORD,
    PASSWORD,
    USER,
    NatsCluster,
    find_nats_server,
)

pytestmark = pytest.mark.timeout(240)

MAX_PAYLOAD = 64 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if find_nats_server() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    c = NatsCluster(tmp_path_factory.mktemp("nats-cluster"), max_payload=MAX_PAYLOAD)
    try:
        c.start()
        yield c
    finally:
        c.kill()


@pytest.fixture
def js(cluster: NatsCluster, request: pytest.FixtureRequest):
    """The cluster with every node running and JetStream answering; a fresh stream name."""
    for node in cluster.nodes:
        cluster.start_node(node)
    cluster.wait_ready(60)
    name = "T" + request.node.name.replace("test_", "").replace("_", "")[:20].upper()
    return cluster, name


def nats_sink(cluster: NatsCluster, stream: str, **extra: Any) -> dict[str, Any]:
    sink = {
        "type": "nats",
        "url": cluster.url,
        "stream": stream,
        "subject_prefix": stream.lower(),
        "username": USER,
        "password": PASSWORD,
        "ack_timeout": 2,
        "connect_timeout": 1,
        "reconnect_wait": 0.2,
    }
    sink.update(extra)
    return sink


def sim(limit: int, rate: float = 2000, **extra: Any) -> dict[str, Any]:
    return {"sim": {"type": "simulator", "rate": rate, "limit": limit, "seed": 7, **extra}}


async def read_stream(cluster: NatsCluster, stream: str) -> list[Any]:
    return await cluster.messages(stream)


def check_stream(msgs: list[Any]) -> dict[str, Any]:
    """One copy of each batch, every event once, per stream in order without a gap."""
    batch_ids = [m.headers["Nats-Msg-Id"] for m in msgs]
    dup_batches = [b for b, n in collections.Counter(batch_ids).items() if n > 1]
    assert not dup_batches, f"the stream holds {len(dup_batches)} batches twice: {dup_batches[:3]}"
    ids: list[str] = []
    next_seq: dict[tuple[str, str], int] = {}
    for m in msgs:
        h = m.headers
        events = orjson.loads(m.data)
        first, last = int(h["X-Edge-First-Sequence"]), int(h["X-Edge-Last-Sequence"])
        assert last - first + 1 == len(events)
        key = (h["X-Edge-Stream"], h["X-Edge-Stream-Epoch"])
        assert first == next_seq.get(key, 1), (
            f"stream {key}: batch {first}-{last} after {next_seq.get(key, 1) - 1}"
        )
        next_seq[key] = last + 1
        for i, ev in enumerate(events):
            assert int(ev["sequence"]) == first + i
            ids.append(ev["id"])
    dup_events = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not dup_events, f"{len(dup_events)} events twice in the stream: {dup_events[:3]}"
    return {"batches": len(msgs), "events": len(ids), "streams": next_seq}


def consume_report(cluster: NatsCluster, stream: str, db: Path) -> dict[str, Any]:
    stats = asyncio.run(
        consume(
            cluster.urls,
            stream,
            db,
            until_idle=1.0,
            connect={"user": ADMIN, "password": ADMIN_PASSWORD},
        )
    )
    report = read_report(db)
    assert stats.refused == 0, stats
    assert stats.out_of_order_batches == 0, stats
    assert report["totals"]["ok"], report
    assert report["totals"]["duplicates"] == 0, report["totals"]
    assert report["totals"]["out_of_order"] == 0, report["totals"]
    assert report["totals"]["missing"] == 0, report["totals"]
    return report


def wait_stream_count(cluster: NatsCluster, stream: str, at_least: int, timeout: float) -> int:
    async def count() -> int:
        nc = await cluster.connect()
        try:
            info = await nc.jetstream(timeout=5).stream_info(stream)
            return int(info.state.messages)
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        try:
            n = asyncio.run(count())
        except Exception:  # noqa: BLE001 - an election in progress
            n = -1
        if n >= at_least:
            return n
        time.sleep(0.1)
    raise AssertionError(f"stream {stream}: {n} messages after {timeout}s, wanted {at_least}")


def wait_drained(agent: Any, total: int, timeout: float = 120) -> dict[str, Any]:
    """Until the simulator of the agent's current run has emitted its limit (after a kill
    the new run emits a whole limit again, so ``total`` is reached while it still
    produces: a status taken then is older than the stream read after it) and everything
    committed is forwarded."""
    return agent.wait(
        lambda s: (
            bool(s["streams"])
            and sum(x["last_sequence"] for x in s["streams"]) >= total
            and bool(s.get("sources"))
            and all(src.get("state") == "finished" for src in s["sources"])
            and all(
                x["backlog_events"] == 0 and x["forwarded_sequence"] == x["last_sequence"]
                for x in s["streams"]
            )
        ),
        timeout=timeout,
        what=f"{total} events forwarded",
    )


def sink_status(status: dict[str, Any]) -> dict[str, Any]:
    sinks = status.get("sinks") or [{}]  # empty until the first heartbeat after start
    return sinks[0] if isinstance(sinks, list) else sinks.get("central", {})


# --------------------------------------------------------------------------- tests


def test_sigkill_mid_drain_leaves_exactly_one_copy_of_each_batch(js, agent_process, tmp_path):
    cluster, stream = js
    asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"]))
    cfg = agent_config(
        tmp_path,
        sinks={"central": nats_sink(cluster, stream)},
        sources=sim(limit=1500, rate=1500),
        forwarder={"max_events": 10, "linger_ms": 1},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    counts = []
    agent.start(wait_ready=False)
    for _ in range(4):
        # kill while batches are flowing: the stream grew since the last kill
        counts.append(wait_stream_count(cluster, stream, (counts[-1] if counts else 0) + 5, 60))
        agent.kill()
        agent.start(wait_ready=False)
    status = wait_drained(agent, 1500, timeout=120)
    msgs = asyncio.run(read_stream(cluster, stream))
    summary = check_stream(msgs)
    last = sum(x["last_sequence"] for x in status["streams"])
    assert summary["events"] == last, (summary, last)
    assert counts == sorted(counts) and len(msgs) > counts[-1], (counts, len(msgs))
    consume_report(cluster, stream, tmp_path / "consumer.sqlite3")
    print(f"sigkill: kills at stream sizes {counts}; final {summary['batches']} batches, "
          f"{summary['events']} events, sink {sink_status(status).get('detail')}")  # fmt: skip
    assert agent.stop() == 0


def test_stream_leader_killed_mid_drain_fails_over_and_loses_nothing(js, agent_process, tmp_path):
    cluster, stream = js
    leader = asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"]))
    cfg = agent_config(
        tmp_path,
        sinks={"central": nats_sink(cluster, stream)},
        sources=sim(limit=3000, rate=1000),
        forwarder={"max_events": 20, "linger_ms": 1},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    agent.start(wait_ready=False)
    before = wait_stream_count(cluster, stream, 10, 60)
    cluster.kill_node(cluster.node_by_name(leader))
    new_leader = asyncio.run(cluster.wait_stream_leader_any(stream, exclude=leader))
    assert new_leader != leader
    status = wait_drained(agent, 3000, timeout=120)
    msgs = asyncio.run(read_stream(cluster, stream))
    summary = check_stream(msgs)
    assert summary["events"] == 3000
    assert len(msgs) > before
    consume_report(cluster, stream, tmp_path / "consumer.sqlite3")
    print(f"leader kill: {leader} killed at {before} batches, new leader {new_leader}, "
          f"{summary}, sink {sink_status(status).get('detail')}")  # fmt: skip
    assert agent.stop() == 0


def test_whole_cluster_down_then_up_backlog_drains_in_order(js, agent_process, tmp_path):
    cluster, stream = js
    asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"]))
    cfg = agent_config(
        tmp_path,
        sinks={"central": nats_sink(cluster, stream)},
        sources=sim(limit=2000, rate=400),
        forwarder={"max_events": 50, "linger_ms": 5},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    agent.start(wait_ready=False)
    wait_stream_count(cluster, stream, 3, 60)
    cluster.kill()
    # the agent keeps collecting: a backlog builds while the cluster is down
    st = agent.wait(
        lambda s: bool(s["streams"]) and s["streams"][0]["backlog_events"] >= 500,
        timeout=60,
        what="a backlog while the cluster is down",
    )
    assert sink_status(st).get("state") in ("disconnected", "starting"), sink_status(st)
    cluster.start(60)
    status = wait_drained(agent, 2000, timeout=120)
    msgs = asyncio.run(read_stream(cluster, stream))
    summary = check_stream(msgs)
    assert summary["events"] == 2000
    consume_report(cluster, stream, tmp_path / "consumer.sqlite3")
    print(f"cluster down/up: {summary}, sink {sink_status(status).get('detail')}")
    assert agent.stop() == 0


def test_refused_credentials_mean_auth_state_without_a_retry_storm(js, agent_process, tmp_path):
    cluster, stream = js
    asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"]))
    cfg = agent_config(
        tmp_path,
        sinks={"central": nats_sink(cluster, stream, password="wrong")},
        sources=sim(limit=50, rate=100),
        forwarder={"auth_retry_interval": 3},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    marks = {n.name: _log_size(n.log_file) for n in cluster.nodes}
    agent.start(wait_ready=False)
    st = agent.wait(
        lambda s: (
            sink_status(s).get("state") == "auth_failed"
            and bool(s["streams"])
            and s["streams"][0]["last_sequence"] >= 50
        ),
        timeout=60,
        what="sink auth_failed",
    )
    t0 = time.monotonic()
    time.sleep(7)  # long enough for a storm to show; the agent retries every 3 s
    elapsed = time.monotonic() - t0 + 3
    refusals = sum(_count_auth_errors(n.log_file, marks[n.name]) for n in cluster.nodes)
    assert refusals >= 1, cluster.logs()
    # one attempt per auth_retry_interval (plus the first): nowhere near reconnect_wait's pace
    assert refusals <= elapsed / 3 + 3, f"{refusals} refused connects in {elapsed:.0f}s"
    assert st["streams"][0]["backlog_events"] == 50  # everything kept
    assert "authorization" in (sink_status(st).get("last_error") or "").lower(), sink_status(st)
    assert "REFUSES OUR CREDENTIALS" in agent.log()
    msgs = asyncio.run(read_stream(cluster, stream))
    assert msgs == []
    assert agent.stop() == 0


def test_batch_over_max_payload_is_split(js, agent_process, tmp_path):
    cluster, stream = js
    asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"]))
    # 100 events of ~2 KiB: a 200 KiB batch against a 64 KiB max_payload
    cfg = agent_config(
        tmp_path,
        sinks={"central": nats_sink(cluster, stream)},
        sources=sim(limit=300, rate=5000, payload_bytes=2000),
        forwarder={"max_events": 100, "max_bytes": "1MiB", "linger_ms": 200},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    agent.start(wait_ready=False)
    wait_drained(agent, 300, timeout=90)
    msgs = asyncio.run(read_stream(cluster, stream))
    summary = check_stream(msgs)
    assert summary["events"] == 300
    assert all(len(m.data) <= MAX_PAYLOAD for m in msgs)
    assert max(len(orjson.loads(m.data)) for m in msgs) < 100
    assert "too large" in agent.log()
    assert agent.stop() == 0
    # the reference consumer as an operator runs it
    pw = tmp_path / "admin.password"
    pw.write_text(ADMIN_PASSWORD + "\n")
    db = tmp_path / "consumer.sqlite3"
    res = run_cli(
        "gateway", "consume", cluster.url, "--stream", stream, "--db", str(db),
        "--user", ADMIN, "--password-file", str(pw), "--idle", "1", "--json", "--check",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = orjson.loads(res.stdout)
    assert report["totals"]["received"] == 300, report["totals"]
    assert report["totals"]["missing"] == 0 and report["totals"]["duplicates"] == 0
    assert report["totals"]["batches"] == len(msgs)


def test_start_check_says_loudly_when_the_stream_does_not_fit(js, agent_process, tmp_path):
    cluster, stream = js
    # a duplicate window shorter than the retry horizon (2 s ack + 60 s auth interval)
    asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"], duplicate_window=10))
    cfg = agent_config(
        tmp_path,
        sinks={
            "central": nats_sink(cluster, stream),
            "other": nats_sink(cluster, stream + "X", subject_prefix="elsewhere"),
        },
        sources=sim(limit=20, rate=100),
        forwarder={"auth_retry_interval": 60},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    agent.start(wait_ready=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = agent.log()
        if "duplicate_window" in log and "does not exist" in log:
            break
        time.sleep(0.3)
    lines = [ln for ln in agent.log().splitlines() if "duplicate_window" in ln]
    assert lines, agent.log()[-3000:]
    assert "sinks.central.stream" in lines[0] and "retry horizon" in lines[0], lines[0]
    missing = [ln for ln in agent.log().splitlines() if "does not exist" in ln]
    assert missing and f"sinks.other.stream: JetStream stream '{stream}X'" in missing[0]
    wait_drained(agent, 20, timeout=60)  # a short window is a warning: central still works
    assert agent.stop() == 0


def _log_size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def _count_auth_errors(p: Path, offset: int) -> int:
    with p.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return sum(
        1
        for ln in text.splitlines()
        if "authentication error" in ln or "Authorization Violation" in ln
    )


def test_publish_denied_by_permissions_is_auth_not_a_timeout(js, tmp_path):
    from adapters.sinks.nats import Config, NatsSink
    from agent.interfaces import Batch, Outcome
    from agent.registry import AdapterContext

    cluster, stream = js
    asyncio.run(cluster.add_stream(stream, ["denied.>"]))

    async def main() -> tuple[Any, float, Any]:
        cfg = Config(
            url=cluster.url, stream=stream, subject_prefix="denied", username=LIMITED,
            password=LIMITED_PASSWORD, ack_timeout=20,
        )  # fmt: skip
        ctx = AdapterContext("a", "p1", tmp_path, "0", backoff_max=1, auth_retry_interval=60)
        sink = NatsSink("central", cfg, ctx)
        await sink.start()
        try:
            deadline = time.monotonic() + 20
            while sink.state().state != "connected":
                assert time.monotonic() < deadline, sink.state()
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            batch = Batch("s1", "B1", "E1", 1, 1, ["i1"], [b'{"id":"i1"}'])
            result = await sink.send(batch)
            return result, time.monotonic() - t0, sink.state().state
        finally:
            await sink.stop()

    result, seconds, state = asyncio.run(main())
    assert result.outcome is Outcome.AUTH, result
    assert "permissions violation" in result.reason.lower() and "denied.p1.s1" in result.reason
    assert seconds < 10, f"answered after {seconds:.1f}s: it waited for the ack timeout"
    assert state == "auth_failed", state


def test_consumer_counts_a_batch_stored_twice_and_refuses_a_foreign_message(js, tmp_path):
    """Beyond the duplicate window a resend is stored again (new Nats-Msg-Id here stands in
    for an expired one): the consumer must count it, not store its events twice; and a
    message that is not a contract batch is refused without stopping the consumer."""
    cluster, stream = js
    asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"]))
    events = [
        {"specversion": "1.0", "id": f"ev{i}", "source": "urn:edge:p1:a1:s1", "type": "mfg.test",
         "time": "2026-11-23T10:15:02.123Z", "sequence": f"{i:020d}", "streamepoch": "E1",
         "plant": "p1", "agentid": "a1", "data": {"i": i}}
        for i in (1, 2)
    ]  # fmt: skip
    headers = {
        "Idempotency-Key": "BATCH-1", "X-Edge-Stream": "s1", "X-Edge-Stream-Epoch": "E1",
        "X-Edge-First-Sequence": f"{1:020d}", "X-Edge-Last-Sequence": f"{2:020d}",
        "Content-Type": "application/cloudevents-batch+json",
    }  # fmt: skip
    subject = f"{stream.lower()}.p1.s1"

    async def publish() -> None:
        nc = await cluster.connect()
        try:
            j = nc.jetstream(timeout=10)
            body = orjson.dumps(events)
            await j.publish(subject, body, headers={**headers, "Nats-Msg-Id": "m1"})
            await j.publish(subject, b"not json", headers={"Nats-Msg-Id": "m2"})
            await j.publish(subject, body, headers={**headers, "Nats-Msg-Id": "m3"})
        finally:
            await nc.close()

    asyncio.run(publish())
    db = tmp_path / "consumer.sqlite3"
    stats = asyncio.run(
        consume(cluster.urls, stream, db, until_idle=1.0,
                connect={"user": ADMIN, "password": ADMIN_PASSWORD})
    )  # fmt: skip
    assert (stats.messages, stats.stored_batches, stats.replayed_batches, stats.refused) == (
        3, 1, 1, 1,
    ), stats  # fmt: skip
    assert stats.out_of_order_batches == 0, stats
    report = read_report(db)
    assert report["totals"]["received"] == 2 and report["totals"]["missing"] == 0, report
    assert report["requests"]["replayed_batches"] == 1
    assert report["requests"]["rejected_400"] == 1


def test_consumer_waits_for_a_cluster_that_lost_its_quorum_and_reads_once_it_is_back(
    js, tmp_path, caplog
):
    """`gateway consume` right after a failover: with two of three nodes gone JetStream
    cannot answer its API (no meta leader). The consumer keeps asking, says so once in the
    log, and reads the stream when the nodes are back, instead of failing on the first
    request (as the report after the leader-killed test once did, with nats: timeout)."""
    import logging
    import threading

    cluster, stream = js
    asyncio.run(cluster.add_stream(stream, [f"{stream.lower()}.>"]))
    down = cluster.nodes[1:]
    for node in down:
        cluster.kill_node(node)
    # until JetStream has noticed (no meta leader: its API stops answering), then back
    # after longer than one API request's timeout (10 s), so the first one surely fails
    deadline = time.monotonic() + 60
    while True:
        try:
            asyncio.run(asyncio.wait_for(cluster._account_info(), 3))
        except Exception:  # noqa: BLE001 - the API not answering is what we wait for
            break
        assert time.monotonic() < deadline, "JetStream kept answering with 2 of 3 nodes down"
        time.sleep(0.3)
    back = threading.Timer(12.0, lambda: [cluster.start_node(n) for n in down])
    back.start()
    caplog.set_level(logging.WARNING, logger="edge_agent.gateway.nats")
    try:
        stats = asyncio.run(
            consume([cluster.nodes[0].url], stream, tmp_path / "consumer.sqlite3",
                    until_idle=1.0, connect={"user": ADMIN, "password": ADMIN_PASSWORD},
                    patience=90)
        )  # fmt: skip
    finally:
        back.join()
    assert stats.messages == 0 and stats.refused == 0, stats
    said = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
    assert len(said) == 1 and stream in said[0], said


def test_consumer_fails_at_once_on_a_stream_that_does_not_exist(js, tmp_path):
    import nats.js.errors

    cluster, stream = js
    t0 = time.monotonic()
    with pytest.raises(nats.js.errors.NotFoundError):
        asyncio.run(
            consume(cluster.urls, stream + "NOPE", tmp_path / "c.sqlite3", until_idle=1.0,
                    connect={"user": ADMIN, "password": ADMIN_PASSWORD})
        )  # fmt: skip
    assert time.monotonic() - t0 < 15

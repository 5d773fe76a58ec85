"""The real agent (``python -m agent run``) with a simulator source and the MQTT sink,
against a real mosquitto, watched by a real subscriber.

* end to end: every event arrives, in order, across a broker SIGKILL and restart, and a
  duplicate is always the same event id with the same bytes;
* presence: "online" retained while it runs, the Last Will "offline" once it is SIGKILLed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fixtures.common import AgentProcess, agent_config
from tests.fixtures.mosquitto import Mosquitto, MosquittoFactory, Subscriber

PLANT = "test-plant"  # agent_config's defaults
AGENT = "test-agent"
TOPIC = f"edge/{PLANT}/sim"
STATUS = f"edge/{PLANT}/agents/{AGENT}/status"
READER = {"reader": "reader-pass"}
WRITER = {"agent": "agent-pass"}

pytestmark = pytest.mark.timeout(120)


def mqtt_sink(broker: Mosquitto, **extra: Any) -> dict[str, Any]:
    sink: dict[str, Any] = {
        "type": "mqtt",
        "url": broker.url,
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        "connect_timeout": 2,
    }
    sink.update(extra)
    return sink


def events_of(sub: Subscriber) -> list[dict[str, Any]]:
    return [e for m in sub.snapshot() if m.topic == TOPIC for e in orjson.loads(m.payload)]


def wait_until(pred: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_agent_to_broker_survives_broker_kill(
    mosquitto_factory: MosquittoFactory, mqtt_subscriber: Any, agent_process: Any, tmp_path: Path
) -> None:
    broker = mosquitto_factory(passwords=READER | WRITER, allow_anonymous=False)
    sub = mqtt_subscriber(broker, f"edge/{PLANT}/#", username="reader", password="reader-pass")
    total = 1500
    workdir = tmp_path / "agent"
    agent: AgentProcess = agent_process(
        agent_config(
            workdir,
            sinks={"central": mqtt_sink(broker, username="agent", password="agent-pass")},
            sources={"sim": {"type": "simulator", "rate": 500, "limit": total, "seed": 7}},
            forwarder={"max_events": 25, "linger_ms": 5},
        ),
        workdir,
    )
    agent.start()

    wait_until(lambda: len(events_of(sub)) >= 300, 30, "300 events before the outage")
    broker.kill()  # mid-stream: batches are on the wire
    time.sleep(1.0)  # the simulator keeps producing into the buffer meanwhile
    # the broker comes back first without the agent's account, so the subscriber is
    # subscribed again before the agent can publish (a restarted broker without
    # persistence forgets subscriptions: what it got before would not reach anyone)
    broker.passwords = READER
    broker.start()
    sub.wait_subscriptions(2)
    status = agent.wait(
        lambda s: any(k["state"] == "auth_failed" for k in s["sinks"]), 20, "sink auth_failed"
    )
    (sink,) = status["sinks"]
    assert sink["name"] == "central" and sink["type"] == "mqtt"
    broker.write_passwords(READER | WRITER)  # SIGHUP: the agent gets in now

    agent.wait(
        lambda s: (
            all(st["backlog_events"] == 0 for st in s["streams"])
            and sum(st["last_sequence"] for st in s["streams"]) >= total
        ),
        60,
        "backlog drained",
    )
    wait_until(
        lambda: (
            {e["sequence"] for e in events_of(sub)} >= {f"{i:020d}" for i in range(1, total + 1)}
        ),
        20,
        "every sequence at the subscriber",
    )
    events = events_of(sub)
    seqs = [int(e["sequence"]) for e in events]
    last = max(seqs)
    assert set(seqs) == set(range(1, last + 1)), "a gap: events were lost"
    first_seen: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    for e in events:
        n = int(e["sequence"])
        if n in first_seen:
            assert e == first_seen[n], f"sequence {n} came twice with different content"
        else:
            first_seen[n] = e
            order.append(n)
    assert order == sorted(order), "first arrivals out of order"
    assert len({e["id"] for e in first_seen.values()}) == len(first_seen)
    assert len({e["streamepoch"] for e in events}) == 1
    assert agent.stop() == 0


def test_denied_topic_keeps_the_backlog_until_the_acl_is_fixed(
    mosquitto_factory: MosquittoFactory, mqtt_subscriber: Any, agent_process: Any, tmp_path: Path
) -> None:
    deny = f"topic read #\ntopic write edge/{PLANT}/agents/#\n"
    broker = mosquitto_factory(acl=deny)
    sub = mqtt_subscriber(broker, TOPIC)
    total = 200
    workdir = tmp_path / "agent"
    agent: AgentProcess = agent_process(
        agent_config(
            workdir,
            sinks={"central": mqtt_sink(broker)},
            sources={"sim": {"type": "simulator", "rate": 400, "limit": total, "seed": 3}},
        ),
        workdir,
    )
    agent.start()
    status = agent.wait(
        lambda s: (
            any("Not authorized" in (st.get("last_error") or "") for st in s["streams"])
            and sum(st["last_sequence"] for st in s["streams"]) >= total
            # sink states reach status with the heartbeat (every 2 s), stream errors at once
            and any("Not authorized" in (sk.get("last_error") or "") for sk in s["sinks"])
        ),
        30,
        "the denied topic in the stream's status",
    )
    (stream,) = status["streams"]
    assert stream["backlog_events"] >= total and stream["forwarded_sequence"] == 0
    assert "ACL" in stream["last_error"]
    (sink,) = status["sinks"]
    assert sink["state"] == "connected" and "Not authorized" in (sink["last_error"] or "")
    assert not sub.snapshot()  # nothing got through, nothing was dropped

    broker.write_acl(deny + f"topic write edge/{PLANT}/sim\n")
    agent.wait(
        lambda s: all(st["backlog_events"] == 0 for st in s["streams"]), 30, "backlog drained"
    )
    wait_until(lambda: len(events_of(sub)) >= total, 10, "all events at the subscriber")
    seqs = [int(e["sequence"]) for e in events_of(sub)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert agent.stop() == 0


def test_presence_online_then_last_will_after_sigkill(
    mosquitto: Mosquitto, mqtt_subscriber: Any, agent_process: Any, tmp_path: Path
) -> None:
    workdir = tmp_path / "agent"
    agent: AgentProcess = agent_process(
        agent_config(
            workdir,
            sinks={"central": mqtt_sink(mosquitto)},
            sources={"sim": {"type": "simulator", "rate": 50}},
        ),
        workdir,
    )
    agent.start()
    sub = mqtt_subscriber(mosquitto, STATUS)
    (online,) = sub.wait_for(lambda m: len(m) >= 1)
    body = orjson.loads(online.payload)
    assert online.retain and body["status"] == "online" and body["agentid"] == AGENT
    assert body["version"] and body["started_at"].endswith("Z")

    agent.kill()  # SIGKILL: no clean disconnect, the broker publishes the will
    msgs = sub.wait_for(lambda m: len(m) >= 2, 10)
    will = orjson.loads(msgs[1].payload)
    assert will["status"] == "offline" and "Last Will" in will["reason"]
    assert will["started_at"] == body["started_at"]
    late = mqtt_subscriber(mosquitto, STATUS)
    (kept,) = late.wait_for(lambda m: len(m) >= 1)
    assert kept.retain and orjson.loads(kept.payload)["status"] == "offline"

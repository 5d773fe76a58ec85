"""mes_http inside the real agent process, forwarding to the reference gateway over HTTPS.

What only the whole agent shows: events an MES pushed reach the gateway exactly once,
even when the MES retries after the agent was SIGKILLed between commit and answer, and
status shows the channel's counters.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema

from agent.vocabulary import envelope_schema
from tests.fixtures.campaign import wait_listening
from tests.fixtures.common import agent_config, free_port, https_sink
from tests.fixtures.mes_http import event

TOKEN = "agent-test-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def mes_source(port: int) -> dict[str, Any]:
    return {
        "type": "mes_http",
        "stream": "mes",
        "listen": f"127.0.0.1:{port}",
        "token": TOKEN,
    }


def test_pushed_events_reach_the_gateway_once_across_retries_and_sigkill(
    gateway, agent_process, tmp_path
):
    gw = gateway()
    port = free_port()
    cfg = agent_config(
        tmp_path, sinks={"central": https_sink(gw)}, sources={"mes": mes_source(port)}
    )
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_listening(agent, port)
    url = f"http://127.0.0.1:{port}/v1/events"
    batch = [event(i) for i in range(1, 21)]
    with httpx.Client(timeout=10) as client:
        r = client.post(url, json=batch, headers=AUTH)
        assert r.status_code == 202, r.text
        first_ids = [e["id"] for e in r.json()["events"]]
        bad = client.post(url, json=[event(99), {"type": "mfg.production.completed"}], headers=AUTH)
        assert bad.status_code == 422
        assert client.post(url, json=batch).status_code == 401
    gw.wait_received(20, stream="mes", timeout=30)

    # the answer was lost: the agent dies, the MES retries the same events after restart
    agent.kill()
    agent.start(wait_ready=False)
    wait_listening(agent, port)
    with httpx.Client(timeout=10) as client:
        r = client.post(url, json=batch + [event(21)], headers=AUTH)
    assert r.status_code == 202, r.text
    acks = r.json()["events"]
    assert [a["duplicate"] for a in acks] == [True] * 20 + [False]
    assert [a["id"] for a in acks[:20]] == first_ids
    gw.wait_received(21, stream="mes", timeout=30)

    events = gw.events("mes")
    events = [e if isinstance(e, dict) else json.loads(e) for e in events]
    business = [e for e in events if e["type"] == "mfg.production.completed"]
    assert sorted(e["data"]["work_order"] for e in business) == sorted(
        f"WO-{4700 + i}" for i in range(1, 22)
    )
    assert len({e["id"] for e in business}) == 21
    validator = jsonschema.Draft202012Validator(envelope_schema())
    for e in events:
        assert list(validator.iter_errors(e)) == [], e

    # status is the agent's periodic heartbeat: wait for it to catch up
    status = agent.wait(
        lambda s: any(
            x["name"] == "mes" and x["state"] == "connected" and x["detail"].get("duplicates")
            for x in s["sources"]
        ),
        timeout=30,
        what="mes_http status with counters",
    )
    [src] = [x for x in status["sources"] if x["name"] == "mes"]
    assert src["detail"]["duplicates"] == 20 and src["detail"]["accepted"] == 1
    assert src["detail"]["listening"] is True
    assert agent.stop() == 0
    with httpx.Client(timeout=2) as client:
        try:
            client.post(url, json=event(30), headers=AUTH)
            raise AssertionError("still listening after the agent stopped")
        except httpx.ConnectError:
            pass
    assert TOKEN not in agent.log()

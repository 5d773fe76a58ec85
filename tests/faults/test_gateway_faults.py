"""The gateway flapping (really stopped and started), slow (answers after the sink's
timeout) and losing answers (stored, connection cut before the 200), while an MES keeps pushing: nothing acknowledged is lost, order holds,
duplicates are the same events under the same ids."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.campaign import (
    LONG,
    MesClient,
    check_delivery,
    mes_source,
    seeded,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import agent_config, free_port, https_sink

# the long run (EDGE_AGENT_FAULTS_LONG=1) outlasts the suite's default per-test timeout
pytestmark = pytest.mark.timeout(3600 if LONG else 600)

FLAP_SECONDS = 60 if LONG else 15
SLOW_SECONDS = 60 if LONG else 10
SINK_TIMEOUT = 0.5


def start_agent(gateway, agent_process, tmp_path):
    gw = gateway()
    port = free_port()
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw, timeout=f"{SINK_TIMEOUT}s", connect_timeout="0.5s")},
        sources={"mes": mes_source(port)},
        forwarder={"max_events": 100, "linger_ms": 5, "backoff_max": 0.5},
    )
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_listening(agent, port)
    return gw, agent, MesClient(port, batch=5, pause=0.005).start()


def test_gateway_flapping_loses_nothing(gateway, agent_process, tmp_path):
    rng = seeded("flapping")
    gw, agent, mes = start_agent(gateway, agent_process, tmp_path)
    started = time.monotonic()
    flaps = 0
    try:
        while time.monotonic() - started < FLAP_SECONDS:
            time.sleep(rng.uniform(0.5, 2.5))
            gw.stop(kill=rng.random() < 0.5)  # SIGKILL half the time: no goodbye at all
            flaps += 1
            time.sleep(rng.uniform(0.5, 2.5))
            gw.start()
    finally:
        mes.stop()
    wait_drained(agent)
    summary = check_delivery(gw, mes.acked)
    assert not mes.problems, mes.problems[:5]
    assert gw.report()["requests"], "the gateway saw no requests"
    print(f"flapping: {flaps} outages in {time.monotonic() - started:.1f}s, gateway {summary}")
    assert agent.stop() == 0


def test_slow_gateway_timeouts_lose_nothing(gateway, agent_process, tmp_path):
    rng = seeded("slow")
    gw, agent, mes = start_agent(gateway, agent_process, tmp_path)
    started = time.monotonic()
    phases = 0
    try:
        while time.monotonic() - started < SLOW_SECONDS:
            # slower than the sink's timeout: the agent gives up waiting, the gateway may
            # still store the batch: the resend must be the same events under the same ids
            gw.control(latency_ms=int(SINK_TIMEOUT * 1000 * rng.uniform(1.2, 3)))
            time.sleep(rng.uniform(1, 3))
            # stored, but the answer is cut: the agent must resend the same batch
            gw.control(latency_ms=0, drop_acks=rng.randint(1, 3))
            time.sleep(rng.uniform(0.3, 1))
            phases += 1
    finally:
        gw.control(latency_ms=0, drop_acks=0)
        mes.stop()
    wait_drained(agent)
    summary = check_delivery(gw, mes.acked)
    assert not mes.problems, mes.problems[:5]
    timeouts = agent.log().count("ReadTimeout")
    assert timeouts > 0, "the agent never timed out: the test did not test"
    # the gateway answers a resent batch from its Idempotency-Key store (replayed_batches)
    requests = gw.report()["requests"]
    assert requests["dropped_acks"] > 0, requests
    assert requests["replayed_batches"] >= requests["dropped_acks"], requests
    print(
        f"slow: {timeouts} timeouts, {requests['dropped_acks']} answers cut, {phases} phases in {time.monotonic() - started:.1f}s, gateway {summary}"
    )
    assert agent.stop() == 0

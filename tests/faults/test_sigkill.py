"""SIGKILL of the agent at random moments while an MES pushes and the forwarder sends.

A SIGKILL gives the agent no chance to clean up: whatever it acknowledged (202) must be
in the buffer file already, and whatever it was sending must be sent again under the same
ids. The gateway's report is the judge (tests/fixtures/campaign.py: check_delivery).
"""

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

KILLS = 300 if LONG else 30


def test_sigkill_during_ingest_and_forwarding_loses_nothing_acknowledged(
    gateway, agent_process, tmp_path
):
    rng = seeded("sigkill")
    # a little gateway latency keeps batches in flight when the kill lands
    gw = gateway(latency_ms=40)
    port = free_port()
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw)},
        sources={"mes": mes_source(port)},
        forwarder={"max_events": 50, "linger_ms": 5},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    mes = MesClient(port, batch=5, pause=0.002)
    started = time.monotonic()
    agent.start(wait_ready=False)
    wait_listening(agent, port)
    mes.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 0.7))
            agent.kill()
            agent.start(wait_ready=False)
            wait_listening(agent, port)
        time.sleep(0.5)
    finally:
        mes.stop()
    status = wait_drained(agent, timeout=120)
    summary = check_delivery(gw, mes.acked)
    assert not mes.problems, mes.problems[:5]
    assert summary["acked"] >= KILLS, f"too few events pushed to mean anything: {summary}"
    assert status["streams"][0]["dropped_total"] == 0
    print(
        f"sigkill: {KILLS} kills in {time.monotonic() - started:.1f}s, client answers "
        f"{mes.statuses}, gateway {summary}, requests {gw.report()['requests']}"
    )
    assert agent.stop() == 0

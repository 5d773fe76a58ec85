"""SIGTERM while an MES pushes and the forwarder sends: a clean stop, in budget, losing nothing.

The stop budget (agent/lifecycle.py, docs/ARCHITECTURE.md "Lifecycle") promises that the
agent exits 0 within STOP_BUDGET seconds of SIGTERM, inside the unit's TimeoutStopSec.
Under load means: requests in flight at the MES HTTP source, a batch on the wire to a slow
gateway, and a backlog in the buffer. After a restart drains the rest, the gateway must
hold every event the MES got a 202 for, in order, duplicates only under the same id
(tests/faults/campaign.py: check_delivery).
"""

from __future__ import annotations

import signal
import time

import pytest

from agent.lifecycle import STOP_BUDGET
from tests.fixtures.campaign import (
    MesClient,
    check_delivery,
    mes_source,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import agent_config, free_port, https_sink

pytestmark = pytest.mark.timeout(600)

STOPS = 3


def _wait_acked(mes: MesClient, more_than: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(mes.acked) > more_than:
            return len(mes.acked)
        time.sleep(0.05)
    raise AssertionError(f"MES got no new 202 within {timeout}s: {mes.statuses}")


def test_sigterm_under_load_stops_in_budget_and_loses_nothing_acknowledged(
    gateway, agent_process, tmp_path
):
    # a slow gateway and small batches: a backlog builds and a batch is on the wire at stop
    gw = gateway(latency_ms=150)
    port = free_port()
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw)},
        sources={"mes": mes_source(port)},
        forwarder={"max_events": 20, "linger_ms": 5},
    )
    agent = agent_process(cfg, workdir=tmp_path)
    mes = MesClient(port, batch=5, pause=0.002)
    agent.start(wait_ready=False)
    wait_listening(agent, port)
    mes.start()
    stop_times: list[float] = []
    backlogs: list[int] = []
    try:
        for _ in range(STOPS):
            acked = _wait_acked(mes, len(mes.acked) + 200)
            # the load is on: the MES still gets answers and the gateway still receives
            _wait_acked(mes, acked)
            assert agent.proc is not None
            sent = time.monotonic()
            agent.signal(signal.SIGTERM)
            try:
                code = agent.proc.wait(STOP_BUDGET + 5)
            except Exception:
                raise AssertionError(
                    f"agent still running {STOP_BUDGET + 5:.0f}s after SIGTERM:\n"
                    f"{agent.log()[-4000:]}"
                ) from None
            took = time.monotonic() - sent
            stop_times.append(took)
            assert code == 0, f"exit {code} after SIGTERM:\n{agent.log()[-4000:]}"
            assert took < STOP_BUDGET, f"stopped in {took:.1f}s, budget {STOP_BUDGET:.0f}s"
            # stopped: what is left is in the buffer, for the next start to send
            backlogs.append(sum(s["backlog_events"] for s in agent.status()["streams"]))
            agent.start(wait_ready=False)
            wait_listening(agent, port)
        _wait_acked(mes, len(mes.acked) + 50)
    finally:
        mes.stop()
    status = wait_drained(agent, timeout=180)
    summary = check_delivery(gw, mes.acked)
    assert not mes.problems, mes.problems[:5]
    assert any(b > 0 for b in backlogs), f"no backlog at any stop: not under load ({backlogs})"
    assert status["streams"][0]["dropped_total"] == 0
    assert agent.log().count("edge-agent stopped cleanly") == STOPS, agent.log()[-4000:]
    print(
        f"sigterm: {STOPS} stops in {', '.join(f'{t:.2f}s' for t in stop_times)} "
        f"(budget {STOP_BUDGET:.0f}s), backlog at stop {backlogs}, client answers "
        f"{mes.statuses}, gateway {summary}"
    )
    assert agent.stop() == 0

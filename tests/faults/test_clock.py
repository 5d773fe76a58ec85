"""The wall clock jumping backwards (an NTP correction, a bad RTC after a power cut), under
the agent while it runs and across a restart: nothing is lost, sequences continue.

The real clock cannot be changed in a test: the agent runs under libfaketime (Debian
package ``faketime``), whose offset is read from a file the test rewrites; only the wall
clock moves (FAKETIME_DONT_FAKE_MONOTONIC), as in a real clock step."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.fixtures.campaign import (
    MesClient,
    check_delivery,
    mes_source,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import agent_config, free_port, https_sink

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def faketime_env(offset_file: Path) -> dict[str, str]:
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} missing: install it with `apt-get install faketime`")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


def push(mes: MesClient, numbers: list[int]) -> None:
    with httpx.Client(timeout=10) as client:
        for i in range(0, len(numbers), 10):
            assert mes.push_once(client, numbers[i : i + 10]) == 202, mes.problems


def test_clock_jumping_back_loses_nothing_and_sequences_continue(gateway, agent_process, tmp_path):
    real_start = time.time()
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    gw = gateway()
    port = free_port()
    cfg = agent_config(
        tmp_path / "agent",
        sinks={"central": https_sink(gw)},
        sources={"mes": mes_source(port)},
        buffer={"checkpoint_interval": "1s", "dedupe_window": "1h"},
    )
    agent = agent_process(cfg, workdir=tmp_path / "agent", env=faketime_env(offset))
    agent.start(wait_ready=False)
    wait_listening(agent, port)
    mes = MesClient(port)
    push(mes, list(range(1, 101)))
    wait_drained(agent)
    gw.stop()  # a backlog across the jump too
    push(mes, list(range(101, 201)))

    offset.write_text("-3h\n")  # while running: the wall clock steps back three hours
    time.sleep(1.5)
    push(mes, list(range(201, 301)))
    # an MES retrying across the jump still finds its events (dedupe by id, not by time)
    with httpx.Client(timeout=10) as client:
        assert mes.push_once(client, list(range(191, 201))) == 202
    assert mes.problems == []

    agent.stop()
    offset.write_text("-1d\n")  # restarted in the past: a day before it last ran
    agent.start(wait_ready=False)
    wait_listening(agent, port)
    push(mes, list(range(301, 401)))
    gw.start()
    wait_drained(agent)
    summary = check_delivery(gw, mes.acked, contiguous=True)
    business = [a.sequence for n, a in sorted(mes.acked.items())]
    assert business == sorted(business), "sequences did not keep increasing across the jumps"
    assert len(mes.acked) == 400
    # the agent really lived through both steps (its own log timestamps say so)
    stamps = [
        datetime.fromisoformat(json.loads(line)["ts"]).timestamp()
        for line in agent.log().splitlines()
        if line.startswith("{")
    ]
    assert any(real_start - 4 * 3600 < t < real_start - 2.9 * 3600 for t in stamps)
    assert any(t < real_start - 23 * 3600 for t in stamps)
    print(f"clock: gateway {summary}")
    assert agent.stop() == 0

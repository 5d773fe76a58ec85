"""The buffer at max_bytes while the gateway is down: "block" refuses (503 + Retry-After to
the MES, nothing acknowledged lost), "drop_oldest" drops exactly the oldest unsent events and
says so (dropped_total in status == the counts of the gap events == the report's explained)."""

from __future__ import annotations

import time

import httpx

from tests.fixtures.campaign import (
    BUSINESS,
    MesClient,
    check_delivery,
    mes_source,
    number_of,
    wait_drained,
    wait_listening,
)
from tests.fixtures.common import agent_config, free_port, https_sink

MAX_BYTES = 256 * 1024
ACCEPT = 8000  # about 16 times what fits


def setup(gateway, agent_process, tmp_path, on_full: str):
    gw = gateway()
    gw.stop()  # the central side is down: the backlog can only grow
    port = free_port()
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw)},
        sources={"mes": mes_source(port)},
        buffer={"max_bytes": MAX_BYTES, "on_full": on_full},
    )
    agent = agent_process(cfg, workdir=tmp_path).start(wait_ready=False)
    wait_listening(agent, port)
    return gw, agent, port


def until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_block_refuses_with_503_and_loses_nothing_acknowledged(gateway, agent_process, tmp_path):
    gw, agent, port = setup(gateway, agent_process, tmp_path, "block")
    mes = MesClient(port, batch=10, give_up_on_503=True).start()
    try:
        until(lambda: len(mes.refused) >= 100, 60, "100 events refused")
    finally:
        mes.stop()
    assert not mes.problems, mes.problems[:5]
    assert set(mes.retry_after) == {"1"}, mes.retry_after[:5]
    refused_requests = len(mes.refused) // 10
    status = agent.wait(
        lambda s: (
            s["sources"]
            and s["sources"][0]["detail"]["rejected"].get("buffer_full") == refused_requests
        ),
        20,
        "the source's 503 count in status",
    )
    assert status["buffer"]["used_bytes"] <= MAX_BYTES
    assert status["streams"][0]["dropped_total"] == 0
    assert status["sources"][0]["last_error"].startswith("503 buffer_full"), status["sources"]

    gw.start()
    wait_drained(agent)
    summary = check_delivery(gw, mes.acked)
    at_gateway = {number_of(e) for e in gw.events("mes") if e["type"] == BUSINESS}
    assert not at_gateway & set(mes.refused), "a refused (503) event was stored after all"
    # room again: the same client is accepted
    with httpx.Client(timeout=10) as client:
        assert mes.push_once(client, mes.refused[:10]) == 202
    print(f"block: {len(mes.refused)} events refused with 503, gateway {summary}")
    # status counts every event refused: buffer.refused_total and the stream's refused_total
    assert status["buffer"]["refused_total"] == len(mes.refused), status["buffer"]
    assert status["streams"][0]["refused_total"] == len(mes.refused), status["streams"]
    assert agent.stop() == 0


def test_drop_oldest_drops_exactly_the_oldest_and_explains_it(gateway, agent_process, tmp_path):
    gw, agent, port = setup(gateway, agent_process, tmp_path, "drop_oldest")
    # gives up on a 503 (which drop_oldest must never answer) so the test ends either way
    mes = MesClient(port, batch=10, give_up_on_503=True).start()
    try:
        until(lambda: len(mes.acked) >= ACCEPT or mes.refused, 120, f"{ACCEPT} events acknowledged")
    finally:
        mes.stop()
    assert not mes.problems, mes.problems[:5]
    status = agent.status()
    assert set(mes.statuses) == {202}, (
        f"drop_oldest must never refuse: {mes.statuses} after {len(mes.acked)} accepted; "
        f"buffer {status['buffer']}; stream {status['streams']}"
    )
    status = agent.status()
    dropped = status["streams"][0]["dropped_total"]
    assert dropped > 0 and status["buffer"]["used_bytes"] <= MAX_BYTES, status

    gw.start()
    wait_drained(agent)
    events = gw.events("mes")
    gaps = {e["sequence"]: e["data"] for e in events if e["type"] == "mfg.agent.gap"}
    assert sum(g["count"] for g in gaps.values()) == dropped
    assert all(g["reason"] == "buffer_full_drop_oldest" for g in gaps.values())
    ranges = [(g["first_sequence"], g["last_sequence"]) for g in gaps.values()]
    at_gateway = {number_of(e) for e in events if e["type"] == BUSINESS}
    gone = sorted(n for n in mes.acked if n not in at_gateway)
    assert len(gone) == dropped, f"{len(gone)} acknowledged events missing, {dropped} dropped"
    for n in gone:
        seq = mes.acked[n].sequence
        assert any(a <= seq <= b for a, b in ranges), f"MES-{n} (seq {seq}) gone, no gap says so"
    # the oldest unsent events go, except those of the batch already in flight (at most
    # forwarder.max_events = 1000 at the head of the stream), which is never dropped
    assert gone == list(range(gone[0], gone[-1] + 1)), "dropped events are not one run"
    assert len([n for n in at_gateway if n < gone[0]]) <= 1000, "dropped events not the oldest"
    kept = {n: a for n, a in mes.acked.items() if n in at_gateway}
    summary = check_delivery(gw, kept, contiguous=False)
    report = gw.stream_report("mes")
    assert report["explained_count"] == dropped, report
    assert sum(e["count"] for e in report["explained"] if e["kind"] == "gap") == dropped, report
    print(f"drop_oldest: {dropped} dropped in {len(gaps)} gaps, gateway {summary}")
    assert agent.stop() == 0

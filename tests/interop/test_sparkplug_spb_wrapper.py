"""The Sparkplug host against a second implementation we did not write: an edge node on
mqtt-spb-wrapper (PyPI, in its own venv), over mosquitto.

The peer's messages are read off the wire with our decoder, and what the host must do with
each is derived from the specification, not from what this peer happens to send: a metric
its NBIRTH declared is committed with its value, in order; a metric its NBIRTH did not
declare is refused, counted and answered by a rebirth request; its NDEATH marks it offline
when the bdSeq matches the birth's, and is counted as stale otherwise.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from adapters.sources.sparkplug import build
from adapters.sources.sparkplug import payload as sp
from agent.buffer import Buffer
from tests.fixtures.mosquitto import Mosquitto, Subscriber
from tests.fixtures.sparkplug import (
    CTX,
    STREAM,
    make_config,
    rebirth_requests,
    running,
    stored,
    transitions,
    wait_until,
)

HERE = Path(__file__).resolve().parent / "sparkplug"


@pytest.fixture
async def buf(tmp_path: Path) -> AsyncIterator[Buffer]:
    b = await Buffer.open(tmp_path / "buffer.db", plant="plant-test", agent_id="test-agent")
    try:
        yield b
    finally:
        await b.close()


PY = HERE / ".venv" / "bin" / "python"


def _bd(msg: object) -> int | None:
    for m in msg.metrics:  # type: ignore[attr-defined]
        if m.name == "bdSeq":
            return int(m.long_value) if m.WhichOneof("value") == "long_value" else int(m.int_value)
    return None


async def test_spb_wrapper_edge_node_birth_data_death(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], buf: Buffer
) -> None:
    if not PY.exists():
        pytest.fail(
            "mqtt-spb-wrapper is not installed: run `python tests/interop/ensure_sparkplug_client.py`",
            pytrace=False,
        )
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    source = build(STREAM, make_config(mosquitto, groups=["Wrap"]), CTX)
    async with running(source, buf, wire) as task:
        res = await asyncio.to_thread(
            subprocess.run,
            [
                str(PY),
                str(HERE / "spb_wrapper_node.py"),
                "127.0.0.1",
                str(mosquitto.port),
                "Wrap",
                "N1",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        await asyncio.to_thread(wire.wait_for, lambda ms: any("/NDEATH/" in m.topic for m in ms))
        await wait_until(lambda: source.state().detail["messages"] >= 7, task=task)
        await asyncio.sleep(0.2)  # the NDEATH's commit
        events = await stored(buf)
        detail = source.state().detail

    peer = [
        (m.topic.split("/")[2], sp.decode(m.payload))
        for m in wire.snapshot()
        if "/N" in m.topic and "/NCMD/" not in m.topic
    ]
    (birth,) = [msg for kind, msg in peer if kind == "NBIRTH"]
    declared = {m.name for m in birth.metrics}
    signals = [
        (e["data"]["sparkplug"]["metric"], e["data"]["value"], e["data"]["sparkplug"]["message"])
        for e in events
        if e["type"] == "mfg.signal.sampled"
    ]

    expected = [
        (m.name, sp.metric_value(m, m.datatype), "NBIRTH")
        for m in birth.metrics
        if m.name != "bdSeq" and not m.name.startswith("Node Control/")
    ]
    undeclared = 0
    for kind, msg in peer:
        if kind != "NDATA":
            continue
        for m in msg.metrics:
            if m.name in declared:
                dt = next(b.datatype for b in birth.metrics if b.name == m.name)
                expected.append((m.name, sp.metric_value(m, m.datatype or dt), "NDATA"))
            else:
                undeclared += 1
    assert signals == expected
    assert detail["refused"].get("unknown_metric", 0) == undeclared
    assert (len(rebirth_requests(wire, "Wrap", "N1")) >= 1) == (undeclared > 0)

    (death,) = [msg for kind, msg in peer if kind == "NDEATH"]
    if _bd(death) == _bd(birth):
        assert transitions(events) == [
            ("Wrap/N1", "online", "birth"),
            ("Wrap/N1", "offline", "death"),
        ]
    else:
        assert transitions(events) == [("Wrap/N1", "online", "birth")]
        assert detail["stale_deaths"] == 1

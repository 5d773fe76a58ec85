"""Sparkplug host under faults, with Eclipse Tahu's JS edge node and a real mosquitto:
the real agent SIGKILLed mid-stream and restarted, and the broker killed and started.

What we assert is ours: every event the agent committed reaches the gateway once, in
order, without holes in the stream's sequence; our STATE Will fires when we die; STATE is
online again (a newer timestamp) when we are back; data without a birth is answered by a
rebirth request, never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from adapters.sources.sparkplug import build
from agent.buffer import Buffer
from tests.fixtures.common import AgentProcess, agent_config, https_sink
from tests.fixtures.mosquitto import Mosquitto, Subscriber
from tests.fixtures.sparkplug import (
    CTX,
    HOST,
    STATE_TOPIC,
    STREAM,
    make_config,
    rebirth_requests,
    running,
    signals,
    states,
    transitions,
    wait_stored,
    wait_until,
)


def wait(pred: Callable[[], bool], what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Feeder:
    """Sends DDATA Count = 1, 2, 3 ... every ``period`` s from a thread until stopped."""

    def __init__(self, node: Any, period: float = 0.02) -> None:
        self.node, self.period = node, period
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            self.node.send(cmd="ddata", count=self.sent)
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.sent


def test_agent_sigkilled_mid_stream_then_restarted(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_subscriber: Callable[..., Subscriber],
    gateway: Callable[..., Any],
    agent_process: Callable[..., AgentProcess],
    tahu: Any,
) -> None:
    gw = gateway()
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    source = {
        "type": "sparkplug",
        "url": mosquitto.url,
        "client_id": "edge-agent-spb-crash",
        "groups": ["Plant1"],
        "host_id": HOST,
        "stream": STREAM,
        "reconnect_min": "1s",
        "reconnect_max": "1s",
        "rebirth_interval": "1s",
    }
    config = agent_config(
        tmp_path,
        sinks={"https": https_sink(gw)},
        sources={"spb": source},
        forwarder={"linger_ms": 5},
    )
    agent = agent_process(config)
    agent.start(wait_ready=False)
    wait(lambda: any(s["online"] for s in states(wire)), "STATE online")
    first_online = [s for s in states(wire) if s["online"]][-1]

    node = tahu(mosquitto)
    node.send(cmd="birth")
    feeder = Feeder(node)
    wait(lambda: feeder.sent >= 40, "40 values sent")
    agent.kill()  # SIGKILL mid-stream
    # our Will: STATE offline, with the timestamp of the CONNECT it came with
    wait(lambda: any(not s["online"] for s in states(wire)), "the STATE Will")
    will = [s for s in states(wire) if not s["online"]][-1]
    assert will["timestamp"] == first_online["timestamp"]

    time.sleep(0.3)  # values sent while we are away are lost (QoS 0: docs/sparkplug.md)
    agent.start(wait_ready=False)
    wait(
        lambda: any(s["online"] and s["timestamp"] > will["timestamp"] for s in states(wire)),
        "STATE online again with a newer timestamp",
    )
    # the restarted host knows no birth: it asks for one instead of guessing the aliases
    wait(lambda: len(rebirth_requests(wire)) >= 1, "a rebirth request")
    node.wait_for(lambda e: e.get("event") == "ncmd" and e["rebirth"])
    time.sleep(0.5)
    last = feeder.stop()

    def counts() -> list[int]:
        return [
            e["data"]["value"]
            for e in gw.events(STREAM)
            if e["type"] == "mfg.signal.sampled" and e["subject"] == "Plant1/Line1/Filler/Count"
        ]

    wait(lambda: last in counts(), f"Count = {last} at the gateway")
    assert agent.stop() == 0, agent.log()[-4000:]

    events = gw.events(STREAM)
    seqs = [int(e["sequence"]) for e in events]
    # nothing committed was lost or doubled: one stream, one epoch, no hole, in order
    assert len({e["streamepoch"] for e in events}) == 1
    assert seqs == list(range(1, len(seqs) + 1))
    assert len({e["id"] for e in events}) == len(events)
    got = counts()
    data_values = [v for v in got if v != 0]  # 0 is the births' value
    assert data_values == sorted(data_values) and len(set(data_values)) == len(data_values)
    assert data_values[0] == 1 and data_values[-1] == last
    # born once for each run of the agent: the first birth, then the requested rebirth
    assert transitions(events).count(("Plant1/Line1", "online", "birth")) == 2


async def test_broker_killed_and_started_again(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], tmp_path: Path, tahu: Any
) -> None:
    buf = await Buffer.open(tmp_path / "buffer.db", plant="p", agent_id="a")
    try:
        wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
        source = build(STREAM, make_config(mosquitto), CTX)
        async with running(source, buf, wire) as task:
            node = await asyncio.to_thread(tahu, mosquitto)
            node.send(cmd="auto_birth")
            node.send(cmd="birth")
            node.send(cmd="ddata", count=1)
            await wait_stored(buf, lambda ev: len(signals(ev, "Count")) == 2)
            before = [s for s in states(wire) if s["online"]][-1]

            await asyncio.to_thread(mosquitto.kill)
            await wait_until(lambda: source.state().state == "disconnected", task=task)
            await asyncio.to_thread(mosquitto.start)
            await asyncio.to_thread(wire.wait_subscriptions, 2, 20)
            await wait_until(lambda: source.state().state == "connected", within=30, task=task)
            # the broker lost the retained STATE: we published online again, newer
            await asyncio.to_thread(
                wire.wait_for,
                lambda _m: any(
                    s["online"] and s["timestamp"] > before["timestamp"] for s in states(wire)
                ),
                30,
            )
            retained = await asyncio.to_thread(_retained_state, mosquitto)
            assert retained is not None and retained["online"] is True
            # the edge node reconnected and was born again: data decodes as before
            await asyncio.to_thread(node.wait_for, lambda e: e.get("event") == "connected", 2)
            await wait_stored(buf, lambda ev: len(signals(ev, "Count")) == 3)
            node.send(cmd="ddata", count=2)
            events = await wait_stored(
                buf, lambda ev: signals(ev, "Count")[-1]["data"]["value"] == 2
            )
        assert [e["data"]["value"] for e in signals(events, "Count")] == [0, 1, 0, 2]
        assert source.state().detail["refused"] == {}
    finally:
        await buf.close()


def _retained_state(broker: Mosquitto) -> dict[str, Any] | None:
    """What a client subscribing now gets on our STATE topic (retained), or None."""
    sub = Subscriber(broker, STATE_TOPIC)
    try:
        with contextlib.suppress(AssertionError):
            sub.wait_for(lambda ms: any(m.retain for m in ms), 5)
        kept = [m for m in sub.snapshot() if m.retain]
        return orjson.loads(kept[-1].payload) if kept else None
    finally:
        sub.close()

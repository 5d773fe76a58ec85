"""MQTT source: a process killed between receipt and PUBACK loses nothing.

1. A process running the source against the real Buffer and a real mosquitto is SIGKILLed
   at exact points (the ingest it uses kills the process): on receipt before the commit,
   and after the commit before the PUBACK. The broker redelivers to the restarted process
   (same client id, persistent session): the event is stored exactly once (in the second
   case the buffer's de-duplication on the MES event id absorbs the redelivery).
2. The real agent with a full buffer (the commit cannot happen) receives messages, is
   SIGKILLed, restarted with room: every message reaches the reference gateway, in order.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.fixtures.common import AgentProcess, agent_config, https_sink
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.programs.mqtt_source_crash import CLIENT_ID

REPO = Path(__file__).resolve().parents[2]


def status_event(n: int, *, with_id: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "mfg.workorder.status_changed",
        "time": "2026-11-23T10:00:00Z",
        "data": {"work_order": f"WO-{n}", "status": "released"},
    }
    if with_id:
        body["id"] = f"mes-evt-{n}"
    return body


def publish(broker: Mosquitto, *payloads: dict[str, Any]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="crash-test-publisher")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for p in payloads:
            info = client.publish("plant/mes/events", orjson.dumps(p), qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def sent_to_agent(broker: Mosquitto) -> int:
    """PUBLISH packets the broker sent to our client id (redeliveries included)."""
    return len(re.findall(rf"Sending PUBLISH to {re.escape(CLIENT_ID)}\b", broker.log()))


def pubacks(broker: Mosquitto, expect: int = 0) -> int:
    """PUBACKs the broker logged from the agent's client, once it logged ``expect`` or 10 s
    passed: the broker may log a PUBACK a moment after the client that sent it exited."""
    deadline = time.monotonic() + 10
    while True:
        n = len(re.findall(rf"Received PUBACK from {re.escape(CLIENT_ID)}\b", broker.log()))
        if n >= expect or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def run(
    tmp_path: Path, broker: Mosquitto, mode: str, expect: int, *, background: bool = False
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    program = "tests.fixtures.programs.mqtt_source_crash"
    args = [
        sys.executable,
        "-m",
        program,
        str(tmp_path / "buffer.db"),
        broker.url,
        mode,
        str(expect),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if background:
        return subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def wait(predicate: Callable[[], bool], what: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def subscribe_once(tmp_path: Path, broker: Mosquitto) -> None:
    """Create the persistent session (a run that stores nothing and stops)."""
    done = run(tmp_path, broker, "normal", 0)
    assert done.returncode == 0, done.stderr


def last_json(out: str) -> dict[str, Any]:
    return orjson.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_sigkill_on_receipt_before_commit_then_redelivered(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    subscribe_once(tmp_path, mosquitto)
    publish(mosquitto, status_event(1, with_id=False))  # waits in the session

    killed = run(tmp_path, mosquitto, "before_commit", 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "received" in killed.stdout and "committed" not in killed.stdout
    assert pubacks(mosquitto) == 0

    again = run(tmp_path, mosquitto, "normal", 1)
    assert again.returncode == 0, again.stderr
    result = last_json(again.stdout)
    assert result["subjects"] == ["WO-1"]
    assert sent_to_agent(mosquitto) == 2, "delivered, then redelivered after the restart"
    assert pubacks(mosquitto, expect=1) == 1


def test_sigkill_after_commit_before_puback_is_stored_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    subscribe_once(tmp_path, mosquitto)
    publish(mosquitto, status_event(1))

    killed = run(tmp_path, mosquitto, "after_commit", 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "committed" in killed.stdout
    assert pubacks(mosquitto) == 0

    publish(mosquitto, status_event(2))
    again = run(tmp_path, mosquitto, "normal", 2)
    assert again.returncode == 0, again.stderr
    result = last_json(again.stdout)
    # redelivered (the PUBACK never left), recognised by its MES id, stored once
    assert result["subjects"] == ["WO-1", "WO-2"]
    assert result["detail"]["duplicates"] == 1
    assert result["detail"]["accepted"] == 1
    assert pubacks(mosquitto, expect=2) == 2


# ----------------------------------------------------------------------------- real agent


def mqtt_agent_config(tmp_path: Path, gw: Any, broker: Mosquitto, max_bytes: int) -> dict:
    return agent_config(
        tmp_path,
        sinks={"https": https_sink(gw)},
        sources={
            "uns": {
                "type": "mqtt",
                "url": broker.url,
                "client_id": CLIENT_ID,
                "reconnect_min": "1s",
                "reconnect_max": "1s",
                "retry_interval": "100ms",
                "subscriptions": [{"topic": "plant/mes/#"}],
            }
        },
        buffer={"max_bytes": max_bytes, "on_full": "block"},
        forwarder={"linger_ms": 5},
    )


def test_real_agent_killed_while_holding_back_loses_nothing(
    tmp_path: Path,
    mosquitto: Mosquitto,
    gateway: Callable[..., Any],
    agent_process: Callable[..., AgentProcess],
) -> None:
    gw = gateway()
    # A buffer too small for any event: every commit is refused, nothing is acknowledged.
    agent = agent_process(mqtt_agent_config(tmp_path, gw, mosquitto, max_bytes=64))
    agent.start(wait_ready=False)
    wait(lambda: f"Sending SUBACK to {CLIENT_ID}" in mosquitto.log(), "the agent's subscription")
    publish(mosquitto, *(status_event(n, with_id=False) for n in range(1, 4)))
    wait(lambda: sent_to_agent(mosquitto) >= 3, "the agent to receive 3 messages")
    time.sleep(0.3)  # retries against the full buffer
    assert pubacks(mosquitto) == 0, "nothing may be acknowledged before it is committed"
    agent.kill()

    agent.write_config(mqtt_agent_config(tmp_path, gw, mosquitto, max_bytes=1 << 30))
    agent.start(wait_ready=False)
    deadline = time.monotonic() + 30
    while len(gw.events("uns")) < 3:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-4000:]
        assert time.monotonic() < deadline, f"gateway has {gw.events('uns')}\n{agent.log()[-3000:]}"
        time.sleep(0.05)
    time.sleep(0.3)
    assert agent.stop() == 0, agent.log()[-4000:]

    assert [e["subject"] for e in gw.events("uns")] == ["WO-1", "WO-2", "WO-3"]
    assert pubacks(mosquitto, expect=3) == 3

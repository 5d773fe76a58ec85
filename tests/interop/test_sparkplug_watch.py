"""``edge-agent sparkplug watch`` against Eclipse Tahu's JS edge node over mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tests.fixtures.mosquitto import Mosquitto, Subscriber
from tests.fixtures.sparkplug import rebirth_requests

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def watch(broker: Mosquitto, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "sparkplug", "watch", broker.url, "--once", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_subscribed(broker: Mosquitto, proc: subprocess.Popen[str], count: int = 2) -> None:
    """Until the watch's subscriptions are acknowledged (groups, then STATE)."""
    deadline = time.monotonic() + 30
    while broker.log().count("Sending SUBACK to edge-agent-watch") < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, broker.log()[-2000:]
        time.sleep(0.05)


def test_watch_lists_nodes_devices_metrics_and_seq_health(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], tahu: Any
) -> None:
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    node = tahu(mosquitto)
    node.send(cmd="birth")
    proc = watch(mosquitto, "--duration", "3", "--json")
    wait_subscribed(mosquitto, proc)
    node.send(cmd="birth")
    node.send(cmd="ddata", temp=22.25, count=9, running=True)
    node.send(cmd="ddata", count=10)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    table = json.loads(out)
    (n,) = table["edge_nodes"]
    assert (n["group_id"], n["edge_node_id"], n["state"], n["seq_health"]) == (
        "Plant1",
        "Line1",
        "online",
        "ok",
    )
    assert n["birth_time"] and n["bd_seq"] == 0
    (dev,) = n["devices"]
    assert dev["device_id"] == "Filler" and dev["state"] == "online"
    metrics = {m["metric"]: m for m in dev["metrics"]}
    assert metrics["Count"]["last_value"] == 10 and metrics["Count"]["alias"] == 11
    assert metrics["Temperature"]["last_value"] == 22.25 and metrics["Temperature"]["unit"] == "°C"
    assert metrics["Running"]["datatype"] == "Boolean"
    # passive by default: nothing published
    assert rebirth_requests(wire) == []


def test_watch_rebirth_asks_nodes_born_before_it_started(
    mosquitto: Mosquitto, mqtt_subscriber: Callable[..., Subscriber], tahu: Any
) -> None:
    wire = mqtt_subscriber(mosquitto, "spBv1.0/#")
    node = tahu(mosquitto)
    node.send(cmd="birth")
    proc = watch(mosquitto, "--duration", "3", "--rebirth")
    wait_subscribed(mosquitto, proc)
    node.send(cmd="ddata", count=3)  # unknown to the watch: it asks for a rebirth
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert len(rebirth_requests(wire)) == 1
    assert "Plant1/Line1/Filler" in out and "Temperature" in out and "online" in out
    assert "seq health" in out


def test_watch_unreachable_broker_is_one_line_error() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agent", "sparkplug", "watch", "mqtt://127.0.0.1:1", "--once"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "cannot connect to mqtt://127.0.0.1:1" in res.stderr

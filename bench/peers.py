"""Figure 10: peers in the same outage scenario: ingest at a fixed rate, the central side
down for 60 s, then up; events lost, order violations, drain rate.

(a) the do-it-yourself store-and-forward: an edge mosquitto with persistence bridging to a
    central mosquitto, the edge broker SIGKILLed (and restarted) during the outage;
(b) Node-RED 4 with node-red-contrib-opcua (installed into bench/peers/node_modules).

"Lost" counts messages the edge ACKNOWLEDGED (PUBACK to the publisher: the moment a
producer may forget them) that never reached the central subscriber.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, Ctx, Deadline, figure

PEERS = REPO / "bench" / "peers"
RATE = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto we configure ourselves (persistence on; the test fixture turns it off)."""

    def __init__(self, d: Path, port: int, extra: str = "") -> None:
        self.d, self.port = d, port
        d.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {d}/",
            f"log_dest file {d / 'mosquitto.log'}",
            "max_queued_messages 1000000",
            "max_inflight_messages 20",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        (d / "mosquitto.conf").write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.d / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        dl = Deadline(10)
        while not dl.over():
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


def mqtt_client(cid: str, clean: bool) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=cid,
        protocol=mqtt.MQTTv311,
        clean_session=clean,
    )
    c.reconnect_delay_set(0.1, 1)
    c.max_queued_messages_set(0)
    return c


class Receiver:
    """Central subscriber (persistent session, QoS 1): received sequences in arrival order."""

    def __init__(self, port: int) -> None:
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.c = mqtt_client("bench-central-sub", clean=False)
        self.c.on_connect = lambda c, *_: c.subscribe("bench/#", qos=1)
        self.c.on_message = self._msg
        self.c.connect_async("127.0.0.1", port)
        self.c.loop_start()

    def _msg(self, _c: Any, _u: Any, m: Any) -> None:
        with self.lock:
            self.seqs.append(int(m.payload.split(b",", 1)[0]))
            self.times.append(time.monotonic())

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def score(acked: set[int], seqs: list[int]) -> dict[str, int]:
    """Order violation: a first arrival below the highest sequence already received."""
    seen: set[int] = set()
    hi = ooo = 0
    for s in seqs:
        if s not in seen and s < hi:
            ooo += 1
        seen.add(s)
        hi = max(hi, s)
    return {
        "acknowledged": len(acked),
        "received_unique": len(seen),
        "lost": len(acked - seen),
        "duplicates": len(seqs) - len(seen),
        "order_violations": ooo,
    }


def mosquitto_bridge(ctx: Ctx) -> dict[str, Any]:
    d = ctx.dir("peers_mosquitto")
    outage = ctx.n(60, 20)
    cport, eport = free_port(), free_port()
    central = Broker(d / "central", cport).start()
    bridge = (
        "connection central\n"
        f"address 127.0.0.1:{cport}\n"
        "topic bench/# out 1\n"
        "cleansession false\n"
        "restart_timeout 1 5\n"
        "autosave_interval 10\n"
    )
    edge = Broker(d / "edge", eport, bridge).start()
    recv = Receiver(cport)
    pub = mqtt_client("bench-producer", clean=False)
    infos: list[tuple[int, Any]] = []  # (sequence, MQTTMessageInfo): is_published() = PUBACKed
    pub.connect_async("127.0.0.1", eport)
    pub.loop_start()
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    pad = b"x" * 280
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            delay = t0 + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            infos.append((i, pub.publish("bench/line1", str(i).encode() + b"," + pad, qos=1)))

    th = threading.Thread(target=produce, daemon=True)
    try:
        time.sleep(1)
        th.start()
        time.sleep(10)
        marks["down"] = time.monotonic() - t0
        central.stop()
        time.sleep(outage / 2)
        edge.stop(signal.SIGKILL)  # the edge broker crashes during the outage...
        marks["edge_killed"] = time.monotonic() - t0
        time.sleep(2)
        edge.start()  # ...and is restarted (systemd would)
        time.sleep(outage / 2 - 2)
        central.start()
        marks["up"] = time.monotonic() - t0
        time.sleep(ctx.n(40, 20))
        stop.set()
        th.join(5)
        dl = Deadline(60)
        while not dl.over():
            n = len(recv.seqs)
            time.sleep(2)
            if len(recv.seqs) == n:
                break
    finally:
        stop.set()
        # publish() while the edge is down returns NO_CONN but paho queues and resends it:
        # what counts is whether a PUBACK came back for it in the end
        acked = {i for i, info in infos if getattr(info, "_published", False)}
        pub.loop_stop()
        recv.close()
        edge.stop()
        central.stop()
    up = t0 + marks["up"]
    after = [t for t in recv.times if t >= up]
    drain = 0.0
    if len(after) > 1:
        # the catch-up burst: arrivals in the first seconds after the central came back
        burst = [t for t in after if t <= after[0] + 5]
        drain = len(burst) / max(0.001, burst[-1] - burst[0]) if len(burst) > 1 else 0.0
    res = score(acked, recv.seqs)
    return figure(
        value=res["lost"],
        unit="events lost",
        drain_rate=round(drain, 1),
        outage_s=outage,
        **res,
        detail=(
            f"edge mosquitto 2 (persistence, autosave 10 s, bridge QoS 1, cleansession false) -> "
            f"central mosquitto down {outage} s, edge SIGKILLed mid-outage and restarted; "
            f"producer QoS 1 at {RATE}/s: {res['acknowledged']:,} PUBACKed, "
            f"{res['received_unique']:,} received, lost {res['lost']:,}, order violations "
            f"{res['order_violations']:,}, duplicates {res['duplicates']:,}; catch-up {drain:,.0f} msg/s"
        ),
    )


NR_RATE = 100  # value changes per second of the OPC UA variable


def install_node_red() -> str | None:
    """node-red@4 + node-red-contrib-opcua into bench/peers; an error text if impossible."""
    PEERS.mkdir(parents=True, exist_ok=True)
    if (PEERS / "node_modules" / "node-red").exists() and (
        PEERS / "node_modules" / "node-red-contrib-opcua"
    ).exists():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "npm not found (apt-get install nodejs npm)"
    p = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(PEERS),
            "node-red@4",
            "node-red-contrib-opcua",
        ],
        capture_output=True,
        timeout=600,
    )
    if p.returncode != 0:
        return f"npm install failed: {p.stderr.decode()[-300:]}"
    return None


def flow(opc_port: int, mqtt_port: int) -> list[dict[str, Any]]:
    """OPC UA subscribe (100 ms, queue 100) -> mqtt out QoS 1, one message per change."""
    return [
        {"id": "tab", "type": "tab", "label": "bench"},
        {
            "id": "ep",
            "type": "OpcUa-Endpoint",
            "endpoint": f"opc.tcp://127.0.0.1:{opc_port}",
            "secpol": "None",
            "secmode": "None",
            "none": True,
            "login": False,
        },
        {
            "id": "br",
            "type": "mqtt-broker",
            "broker": "127.0.0.1",
            "port": str(mqtt_port),
            "clientid": "node-red-bench",
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "4",
            "keepalive": "15",
            "cleansession": True,
        },
        {
            "id": "inj",
            "type": "inject",
            "z": "tab",
            "once": True,
            "onceDelay": "1",
            "repeat": "",
            "topic": "ns=2;s=Seq",
            "props": [{"p": "topic", "vt": "str"}, {"p": "queueSize", "v": "100", "vt": "num"}],
            "wires": [["cli"]],
        },
        {
            "id": "cli",
            "type": "OpcUa-Client",
            "z": "tab",
            "endpoint": "ep",
            "action": "subscribe",
            "deadbandtype": "a",
            "deadbandvalue": 0,
            "time": "100",
            "timeUnit": "ms",
            "certificate": "n",
            "securitymode": "None",
            "securitypolicy": "None",
            "setstatusandtime": False,
            "keepsessionalive": False,
            "maxChunkCount": 1,
            "maxMessageSize": 8192,
            "receiveBufferSize": 8192,
            "sendBufferSize": 8192,
            "wires": [["fn"], [], []],
        },
        {
            "id": "fn",
            "type": "function",
            "z": "tab",
            "outputs": 1,
            "func": "msg.payload = String(msg.payload) + ','; msg.topic = 'bench/line1'; return msg;",
            "wires": [["mq"]],
        },
        {
            "id": "mq",
            "type": "mqtt out",
            "z": "tab",
            "topic": "",
            "qos": "1",
            "retain": "false",
            "broker": "br",
            "wires": [],
        },
    ]


def node_red(ctx: Ctx) -> dict[str, Any]:
    import json
    import sys

    err = install_node_red()
    if err is not None:
        return {"error": err}
    d = ctx.dir("peers_node_red")
    outage = ctx.n(60, 20)
    opc, cport, nport = free_port(), free_port(), free_port()
    counter = d / "counter"
    central = Broker(d / "central", cport).start()
    recv = Receiver(cport)
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.peers_opcua_server", str(opc), str(NR_RATE), str(counter)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    (d / "flows.json").write_text(json.dumps(flow(opc, cport)))
    nr_log = open(d / "node-red.log", "wb")
    nr = subprocess.Popen(
        [
            "node",
            str(PEERS / "node_modules" / "node-red" / "red.js"),
            "-u",
            str(d),
            "-p",
            str(nport),
            str(d / "flows.json"),
        ],
        stdout=nr_log,
        stderr=nr_log,
    )
    marks: dict[str, float] = {}
    try:
        assert server.stdout is not None
        server.stdout.readline()
        dl = Deadline(60)
        while not recv.seqs and not dl.over():
            time.sleep(0.2)
        if not recv.seqs:
            tail = (d / "node-red.log").read_text(errors="replace")[-600:]
            return {"error": f"Node-RED flow delivered nothing within 60 s; log: {tail}"}
        t0 = time.monotonic()
        time.sleep(10)
        marks["down"] = time.monotonic() - t0
        central.stop()
        time.sleep(outage)
        central.start()
        marks["up"] = time.monotonic() - t0
        time.sleep(ctx.n(30, 15))
        server.terminate()
        server.wait(10)
        n = -1
        dl = Deadline(30)
        while len(recv.seqs) != n and not dl.over():
            n = len(recv.seqs)
            time.sleep(2)
    finally:
        for p in (server, nr):
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(Exception):
                    p.wait(10)
            if p.poll() is None:
                p.kill()
        recv.close()
        central.stop()
    last = int(counter.read_text())
    # the first message of the flow carries the inject node's timestamp: not a value
    seqs = [v for v in recv.seqs if 0 < v <= last]
    first = min(seqs)
    produced = set(range(first, last + 1))
    res = score(produced, seqs)
    return figure(
        value=res["lost"],
        unit="events lost",
        outage_s=outage,
        **{k: v for k, v in res.items() if k != "acknowledged"},
        produced=len(produced),
        detail=(
            f"Node-RED 4 (node-red-contrib-opcua subscribe 100 ms, queue 100 -> mqtt out QoS 1) "
            f"from an OPC UA variable changing {NR_RATE}/s; central mosquitto down {outage} s: "
            f"{len(produced):,} values produced after the first delivery, "
            f"{res['received_unique']:,} received, lost {res['lost']:,}, order violations "
            f"{res['order_violations']:,}, duplicates {res['duplicates']:,}; the mqtt out node "
            f"does not keep messages while its broker is away"
        ),
    )


def run(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        out["peer_mosquitto_bridge"] = mosquitto_bridge(ctx)
    except Exception as exc:
        out["peer_mosquitto_bridge"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        out["peer_node_red"] = node_red(ctx)
    except Exception as exc:
        out["peer_node_red"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out

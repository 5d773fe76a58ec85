"""``edge-agent sparkplug watch URL``: what a plant broker carries, as a Sparkplug host sees it.

Passive by default: it subscribes (clean session, its own client id), publishes nothing,
and shows each edge node and device with its state, birth time, bdSeq, seq health, and
every metric with its datatype, alias and last value. Births are not retained by brokers,
so a node born before the watch started shows "no birth" until it is born again;
``--rebirth`` asks such nodes for a rebirth (an NCMD, as our host would).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.tls import TlsFileError, client_context

from . import payload as sp
from .client import ReadAheadClient
from .tracker import NodeInfo, Tracker


@click.group(name="sparkplug")
def sparkplug() -> None:
    """Sparkplug B tools."""


@sparkplug.command()
@click.argument("url")
@click.option("--group", "groups", multiple=True, help="group id to watch (repeat; default all)")
@click.option("--duration", type=float, default=None, help="stop after this many seconds")
@click.option("--once", is_flag=True, help="listen for --duration (default 5 s), print once, exit")
@click.option("--rebirth", is_flag=True, help="ask nodes seen without a birth to rebirth")
@click.option("--json", "as_json", is_flag=True, help="print the table as JSON (with --once)")
@click.option("--username", default=None)
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--cert-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="client certificate (PEM) for mutual TLS, with --key-file")  # fmt: skip
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
def watch(
    url: str,
    groups: tuple[str, ...],
    duration: float | None,
    once: bool,
    rebirth: bool,
    as_json: bool,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> None:
    """List the edge nodes, devices and metrics seen on the broker at URL (mqtt://HOST:PORT)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise click.UsageError(
            f"URL must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT], not {url!r}"
        )
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    if (cert_file is None) != (key_file is None):
        raise click.UsageError("--cert-file and --key-file go together (mutual TLS)")
    tracker = Tracker(emit_events=False, rebirth_interval_ms=10_000)
    lock = threading.Lock()
    connected = threading.Event()
    problem: list[str] = []
    # the source's read-ahead client: on a busy plant broker stock paho's few-bytes reads
    # fall behind (client.py), and a watch that lags shows stale values and false seq gaps
    client = ReadAheadClient(
        CallbackAPIVersion.VERSION2,
        client_id=f"edge-agent-watch-{int(time.time() * 1000) % 10**9}",
        protocol=paho.MQTTv311,
    )
    if username:
        secret = password_file.read_text().strip() if password_file else None
        client.username_pw_set(username, secret)
    if parts.scheme == "mqtts":
        try:
            client.tls_set_context(client_context(ca_file, cert_file=cert_file, key_file=key_file))
        except TlsFileError as exc:
            raise click.ClickException(f"--{exc.path.replace('_', '-')}: {exc.message}") from None
        except OSError as exc:  # no OS trust store
            raise click.ClickException(str(exc)) from None

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            problem.append(f"broker refused the connection: {reason}")
            return
        c.subscribe([(f"{sp.NAMESPACE}/{g}/#", 0) for g in (groups or ("+",))])
        c.subscribe(f"{sp.NAMESPACE}/STATE/+", 0)
        connected.set()

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.time_ns() // 1_000_000
        with lock:
            if msg.topic.startswith(f"{sp.NAMESPACE}/STATE/"):
                hosts[msg.topic.split("/", 2)[2]] = _host_state(bytes(msg.payload))
                return
            out = tracker.handle(msg.topic, bytes(msg.payload), now)
        if rebirth and out.rebirth:
            g, e = out.rebirth
            c.publish(f"{sp.NAMESPACE}/{g}/NCMD/{e}", sp.rebirth_request(now), qos=0)

    hosts: dict[str, str] = {}
    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(parts.hostname, port, keepalive=30)
    except OSError as exc:
        raise click.ClickException(f"cannot connect to {url}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(10) or problem:
            raise click.ClickException(problem[0] if problem else f"no answer from {url} in 10 s")
        if once:
            time.sleep(duration if duration is not None else 5.0)
            with lock:
                if as_json:
                    click.echo(orjson.dumps(_as_dict(tracker, hosts), option=orjson.OPT_INDENT_2))
                else:
                    _print(tracker, hosts, url)
            return
        _live(tracker, hosts, lock, url, duration)
    finally:
        client.disconnect()
        client.loop_stop()


def _host_state(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "?"
    if isinstance(body, dict) and isinstance(body.get("online"), bool):
        return "online" if body["online"] else "offline"
    return "?"


def _as_dict(tracker: Tracker, hosts: dict[str, str]) -> dict[str, Any]:
    def metrics(table: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "metric": m.name,
                "alias": m.alias,
                "datatype": sp.DATATYPE_NAMES.get(m.datatype, str(m.datatype)),
                "last_value": m.last_value,
                "last_time": m.last_time,
                "updates": m.count,
                "unit": m.engineering_unit,
            }
            for m in table.values()
        ]

    nodes = []
    for node in tracker.nodes.values():
        nodes.append(
            {
                "group_id": node.group_id,
                "edge_node_id": node.edge_node_id,
                "state": _node_state(node),
                "birth_time": node.birth_time,
                "death_time": node.death_time,
                "bd_seq": node.bd_seq,
                "seq": node.seq,
                "seq_health": node.seq_health,
                "seq_gaps": node.seq_gaps,
                "metrics": metrics(node.metrics),
                "devices": [
                    {
                        "device_id": d.device_id,
                        "state": "online"
                        if d.online
                        else ("offline" if d.death_time else "unknown"),
                        "birth_time": d.birth_time,
                        "death_time": d.death_time,
                        "metrics": metrics(d.metrics),
                    }
                    for d in node.devices.values()
                ],
            }
        )
    return {"hosts": hosts, "edge_nodes": nodes, "counters": tracker.snapshot()}


def _node_state(node: NodeInfo) -> str:
    if node.online:
        return "online"
    return "offline" if node.death_time else "unknown (no birth seen)"


def _renderable(tracker: Tracker, hosts: dict[str, str], url: str) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"Sparkplug B on {url}   ", style="bold")
    c = tracker.snapshot()
    head.append(
        f"edge nodes {c['edge_nodes']} ({c['online']} online)   messages {c['messages']}   "
        f"seq gaps {c['seq_gaps']}   refused {sum(c['refused'].values())}"
    )
    parts: list[Any] = [head]
    if hosts:
        parts.append(
            Text("primary hosts: " + ", ".join(f"{h} {s}" for h, s in sorted(hosts.items())))
        )
    nodes = Table(title="edge nodes and devices", title_justify="left", expand=False)
    for col in ("node / device", "state", "birth", "bdSeq", "seq", "seq health"):
        nodes.add_column(col)
    metrics = Table(title="metrics", title_justify="left", expand=False)
    for col in ("node / device", "metric", "alias", "datatype", "last value", "at"):
        metrics.add_column(col)
    for node in tracker.nodes.values():
        name = f"{node.group_id}/{node.edge_node_id}"
        nodes.add_row(
            name,
            _node_state(node),
            node.birth_time or "-",
            str(node.bd_seq) if node.bd_seq is not None else "-",
            str(node.seq) if node.seq is not None else "-",
            node.seq_health,
        )
        rows = [(name, m) for m in node.metrics.values()]
        for dev in node.devices.values():
            dname = f"{name}/{dev.device_id}"
            nodes.add_row(
                f"  {dname}",
                "online" if dev.online else ("offline" if dev.death_time else "unknown"),
                dev.birth_time or "-",
                "",
                "",
                "",
            )
            rows += [(dname, m) for m in dev.metrics.values()]
        for where, m in rows:
            value = m.last_value
            text = orjson.dumps(value).decode() if not isinstance(value, str) else value
            metrics.add_row(
                where,
                m.name,
                "-" if m.alias is None else str(m.alias),
                sp.DATATYPE_NAMES.get(m.datatype, str(m.datatype)),
                (text[:40] + "...") if len(text) > 43 else text,
                (m.last_time or "-").replace("000Z", "Z"),
            )
    parts += [nodes, metrics]
    return Group(*parts)


def _print(tracker: Tracker, hosts: dict[str, str], url: str) -> None:
    from rich.console import Console

    Console(width=140 if not sys.stdout.isatty() else None).print(_renderable(tracker, hosts, url))


def _live(
    tracker: Tracker, hosts: dict[str, str], lock: threading.Lock, url: str, duration: float | None
) -> None:
    from rich.console import Console
    from rich.live import Live

    end = None if duration is None else time.monotonic() + duration
    with Live(console=Console(), refresh_per_second=2) as live:
        try:
            while end is None or time.monotonic() < end:
                with lock:
                    live.update(_renderable(tracker, hosts, url))
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass

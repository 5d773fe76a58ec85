"""Write the figures table into docs/performance.md, between markers (prose stays)."""

from __future__ import annotations

from typing import Any

from bench.common import REPO

DOC = REPO / "docs" / "performance.md"
BEGIN = "<!-- bench:table:begin (written by python -m bench; do not edit) -->"
END = "<!-- bench:table:end -->"

LABELS = {
    "ingest": "Ingest, 500-event appends (fsync)",
    "ingest_concurrent": "Ingest, 200 concurrent 1-event appenders (fsync)",
    "drain_https": "Drain 200k backlog over HTTPS (reference gateway)",
    "drain_http_count": "Drain 200k backlog over HTTP, receiver that only counts",
    "drain_http_process": "Drain 200k backlog over HTTP, whole agent process, counting receiver",
    "drain_https_count": "Drain 200k backlog over HTTPS, receiver that only counts",
    "drain_mqtt": "Drain 200k backlog over MQTT",
    "drain_mqtt_process": "Drain 200k backlog over MQTT, whole agent process",
    "drain_nats": "Drain 200k backlog into NATS JetStream (3 nodes, replicas 3)",
    "buffer_read": "Buffer read path alone (take_batch)",
    "push": "HTTP push, 500-event POSTs",
    "latency": "End-to-end latency at 1,000 ev/s",
    "latency_floor": "End-to-end latency at 1,000 ev/s, linger 0 (the floor)",
    "memory": "Peak RSS draining a 1M backlog",
    "status_time": "`edge-agent status --json`, 1M backlog",
    "disk": "Buffer on disk per event",
    "disk_soak": "File size over fill/drain soak",
    "outage": "60 s gateway outage",
    "opcua": "OPC UA 10,000 items at 1 Hz",
    "opcua_ceiling": "OPC UA items at 1 Hz on one core (recorded responses)",
    "sparkplug_ingest": "Sparkplug B ingest, metrics committed (fsync)",
    "sparkplug_10k": "Sparkplug B, 10,000 metrics/s for 60 s, agent CPU",
    "peer_mosquitto_bridge": "Peer: edge mosquitto bridge, 60 s outage + edge SIGKILL",
    "peer_node_red": "Peer: Node-RED 4 OPC UA -> MQTT, 60 s outage",
    "scale_drain": "Scale: whole-agent HTTP drain, largest backlog (10M)",
    "scale_status": "Scale: `status --json`, largest backlog (10M)",
    "scale_rss": "Scale: peak RSS draining the largest backlog (10M)",
    "scale_streams": "Scale: ingest over 100 streams (ratio: to 1 stream)",
    "scale_week": "Scale: file size over a simulated week",
    "gateway_http": "Reference gateway accepting 200k events, plain HTTP",
    "gateway_http_fsync": "Reference gateway accepting 200k events, plain HTTP, `--fsync`",
    "gateway_https": "Reference gateway accepting 200k events, TLS",
    "gateway_https_fsync": "Reference gateway accepting 200k events, TLS, `--fsync`",
}


def fmt(v: Any) -> str:
    if isinstance(v, float | int):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}".rstrip("0").rstrip(".")
    return str(v)


def table(data: dict[str, Any]) -> str:
    lines = [
        "| figure | edge-agent | raw limit (same run) | ratio | target | met | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, f in data.get("figures", {}).items():
        label = LABELS.get(key, key)
        if "error" in f:
            lines.append(f"| {label} | not measured: {f['error']} | | | | | |")
            continue
        value = f"{fmt(f['value'])} {f.get('unit', '')}"
        if "p99" in f:
            value = f"p50 {fmt(f['p50'])} ms, p99 {fmt(f['p99'])} ms"
        if f.get("median_by") == "value" and "value_runs" in f:  # a rate target: its range
            runs = f["value_runs"]
            value += f" (median of {len(runs)}: {fmt(min(runs))}-{fmt(max(runs))})"
        raw = f"{fmt(f['raw'])} ({f.get('raw_label', '')})" if "raw" in f else ""
        r = f"{f['ratio']:.2f}" if "ratio" in f else ""
        if "ratio_spread" in f:  # the median of several runs, and their range
            lo, hi = f["ratio_spread"]
            r += f" (median of {len(f['ratio_runs'])}: {lo:.2f}-{hi:.2f})"
        met = {True: "yes", False: "**no**", None: ""}[f.get("met")]
        lines.append(
            f"| {label} | {value} | {raw} | {r} | {f.get('target', '')} | {met} "
            f"| `{f.get('command', '')}` |"
        )
    notes = [
        f"- **{LABELS.get(k, k)}**: {f['detail']}"
        for k, f in data.get("figures", {}).items()
        if f.get("detail")
    ]
    m = data.get("machine", {})
    head = f"Machine: {m.get('cpus')} CPUs, Python {m.get('python')}.\n\n"
    return head + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_report(data: dict[str, Any]) -> None:
    text = DOC.read_text() if DOC.exists() else "# Performance\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text += "\n" + BEGIN + "\n" + END + "\n"
    pre, rest = text.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    DOC.write_text(pre + BEGIN + "\n" + table(data) + END + post)

"""Renders the status snapshot as a table that fits 100 columns.

Colour only on a terminal (rich decides); a pipe or a file gets plain text.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from agent.status import human_bytes, human_duration

_STATE_STYLE = {
    "connected": "green",
    "sending": "green",
    "idle": "green",
    "finished": "green",
    "retrying": "yellow",
    "disconnected": "yellow",
    "starting": "yellow",
    "auth_failed": "bold red",
    "error": "bold red",
    "stopped": "dim",
}


def _state(s: str | None) -> Text:
    s = s or "-"
    return Text(s, style=_STATE_STYLE.get(s, ""))


def _ago(ts: float | None) -> str:
    return human_duration(time.time() - ts) + " ago" if ts else "-"


def renderable(snap: dict[str, Any]) -> Group:
    a, b = snap["agent"], snap["buffer"]
    head = Text()
    head.append(f"edge-agent {a['version']}  agent {a['id']}  plant {a['plant']}  ")
    if a["running"]:
        head.append(f"RUNNING (pid {a['pid']}, up {_ago(a['started_at'])[:-4]})", style="green")
    else:
        head.append("NOT RUNNING", style="bold red")
        if a["heartbeat_age_s"] is not None:
            head.append(f" (last heartbeat {human_duration(a['heartbeat_age_s'])} ago)")
    used = b["used_bytes"]
    pct = 100 * used / b["max_bytes"] if b["max_bytes"] else 0
    buf = Text(
        f"buffer {human_bytes(used)} of {human_bytes(b['max_bytes'])} ({pct:.0f}%), "
        f"file {human_bytes(b['file_bytes'])}, on_full={b['on_full']}, "
        f"durability={b['durability']}, in {b['ingest_rate_eps']:.0f} ev/s"
    )
    if b["full_in_s"] is not None:
        buf.append(
            f"\nbuffer full in ~{human_duration(b['full_in_s'])} at the current rate",
            style="bold yellow" if b["full_in_s"] < 86400 else "yellow",
        )
    if b.get("refused_total"):
        buf.append(f"\n{b['refused_total']} events refused: buffer full", style="bold red")
    if b.get("last_write_error"):
        buf.append(f"\n{b['last_write_error']}", style="bold red")

    streams = Table(title=None, expand=False, pad_edge=False, box=None, header_style="bold")
    for col, just in [
        ("stream", "left"), ("state", "left"), ("backlog", "right"), ("oldest", "right"),
        ("last sent", "right"), ("sent", "right"), ("dropped", "right"), ("dead", "right"),
    ]:  # fmt: skip
        streams.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    errors: list[Text] = []
    for s in snap["streams"]:
        dead = str(s["dead_letters"])
        streams.add_row(
            s["stream"],
            _state(s["state"]),
            f"{s['backlog_events']:,}",
            human_duration(s["oldest_unsent_age_s"]),
            _ago(s["last_forwarded_at"]),
            f"{s['forwarded_total']:,}",
            Text(f"{s['dropped_total']:,}", style="red" if s["dropped_total"] else ""),
            Text(dead, style="red" if s["dead_letters"] else ""),
        )
        if s["last_error"]:
            errors.append(Text(f"  {s['stream']}: {s['last_error']}"[:200], style="red"))
    comps = Table(expand=False, pad_edge=False, box=None, header_style="bold")
    for col in ("component", "type", "state", "since", "last error"):
        comps.add_column(col, no_wrap=col != "last error", overflow="fold")
    for s in snap["sinks"]:
        comps.add_row(f"sink {s['name']}", s["type"], _state(s["state"]), _ago(s["since"]),
                      (s["last_error"] or "")[:80])  # fmt: skip
    for s in snap["sources"]:
        comps.add_row(f"source {s['name']}", s["type"], _state(s["state"]), _ago(s["since"]),
                      (s["last_error"] or "")[:80])  # fmt: skip
    parts: list[Any] = [head, buf, Text(""), streams]
    if errors:
        parts += [Text("last errors:", style="bold"), *errors]
    if snap["sinks"] or snap["sources"]:
        parts += [Text(""), comps]
    return Group(*parts)


def render(snap: dict[str, Any]) -> None:
    console = Console(width=min(100, Console().width))
    console.print(renderable(snap))

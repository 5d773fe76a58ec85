"""Renders the status snapshot as a table that fits 100 columns.

Colour only on a terminal (rich decides); a pipe or a file gets plain text.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from agent.interfaces import State, is_up
from agent.status import human_bytes, human_duration
from agent.status_model import StatusSnapshot

#: up states are green (the one rule, agent.interfaces.is_up); these others are styled
_STATE_STYLE: dict[str, str] = {
    State.RETRYING: "yellow",
    State.DISCONNECTED: "yellow",
    State.STARTING: "yellow",
    State.AUTH_FAILED: "bold red",
    State.ERROR: "bold red",
    State.STOPPED: "dim",
}


def _state(s: str | None) -> Text:
    s = s or "-"
    return Text(s, style="green" if is_up(s) else _STATE_STYLE.get(s, ""))


def _ago(ts: float | str | None) -> str:
    return human_duration(time.time() - ts) + " ago" if isinstance(ts, int | float) and ts else "-"


#: the table's width when piped, and its widest on a terminal
WIDTH = 100
#: widest the per-source detail cell gets; the rest of the row must fit in 100 columns
DETAIL_WIDTH = 32


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dict):
        return sum(int(v) for v in value.values() if isinstance(v, int | float))
    return None


def source_detail(detail: Any) -> str:
    """One short line from a source's ``detail`` dict: what an operator checks first.

    OPC UA: items monitored of configured and the notification rate; the others: events
    accepted, rejected (all reasons summed) and duplicates when there were any. Keys a
    source does not report are left out, so this never guesses.
    """
    if not isinstance(detail, dict):
        return ""
    parts: list[str] = []
    monitored, configured = detail.get("items_monitored"), detail.get("items_configured")
    if isinstance(monitored, int):
        items = f"items {monitored:,}"
        if isinstance(configured, int) and configured != monitored:
            items += f"/{configured:,}"
        parts.append(items)
    rate = detail.get("notifications_per_second")
    if isinstance(rate, int | float) and not isinstance(rate, bool):
        parts.append(f"{rate:,.0f}/s")
    if not parts:
        accepted = _count(detail.get("accepted", detail.get("emitted")))
        if accepted is not None:
            parts.append(f"accepted {accepted:,}")
    for key, label in (("rejected", "rejected"), ("duplicates", "dup"),
                       ("lost_in_flight", "lost")):  # fmt: skip
        n = _count(detail.get(key))
        if n:
            parts.append(f"{label} {n:,}")
    if detail.get("held_back") or detail.get("held_back_by_full_buffer"):
        parts.append("held back")
    return "  ".join(parts)


def renderable(snapshot: StatusSnapshot | Mapping[str, Any]) -> Group:
    snap = StatusSnapshot.of(snapshot)
    a, b = snap.agent, snap.buffer
    head = Text()
    head.append(f"edge-agent {a.version}  agent {a.id}  plant {a.plant}  ")
    if a.running:
        head.append(f"RUNNING (pid {a.pid}, up {_ago(a.started_at)[:-4]})", style="green")
    else:
        head.append("NOT RUNNING", style="bold red")
        if a.heartbeat_age_s is not None:
            head.append(f" (last heartbeat {human_duration(a.heartbeat_age_s)} ago)")
    used = b.used_bytes
    pct = 100 * used / b.max_bytes if b.max_bytes else 0
    buf = Text(
        f"buffer {human_bytes(used)} of {human_bytes(b.max_bytes)} ({pct:.0f}%), "
        f"file {human_bytes(b.file_bytes)}, on_full={b.on_full}, "
        f"durability={b.durability}, in {b.ingest_rate_eps:.0f} ev/s"
    )
    if b.full_in_s is not None:
        buf.append(
            f"\nbuffer full in ~{human_duration(b.full_in_s)} at the current rate",
            style="bold yellow" if b.full_in_s < 86400 else "yellow",
        )
    if b.refused_total:
        buf.append(f"\n{b.refused_total} events refused: buffer full", style="bold red")
    if b.last_write_error:
        buf.append(f"\n{b.last_write_error}", style="bold red")

    streams = Table(title=None, expand=False, pad_edge=False, box=None, header_style="bold")
    for col, just in [
        ("stream", "left"), ("state", "left"), ("backlog", "right"), ("oldest", "right"),
        ("last sent", "right"), ("sent", "right"), ("dropped", "right"), ("dead", "right"),
    ]:  # fmt: skip
        # A long stream name (up to 64 characters) gives way, never a header or a state.
        streams.add_column(col, justify=just, no_wrap=True,  # type: ignore[arg-type]
                           min_width=12 if col == "state" else len(col),
                           max_width=28 if col == "stream" else None)  # fmt: skip
    errors: list[Text] = []
    for s in snap.streams:
        dead = str(s.dead_letters)
        streams.add_row(
            s.stream,
            _state(s.state),
            f"{s.backlog_events:,}",
            human_duration(s.oldest_unsent_age_s),
            _ago(s.last_forwarded_at),
            f"{s.forwarded_total:,}",
            Text(f"{s.dropped_total:,}", style="red" if s.dropped_total else ""),
            Text(dead, style="red" if s.dead_letters else ""),
        )
        if s.last_error:
            errors.append(Text(f"  {s.stream}: {s.last_error}"[:200], style="red"))
    # Errors go on their own lines below the table, like the streams' errors: a column
    # squeezed next to five others would fold a message into a four-letter-wide ribbon.
    comps = Table(expand=False, pad_edge=False, box=None, header_style="bold")
    comps.add_column("component", no_wrap=True, overflow="ellipsis", max_width=26)
    comps.add_column("type", no_wrap=True, overflow="ellipsis", max_width=12)
    comps.add_column("state", no_wrap=True, min_width=12)  # auth_failed/disconnected whole
    comps.add_column("since", no_wrap=True, min_width=9)
    comps.add_column("detail", no_wrap=True, overflow="ellipsis", max_width=DETAIL_WIDTH)
    comp_errors: list[Text] = []
    for k in snap.sinks:
        comps.add_row(f"sink {k.name}", k.type, _state(k.state), _ago(k.since), "")
        if k.last_error:
            comp_errors.append(Text(f"  sink {k.name}: {k.last_error}"[:200], style="red"))
    for c in snap.sources:
        detail = source_detail(c.detail)
        rejected = _count(c.detail.get("rejected")) if detail else None
        comps.add_row(f"source {c.name}", c.type, _state(c.state), _ago(c.since),
                      Text(detail, style="yellow" if rejected else ""))  # fmt: skip
        if c.last_error:
            comp_errors.append(Text(f"  source {c.name}: {c.last_error}"[:200], style="red"))
    parts: list[Any] = [head, buf, Text(""), streams]
    if errors:
        parts += [Text("last errors:", style="bold"), *errors]
    if snap.sinks or snap.sources:
        parts += [Text(""), comps]
        if comp_errors:
            parts += [Text("last errors:", style="bold"), *comp_errors]
    return Group(*parts)


def render(snap: StatusSnapshot | Mapping[str, Any]) -> None:
    """On a terminal: its width, at most 100. Piped (a file, a ticket): exactly 100."""
    probe = Console()
    width = min(WIDTH, probe.width) if probe.is_terminal else WIDTH
    Console(width=width).print(renderable(snap))

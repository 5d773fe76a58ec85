"""`edge-agent status --check`: the snapshot judged the way monitoring plugins judge.

Nagios, Icinga, Zabbix (through its Nagios-plugin bridge) and Checkmk's legacy checks all
run a command and read its exit code and first line (the Monitoring Plugins Development
Guidelines): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, then ``TEXT | perfdata``. Perfdata is
``'label'=value[UOM];[warn];[crit];[min];[max]`` with warn and crit as threshold ranges:
``900`` alerts above 900, ``43200:`` alerts below 43200, so each threshold below says in
its own perfdata which way it points.

What decides the state (worst wins, every problem is named in the line, CRITICAL first):

    CRITICAL  the agent is not running; a sink or source is refused its credentials
              (auth_failed); the buffer refuses events (full under on_full = block, disk
              full, a write error); a threshold's critical level is passed
    WARNING   a threshold's warning level is passed; a sink or source is disconnected or
              in error; a stream's forwarder is in error
    UNKNOWN   the status cannot be read (permission, a corrupt buffer, a bad config)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.interfaces import State
from agent.status import human_duration
from agent.status_model import StatusSnapshot

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
PREFIX = "EDGE-AGENT"
#: longest reason quoted from a sink or source; the whole line stays readable in a console
REASON_WIDTH = 100


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Above ``*_age``/``*_dead_letters`` or below ``*_runway`` alerts; None disables.

    The defaults follow docs/prometheus-rules.yml: backlog older than 15 min is a warning
    and 4 h critical; a buffer full within 12 h is a warning and within 2 h critical; any
    dead letter waits for an operator's decision (warning).
    """

    warn_age: float | None = 900.0
    crit_age: float | None = 4 * 3600.0
    warn_runway: float | None = 12 * 3600.0
    crit_runway: float | None = 2 * 3600.0
    warn_dead_letters: int | None = 0
    crit_dead_letters: int | None = None


def line(state: int, text: str, perfdata: str = "") -> str:
    out = f"{PREFIX} {NAMES[state]} - {text}"
    return f"{out} | {perfdata}" if perfdata else out


def _num(v: float) -> str:
    """A perfdata number: no exponent, no needless decimals."""
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3f}".rstrip("0")


def _t(v: float | None, below: bool = False) -> str:
    if v is None:
        return ""
    return f"{_num(v)}:" if below else _num(v)


def _cut(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 3] + "..."


def figures(snapshot: StatusSnapshot | Mapping[str, Any]) -> dict[str, Any]:
    snap = StatusSnapshot.of(snapshot)
    streams = snap.streams
    ages = [s.oldest_unsent_age_s for s in streams if s.oldest_unsent_age_s]
    oldest = max(ages, default=0.0)
    worst = next((s.stream for s in streams if s.oldest_unsent_age_s == oldest), None)
    return {
        "backlog": sum(s.backlog_events for s in streams),
        "oldest_age": float(oldest),
        "oldest_stream": worst,
        "dead_letters": sum(s.dead_letters for s in streams),
        "runway": snap.buffer.full_in_s,
    }


def perfdata(snapshot: StatusSnapshot | Mapping[str, Any], t: Thresholds) -> str:
    snap = StatusSnapshot.of(snapshot)
    f = figures(snap)
    b = snap.buffer
    runway = "U" if f["runway"] is None else f"{_num(f['runway'])}s"
    return " ".join(
        [
            f"backlog={f['backlog']};;;0",
            f"oldest_age={_num(f['oldest_age'])}s;{_t(t.warn_age)};{_t(t.crit_age)};0",
            f"dead_letters={f['dead_letters']};{_t(t.warn_dead_letters)};"
            f"{_t(t.crit_dead_letters)};0",
            # U: "not determined" in the guidelines' words; the buffer is not filling
            f"runway={runway};{_t(t.warn_runway, True)};{_t(t.crit_runway, True)};0",
            f"buffer_used={b.used_bytes}B;;;0;{b.max_bytes}",
        ]
    )


#: states that make a sink or source a WARNING (auth_failed is CRITICAL on its own)
_TROUBLE = (State.DISCONNECTED, State.ERROR)


def evaluate(snapshot: StatusSnapshot | Mapping[str, Any], t: Thresholds) -> tuple[int, str]:
    """(exit code, the one output line) for a status snapshot."""
    snap = StatusSnapshot.of(snapshot)
    crit: list[str] = []
    warn: list[str] = []
    a, b = snap.agent, snap.buffer
    f = figures(snap)

    if not a.running:
        age = a.heartbeat_age_s
        crit.append(
            "agent not running"
            + (f" (last heartbeat {human_duration(age)} ago)" if age is not None else "")
        )
    refused_sinks: set[str] = set()
    for k in snap.sinks:
        if k.state == State.AUTH_FAILED:
            refused_sinks.add(k.name)
            crit.append(f"sink {k.name}: credentials refused ({_cut(k.last_error)})")
        elif k.state in _TROUBLE:
            warn.append(f"sink {k.name} {k.state} ({_cut(k.last_error)})")
    for s in snap.streams:
        # an HTTPS sink learns of a refusal per request: the stream's forwarder knows it
        if s.state == State.AUTH_FAILED and s.sink not in refused_sinks:
            refused_sinks.add(s.sink)
            crit.append(f"sink {s.sink}: credentials refused ({_cut(s.last_error)})")
        elif s.state == State.ERROR:
            warn.append(f"stream {s.stream}: forwarder error ({_cut(s.last_error)})")
    for c in snap.sources:
        if c.state == State.AUTH_FAILED:
            crit.append(f"source {c.name}: credentials refused ({_cut(c.last_error)})")
        elif c.state in _TROUBLE:
            warn.append(f"source {c.name} {c.state} ({_cut(c.last_error)})")
    if a.running and (b.accepting is False or b.last_write_error):
        why = _cut(b.last_write_error) or (
            f"buffer full, on_full = {b.on_full}; restore the sink or raise buffer.max_bytes"
        )
        crit.append(f"buffer refuses events ({why})")

    age = f["oldest_age"]
    where = f"stream {f['oldest_stream']}: " if f["oldest_stream"] else ""
    if t.crit_age is not None and age > t.crit_age:
        crit.append(
            f"{where}oldest unsent {human_duration(age)} (crit {human_duration(t.crit_age)})"
        )
    elif t.warn_age is not None and age > t.warn_age:
        warn.append(
            f"{where}oldest unsent {human_duration(age)} (warn {human_duration(t.warn_age)})"
        )
    runway = f["runway"]
    if runway is not None:
        full = f"buffer full in {human_duration(runway)}"
        if t.crit_runway is not None and runway < t.crit_runway:
            crit.append(f"{full} (crit {human_duration(t.crit_runway)})")
        elif t.warn_runway is not None and runway < t.warn_runway:
            warn.append(f"{full} (warn {human_duration(t.warn_runway)})")
    dl = f["dead_letters"]
    if t.crit_dead_letters is not None and dl > t.crit_dead_letters:
        crit.append(
            f"{dl} dead letter(s) (crit > {t.crit_dead_letters}; edge-agent dead-letter list)"
        )
    elif t.warn_dead_letters is not None and dl > t.warn_dead_letters:
        warn.append(f"{dl} dead letter(s) (edge-agent dead-letter list)")

    state = CRITICAL if crit else WARNING if warn else OK
    if state == OK:
        text = (
            f"running (pid {a.pid}), {len(snap.streams)} stream(s), "
            f"backlog {f['backlog']:,}, oldest unsent {human_duration(age) if age else '0s'}, "
            f"{dl} dead letter(s)"
        )
    else:
        text = "; ".join(crit + warn)
    return state, line(state, text, perfdata(snap, t))

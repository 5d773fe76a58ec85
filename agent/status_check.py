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

from dataclasses import dataclass
from typing import Any

from agent.status import human_duration

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


def figures(snap: dict[str, Any]) -> dict[str, Any]:
    streams = snap.get("streams") or []
    ages = [s["oldest_unsent_age_s"] for s in streams if s.get("oldest_unsent_age_s")]
    oldest = max(ages, default=0.0)
    worst = next((s["stream"] for s in streams if s.get("oldest_unsent_age_s") == oldest), None)
    return {
        "backlog": sum(int(s.get("backlog_events") or 0) for s in streams),
        "oldest_age": float(oldest),
        "oldest_stream": worst,
        "dead_letters": sum(int(s.get("dead_letters") or 0) for s in streams),
        "runway": snap["buffer"].get("full_in_s"),
    }


def perfdata(snap: dict[str, Any], t: Thresholds) -> str:
    f = figures(snap)
    b = snap["buffer"]
    runway = "U" if f["runway"] is None else f"{_num(f['runway'])}s"
    return " ".join(
        [
            f"backlog={f['backlog']};;;0",
            f"oldest_age={_num(f['oldest_age'])}s;{_t(t.warn_age)};{_t(t.crit_age)};0",
            f"dead_letters={f['dead_letters']};{_t(t.warn_dead_letters)};"
            f"{_t(t.crit_dead_letters)};0",
            # U: "not determined" in the guidelines' words; the buffer is not filling
            f"runway={runway};{_t(t.warn_runway, True)};{_t(t.crit_runway, True)};0",
            f"buffer_used={int(b.get('used_bytes') or 0)}B;;;0;{int(b.get('max_bytes') or 0)}",
        ]
    )


def evaluate(snap: dict[str, Any], t: Thresholds) -> tuple[int, str]:
    """(exit code, the one output line) for a status snapshot."""
    crit: list[str] = []
    warn: list[str] = []
    a, b = snap["agent"], snap["buffer"]
    f = figures(snap)

    if not a.get("running"):
        age = a.get("heartbeat_age_s")
        crit.append(
            "agent not running"
            + (f" (last heartbeat {human_duration(age)} ago)" if age is not None else "")
        )
    refused_sinks = set()
    for s in snap.get("sinks") or []:
        if s.get("state") == "auth_failed":
            refused_sinks.add(s["name"])
            crit.append(f"sink {s['name']}: credentials refused ({_cut(s.get('last_error'))})")
        elif s.get("state") in ("disconnected", "error"):
            warn.append(f"sink {s['name']} {s['state']} ({_cut(s.get('last_error'))})")
    for s in snap.get("streams") or []:
        # an HTTPS sink learns of a refusal per request: the stream's forwarder knows it
        if s.get("state") == "auth_failed" and s.get("sink") not in refused_sinks:
            refused_sinks.add(s.get("sink"))
            crit.append(f"sink {s.get('sink')}: credentials refused ({_cut(s.get('last_error'))})")
        elif s.get("state") == "error":
            warn.append(f"stream {s['stream']}: forwarder error ({_cut(s.get('last_error'))})")
    for s in snap.get("sources") or []:
        if s.get("state") == "auth_failed":
            crit.append(f"source {s['name']}: credentials refused ({_cut(s.get('last_error'))})")
        elif s.get("state") in ("disconnected", "error"):
            warn.append(f"source {s['name']} {s['state']} ({_cut(s.get('last_error'))})")
    if a.get("running") and (b.get("accepting") is False or b.get("last_write_error")):
        why = _cut(b.get("last_write_error")) or (
            f"buffer full, on_full = {b.get('on_full')}; restore the sink or raise buffer.max_bytes"
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
            f"running (pid {a.get('pid')}), {len(snap.get('streams') or [])} stream(s), "
            f"backlog {f['backlog']:,}, oldest unsent {human_duration(age) if age else '0s'}, "
            f"{dl} dead letter(s)"
        )
    else:
        text = "; ".join(crit + warn)
    return state, line(state, text, perfdata(snap, t))

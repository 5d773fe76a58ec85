"""The status snapshot: one builder for `edge-agent status`, /metrics and /readyz.

The running agent writes a heartbeat (its in-memory view: sinks, sources, rates) into a
file beside the buffer every HEARTBEAT_INTERVAL, and within a fraction of a second when a
source, sink or forwarder changes state; the counters live in the ``streams`` table.
Status reads both, read-only, so it works whether the agent runs or not, and metrics
(built from the same snapshot inside the agent) always agree with it. The snapshot is
typed (agent/status_model.py); the JSON below is its ``to_dict()``.

Schema 1 of ``status --json`` (stable; new keys may be added, none removed or renamed):

    {"schema": 1,
     "agent": {"id", "plant", "version", "running", "pid", "started_at", "heartbeat_age_s"},
     "buffer": {"path", "file_bytes", "used_bytes", "max_bytes", "on_full", "durability",
                "epoch", "ingest_rate_eps", "full_in_s", "refused_total", "last_write_error",
                "accepting"},
     "streams": [{"stream", "sink", "priority", "last_sequence", "forwarded_sequence",
                  "backlog_events", "backlog_bytes", "oldest_unsent_age_s", "last_forwarded_at",
                  "last_error", "state", "dead_letters", "ingested_total", "forwarded_total",
                  "dropped_total", "dead_lettered_total", "refused_total"}],
     "sinks": [{"name", "type", "state", "since", "last_error"}],
     "sources": [{"name", "type", "stream", "state", "since", "last_error", "detail"}]}
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.buffer import stats
from agent.heartbeat import heartbeat_path, read_heartbeat
from agent.interfaces import State
from agent.status_model import (
    SCHEMA,
    AgentInfo,
    BufferInfo,
    SinkStatus,
    SourceStatus,
    StatusSnapshot,
    StreamStatus,
)

HEARTBEAT_INTERVAL = 2.0


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.stat(str(path) + suffix).st_size
        except OSError:
            pass
    return total


def build_snapshot(
    *,
    rows: list[dict[str, Any]],
    heartbeat: dict[str, Any] | None,
    meta: dict[str, str],
    path: Path,
    max_bytes: int,
    on_full: str,
    durability: str,
    agent_id: str,
    plant: str,
    version: str,
    stream_sinks: dict[str, tuple[str, str]],
    now: float | None = None,
    running: bool | None = None,
) -> StatusSnapshot:
    """The snapshot from the buffer's counters and the heartbeat (see the module doc)."""
    now = time.time() if now is None else now
    hb = heartbeat or {}
    hb_age = now - hb["at"] if "at" in hb else None
    if running is None:
        running = bool(
            hb_age is not None
            and hb_age < 3 * HEARTBEAT_INTERVAL + 2
            and pid_alive(hb.get("pid"))
            and not hb.get("stopped")
        )
    fwd_state = hb.get("forwarders", {})
    refused = hb.get("refused", {})
    used = sum(r["stored_bytes"] for r in rows)
    streams = []
    for r in rows:
        name = r["name"]
        sink, prio = stream_sinks.get(name, (hb.get("stream_sinks", {}).get(name, ["", "normal"])))
        fs = fwd_state.get(name, {})
        streams.append(
            StreamStatus(
                stream=name,
                sink=sink,
                priority=prio,
                last_sequence=r["last_seq"],
                forwarded_sequence=r["forwarded_seq"],
                backlog_events=r["backlog_events"],
                backlog_bytes=r["backlog_bytes"],
                oldest_unsent_age_s=(
                    round(now - r["oldest_unsent_at"], 3) if r["oldest_unsent_at"] else None
                ),
                last_forwarded_at=r["last_forwarded_at"],
                last_error=r["last_error"],
                state=_state(fs.get("state")) if running else State.STOPPED.value,
                dead_letters=r["dead_letters"],
                ingested_total=r["ingested_total"],
                forwarded_total=r["forwarded_total"],
                dropped_total=r["dropped_total"],
                dead_lettered_total=r["dead_lettered_total"],
                refused_total=int(refused.get(name, 0)),
            )
        )
    rate_eps = float(hb.get("ingest_rate_eps", 0.0)) if running else 0.0
    fill_bps = float(hb.get("net_fill_bps", 0.0)) if running else 0.0
    free = max(0, max_bytes - used)
    full_in = round(free / fill_bps, 1) if fill_bps > 0 else None
    sinks = [SinkStatus.from_dict(s) for s in hb.get("sinks", [])]
    sources = [SourceStatus.from_dict(s) for s in hb.get("sources", [])]
    if not running:  # what the heartbeat said they were is history: they are stopped now
        sinks = [replace(s, state=State.STOPPED.value) for s in sinks]
        sources = [replace(s, state=State.STOPPED.value) for s in sources]
    return StatusSnapshot(
        agent=AgentInfo(
            id=hb.get("agent_id", agent_id),
            plant=hb.get("plant", plant),
            version=hb.get("version", version),
            running=running,
            pid=hb.get("pid") if running else None,
            started_at=hb.get("started_at"),
            heartbeat_age_s=round(hb_age, 3) if hb_age is not None else None,
        ),
        buffer=BufferInfo(
            path=str(path),
            file_bytes=file_bytes(path),
            used_bytes=used,
            max_bytes=max_bytes,
            on_full=on_full,
            durability=durability,
            epoch=meta.get("epoch"),
            ingest_rate_eps=round(rate_eps, 2),
            full_in_s=full_in,
            refused_total=int(sum(refused.values())) if refused else 0,
            last_write_error=hb.get("last_write_error") if running else None,
            # False while appends are refused (buffer full under on_full = block, disk full)
            accepting=bool(hb.get("accepting", True)) if running else None,
        ),
        streams=tuple(streams),
        sinks=tuple(sinks),
        sources=tuple(sources),
    )


def _state(value: Any) -> str | None:
    return None if value is None else str(value)


def access_problem(path: Path) -> str | None:
    """None when this user may read the buffer and heartbeat; else one line saying what to do.

    A non-root operator reads them through the group that owns them (``edge-agent`` on a
    .deb install: state directory 0750, buffer and heartbeat 0640). Without this, SQLite
    says "unable to open database file" and a heartbeat that cannot be read would look like
    an agent that is not running.
    """
    return unreadable(path, heartbeat_path(path))


def unreadable(*files: Path) -> str | None:
    """The one-line fix when this user may not read one of ``files`` (None: all readable
    or absent)."""
    blocked: Path | None = None
    checks: list[tuple[Path, int]] = []
    for f in files:
        checks += [(f.parent, os.X_OK), (f, os.R_OK)]
    for p, need in checks:
        try:
            os.stat(p)
        except FileNotFoundError:
            continue  # no buffer yet, or no heartbeat yet: said elsewhere
        except PermissionError:
            blocked = p.parent
            break
        if not os.access(p, need):
            blocked = p
            break
    if blocked is None:
        return None
    import grp
    import pwd
    import stat

    try:
        st = os.stat(blocked)
    except OSError:
        return f"permission denied: cannot reach {blocked}: run it as root (sudo edge-agent status)"

    def name(fn: Any, ident: int) -> str:
        try:
            return str(fn(ident)[0])
        except KeyError:
            return str(ident)

    user = name(pwd.getpwuid, os.geteuid())
    owner, group = name(pwd.getpwuid, st.st_uid), name(grp.getgrgid, st.st_gid)
    mode = stat.filemode(st.st_mode)
    where = f"{blocked} ({mode} {owner}:{group})"
    if st.st_gid == 0 or not st.st_mode & (stat.S_IRGRP if blocked.is_file() else stat.S_IXGRP):
        fix = (
            "run it as root (sudo edge-agent status ...), or let the edge-agent group read "
            "the state directory (0750) and the buffer and heartbeat (0640), see docs/install.md"
        )
    else:
        fix = (
            f"add {user} to the {group} group (sudo usermod -aG {group} {user}, then log in "
            "again) or run it as root"
        )
    return f"permission denied: {user} may not read {where}: {fix}"


def read_offline(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, str]]:
    """Read counters and heartbeat from the buffer file without writing to it."""
    if not path.exists():
        raise FileNotFoundError(path)
    conn = stats.open_read_only(str(path))
    try:
        rows = [s.as_dict() for s in stats.read_streams(conn)]
        meta = stats.read_meta(conn)
    finally:
        conn.close()
    hb = read_heartbeat(path)
    return rows, hb, meta


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = [
    "HEARTBEAT_INTERVAL",
    "SCHEMA",
    "StatusSnapshot",
    "access_problem",
    "build_snapshot",
    "file_bytes",
    "human_bytes",
    "human_duration",
    "pid_alive",
    "read_offline",
    "unreadable",
]

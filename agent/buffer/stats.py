"""Stats: the read-only view of the buffer's counters, for the running agent (heartbeat,
metrics, outage summaries) and for `edge-agent status` reading the file from outside.

Counters live in the ``streams`` row and change in the same transaction as the events,
so this is O(streams) and exact even with a million events in the backlog.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass
from typing import Any

_COLUMNS = (
    "sid", "name", "last_seq", "forwarded_seq", "ingested_total", "ingested_bytes",
    "forwarded_total", "forwarded_bytes", "dropped_total", "dropped_bytes",
    "dead_lettered_total", "dead_lettered_bytes", "stored_bytes", "last_forwarded_at",
    "last_error", "checkpoint_seq", "checkpoint_at",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class StreamStats:
    """One stream's counters, straight from the file."""

    sid: int
    name: str
    last_seq: int
    forwarded_seq: int
    ingested_total: int
    ingested_bytes: int
    forwarded_total: int
    forwarded_bytes: int
    dropped_total: int
    dropped_bytes: int
    dead_lettered_total: int
    dead_lettered_bytes: int
    stored_bytes: int
    last_forwarded_at: float | None
    last_error: str | None
    checkpoint_seq: int
    checkpoint_at: float | None
    #: commit time of the oldest unsent event
    oldest_unsent_at: float | None
    dead_letters: int

    @property
    def backlog_events(self) -> int:
        return (
            self.ingested_total
            - self.forwarded_total
            - self.dropped_total
            - self.dead_lettered_total
        )

    @property
    def backlog_bytes(self) -> int:
        return (
            self.ingested_bytes
            - self.forwarded_bytes
            - self.dropped_bytes
            - self.dead_lettered_bytes
        )

    def as_dict(self) -> dict[str, Any]:
        """The shape status snapshots and the heartbeat carry (backlog included)."""
        d = dataclasses.asdict(self)
        d["backlog_events"] = self.backlog_events
        d["backlog_bytes"] = self.backlog_bytes
        return d


def read_streams(c: sqlite3.Connection) -> list[StreamStats]:
    """Per-stream counters, ordered by name; any connection (a read-only one will do)."""
    out = []
    for row in c.execute(f"SELECT {', '.join(_COLUMNS)} FROM streams ORDER BY name").fetchall():
        d = dict(zip(_COLUMNS, row, strict=True))
        first = c.execute(
            "SELECT committed_at FROM events WHERE sid = ? AND seq > ? ORDER BY seq LIMIT 1",
            (d["sid"], d["forwarded_seq"]),
        ).fetchone()
        dead = c.execute("SELECT COUNT(*) FROM dead_letters WHERE sid = ?", (d["sid"],)).fetchone()
        out.append(
            StreamStats(**d, oldest_unsent_at=first[0] if first else None, dead_letters=dead[0])
        )
    return out


def read_meta(c: sqlite3.Connection) -> dict[str, str]:
    return {k: v for k, v in c.execute("SELECT key, value FROM meta")}


def open_read_only(path: str) -> sqlite3.Connection:
    """A connection that never writes to the file (status may run as another user)."""
    uri = f"file:{path}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=2.0)
        conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        # A WAL file we may not create -shm for (read-only directory): read as immutable.
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    return conn

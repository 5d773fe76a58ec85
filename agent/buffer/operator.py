"""Operator: dead letters and replays, the only way in for `edge-agent dead-letter ...`
and `edge-agent replay` (agent/cli.py holds no SQL of the buffer).

Two sides:

* the CLI, a separate process, opens the file with ``connect`` and calls the plain
  functions below (list, show, request_retry, drop, request_replay);
* the running agent's forwarders call the ``*_requested`` / ``resolve`` / ``finish``
  functions through the writer's thread.

How a running agent is told. Requests (a retry, a replay) are rows the forwarder polls
for every ``poll_interval``. A change of SIZES (dropping dead letters lowers
``stored_bytes``) would leave the agent's in-memory size, and so its room for appends,
behind the file: so every operator write that changes sizes also bumps
``meta.operator_generation`` in the same transaction, and the agent's housekeeping tick
(once a second, agent/buffer/housekeeping.py) re-reads the stored sizes when the
generation moved. Chosen over a control request (socket, signal) because the CLI works
the same whether or not an agent runs, needs no second way in with its own permissions,
and the file is already the one both sides share; the cost is one meta read per second.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.buffer.schema import OPERATOR_GENERATION
from agent.buffer.state import Delta, StreamState
from agent.ids import ulid


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stream: str
    sequence: int
    id: str
    reason: str
    status: int | None
    dead_at: float
    retry_requested: bool
    body: bytes


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command means: these ids, or all (of one stream)."""

    ids: tuple[str, ...] = ()
    all: bool = False
    stream: str | None = None

    def where(self) -> tuple[str, tuple[Any, ...]]:
        if self.all:
            if self.stream:
                return "sid = (SELECT sid FROM streams WHERE name = ?)", (self.stream,)
            return "1", ()
        q = ",".join("?" * len(self.ids))
        return f"id IN ({q})", self.ids


@dataclass(frozen=True, slots=True)
class ReplayQueued:
    count: int
    first_seq: int
    to_seq: int


class UnknownStream(LookupError):
    def __init__(self, stream: str, known: list[str]) -> None:
        super().__init__(stream)
        self.stream = stream
        self.known = known


# ---------------------------------------------------------------------- the CLI's side


def connect(path: Path) -> sqlite3.Connection:
    """The operator's own connection to the file (the agent may be running: wait for its
    transactions rather than fail)."""
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def list_dead_letters(conn: sqlite3.Connection, stream: str | None = None) -> list[DeadLetter]:
    return [
        DeadLetter(name, seq, eid, reason, status, dead_at, bool(retry), body)
        for name, seq, eid, reason, status, dead_at, retry, body in conn.execute(
            "SELECT s.name, d.seq, d.id, d.reason, d.status, d.dead_at, "
            "d.retry_requested, d.body FROM dead_letters d JOIN streams s USING (sid) "
            "WHERE ? IS NULL OR s.name = ? ORDER BY s.name, d.seq",
            (stream, stream),
        )
    ]


def find_dead_letter(conn: sqlite3.Connection, event_id: str) -> DeadLetter | None:
    row = conn.execute(
        "SELECT s.name, d.seq, d.id, d.reason, d.status, d.dead_at, d.retry_requested, d.body "
        "FROM dead_letters d JOIN streams s USING (sid) WHERE d.id = ?",
        (event_id,),
    ).fetchone()
    if row is None:
        return None
    name, seq, eid, reason, status, dead_at, retry, body = row
    return DeadLetter(name, seq, eid, reason, status, dead_at, bool(retry), body)


def request_retry(conn: sqlite3.Connection, which: Selection) -> int:
    """Mark dead letters for retry; the running agent's forwarder sends them. Returns
    how many were marked."""
    where, args = which.where()
    return conn.execute(f"UPDATE dead_letters SET retry_requested = 1 WHERE {where}", args).rowcount


def drop_dead_letters(conn: sqlite3.Connection, which: Selection) -> int:
    """Delete dead letters for good; returns how many. Lowers stored_bytes and bumps the
    operator generation in the same transaction, so a running agent re-reads its size."""
    where, args = which.where()
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute(
            f"SELECT sid, SUM(length(body)), COUNT(*) FROM dead_letters WHERE {where} GROUP BY sid",
            args,
        ).fetchall()
        for sid, size, _ in rows:
            conn.execute(
                "UPDATE streams SET stored_bytes = stored_bytes - ? WHERE sid = ?", (size, sid)
            )
        conn.execute(f"DELETE FROM dead_letters WHERE {where}", args)
        if rows:
            _bump_generation(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return sum(r[2] for r in rows)


def stream_cursor(conn: sqlite3.Connection, stream: str) -> tuple[int, int]:
    """(sid, forwarded cursor) of ``stream``; raises UnknownStream naming the known ones."""
    row = conn.execute(
        "SELECT sid, forwarded_seq FROM streams WHERE name = ?", (stream,)
    ).fetchone()
    if row is None:
        known = [r[0] for r in conn.execute("SELECT name FROM streams")]
        raise UnknownStream(stream, known)
    return int(row[0]), int(row[1])


def request_replay(
    conn: sqlite3.Connection,
    stream: str,
    *,
    since: float | None = None,
    from_sequence: int | None = None,
) -> ReplayQueued | None:
    """Queue a replay of the forwarded events still kept, from a time or a sequence up to
    the cursor; None when none of them is kept."""
    sid, upto = stream_cursor(conn, stream)
    if since is not None:
        first = conn.execute(
            "SELECT MIN(seq) FROM events WHERE sid = ? AND committed_at >= ? AND seq <= ?",
            (sid, since, upto),
        ).fetchone()[0]
    else:
        first = from_sequence
    kept = conn.execute(
        "SELECT COUNT(*), MIN(seq) FROM events WHERE sid = ? AND seq >= ? AND seq <= ?",
        (sid, first or 0, upto),
    ).fetchone()
    if first is None or kept[0] == 0:
        return None
    conn.execute(
        "INSERT INTO replays (sid, from_seq, to_seq, requested_at) VALUES (?, ?, ?, ?)",
        (sid, kept[1], upto, time.time()),
    )
    return ReplayQueued(int(kept[0]), int(kept[1]), upto)


def _bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (OPERATOR_GENERATION, ulid()))


# ---------------------------------------------------------------------- the agent's side
# (each one job in the writer's thread)


def retry_requested(db: sqlite3.Connection, stream: str) -> list[DeadLetter]:
    return [d for d in list_dead_letters(db, stream) if d.retry_requested]


def resolve(
    db: sqlite3.Connection, s: StreamState, seq: int, delivered: bool, reason: str
) -> tuple[None, Delta]:
    """After a retry: delivered -> remove it; else keep it with the new reason."""
    delta = Delta()
    if delivered:
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT length(body) FROM dead_letters WHERE sid = ? AND seq = ?", (s.sid, seq)
            ).fetchone()
            db.execute("DELETE FROM dead_letters WHERE sid = ? AND seq = ?", (s.sid, seq))
            if row:
                db.execute(
                    "UPDATE streams SET stored_bytes = stored_bytes - ? WHERE sid = ?",
                    (row[0], s.sid),
                )
                delta.store(s.name, -row[0])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    else:
        db.execute(
            "UPDATE dead_letters SET retry_requested = 0, reason = ? WHERE sid = ? AND seq = ?",
            (reason, s.sid, seq),
        )
    return None, delta


def pending_replays(db: sqlite3.Connection, s: StreamState) -> list[tuple[int, int, int]]:
    return db.execute(
        "SELECT replay_id, from_seq, to_seq FROM replays WHERE sid = ? ORDER BY replay_id",
        (s.sid,),
    ).fetchall()


def read_range(
    db: sqlite3.Connection, s: StreamState, after_seq: int, to_seq: int, max_events: int
) -> list[tuple[int, str, bytes]]:
    return db.execute(
        "SELECT seq, id, body FROM events WHERE sid = ? AND seq > ? AND seq <= ? "
        "ORDER BY seq LIMIT ?",
        (s.sid, after_seq, to_seq, max_events),
    ).fetchall()


def finish_replay(db: sqlite3.Connection, replay_id: int, progressed_to: int | None) -> None:
    if progressed_to is None:
        db.execute("DELETE FROM replays WHERE replay_id = ?", (replay_id,))
    else:
        db.execute(
            "UPDATE replays SET from_seq = ? WHERE replay_id = ?", (progressed_to, replay_id)
        )

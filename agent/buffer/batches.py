"""Batches: take the next contiguous run under a persisted batch id, split it, ack it,
dead-letter its one refused event. Each function is one job in the writer's thread.

Forwarding advances a per-stream cursor (``streams.forwarded_seq``) instead of deleting
rows in the hot path; housekeeping deletes acknowledged rows in bulk later.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, overload

import orjson

from agent.buffer.state import Delta, Settings, StreamState
from agent.ids import ulid
from agent.interfaces import Batch

_Row = TypeVar("_Row", bound=tuple[Any, ...])


@contextlib.contextmanager
def bookkeeping(db: sqlite3.Connection, durability: str) -> Iterator[None]:
    """Commit forwarding bookkeeping (an ack: the cursor) without an fsync.

    Events are committed with the configured durability; an ack needs less. In WAL
    mode synchronous=NORMAL still survives a crash of the process; a power cut may roll
    the last acks back, which only means a batch is sent again under its own key (its
    batch row was made durable before its first send: before_send), never that an
    event is lost. The next fsynced commit makes them durable too. This saves an fsync
    per batch on the drain path.
    """
    if durability != "fsync":
        yield
        return
    db.execute("PRAGMA synchronous = NORMAL")
    try:
        yield
    finally:
        db.execute("PRAGMA synchronous = FULL")


@contextlib.contextmanager
def before_send(db: sqlite3.Connection, durability: str) -> Iterator[None]:
    """Commit a batch row that is about to be sent with a WAL fsync, in either mode.

    The batch id is the Idempotency-Key, and the wire contract says a resend after a
    crash carries the same key; a power cut is a crash. Found by the power-cut
    campaign: with the batch row committed without an fsync (as bookkeeping), a cut
    right after the first send lost the row, and the events went again under a new
    key. With ``durability = "os"`` this fsync also makes every event of the batch (and
    every commit before it) durable before the gateway sees it, so a cut can roll back
    only events nobody outside has seen: a sequence never reaches the gateway with two
    ids. One fsync per batch, not per event.
    """
    if durability == "fsync":
        yield
        return
    db.execute("PRAGMA synchronous = FULL")
    try:
        yield
    finally:
        db.execute("PRAGMA synchronous = NORMAL")


def pending(db: sqlite3.Connection, epoch: str, s: StreamState) -> list[Batch]:
    """Batches persisted but not acknowledged (after a crash), as they were; a batch whose
    rows are gone (stale) comes back with no bodies, to be discarded."""
    out = []
    for bid, first, last in db.execute(
        "SELECT batch_id, first_seq, last_seq FROM batches WHERE sid = ? ORDER BY first_seq",
        (s.sid,),
    ).fetchall():
        rows = db.execute(
            "SELECT seq, id, body FROM events WHERE sid = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            (s.sid, first, last),
        ).fetchall()
        if len(rows) != last - first + 1:
            out.append(Batch(s.name, bid, epoch, first, last, [], []))  # stale
            continue
        out.append(
            Batch(s.name, bid, epoch, first, last, [r[1] for r in rows], [r[2] for r in rows])
        )
    return out


def take(
    db: sqlite3.Connection,
    settings: Settings,
    epoch: str,
    s: StreamState,
    after_seq: int,
    max_events: int,
    max_bytes: int,
    priority: str,
    count: int = 1,
) -> list[Batch]:
    """Up to ``count`` next contiguous runs after ``after_seq`` (or the cursor), each
    persisted under a new batch id, in order; empty when there is nothing to send. Read and
    insert in the writer's thread, so nothing (drop_oldest) can change the rows between
    them.

    Why several at once: a batch row must be made durable before its first send
    (before_send), which costs an fsync; a pipelining sink (MQTT keeps several batches on
    the wire) that takes them one by one pays one fsync per batch on the drain path, and
    one writer hop each. Taken together they share one read, one transaction and one fsync.
    A hole (dropped or dead-lettered events) ends a batch; the next one starts after it,
    as a later call would."""
    after = max(after_seq, s.forwarded_seq)
    # No id column: the drain path never needs the ids (see IdsInBodies), and fetching
    # them costs a third of the read.
    rows = db.execute(
        "SELECT seq, body FROM events WHERE sid = ? AND seq > ? ORDER BY seq LIMIT ?",
        (s.sid, after, max_events * count),
    ).fetchall()
    if not rows:
        return []
    out: list[Batch] = []
    marks: list[tuple[str, int, int, int, float]] = []
    now = time.time()
    pos = 0
    while pos < len(rows) and len(out) < count:
        run = contiguous_run(rows[pos : pos + max_events], max_bytes)
        bodies: list[bytes] = [r[1] for r in run]
        first = run[0][0]
        last = first + len(bodies) - 1
        bid = ulid()
        marks.append((bid, s.sid, first, last, now))
        out.append(Batch(s.name, bid, epoch, first, last, IdsInBodies(bodies), bodies, priority))
        pos += len(run)
    with before_send(db, settings.durability):
        if len(marks) == 1:
            db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", marks[0])
        else:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", marks)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
    return out


def halves(batch: Batch, epoch: str) -> tuple[Batch, Batch]:
    mid = len(batch) // 2
    out = [
        Batch(
            batch.stream,
            ulid(),
            epoch,
            batch.first_sequence + lo,
            batch.first_sequence + hi - 1,
            batch.ids[lo:hi],
            batch.bodies[lo:hi],
            batch.priority,
        )
        for lo, hi in ((0, mid), (mid, len(batch)))
    ]
    return out[0], out[1]


def split(
    db: sqlite3.Connection,
    settings: Settings,
    s: StreamState,
    batch: Batch,
    parts: tuple[Batch, Batch],
) -> None:
    """Replace ``batch`` by its two halves in one transaction (bisecting a rejection), so
    its events are never outside a batch, where drop_oldest could take them."""
    with before_send(db, settings.durability):
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))
            db.executemany(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                [
                    (h.batch_id, s.sid, h.first_sequence, h.last_sequence, time.time())
                    for h in parts
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def discard(db: sqlite3.Connection, batch: Batch) -> None:
    db.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))


def ack(
    db: sqlite3.Connection, settings: Settings, s: StreamState, batch: Batch
) -> tuple[None, Delta]:
    """The sink accepted every event of ``batch``: advance the stream's cursor past it.
    Idempotent: only what is past the cursor counts."""
    return ack_many(db, settings, s, [batch])


def ack_many(
    db: sqlite3.Connection, settings: Settings, s: StreamState, accepted: Sequence[Batch]
) -> tuple[None, Delta]:
    """Acknowledge consecutive accepted batches of one stream, in order, in ONE
    transaction: a pipelining sink's acknowledgements often arrive together, and each
    transaction of its own wrote its pages to the WAL again (16 KiB each)."""
    now = time.time()
    delta = Delta()
    done = 0
    size_total = 0
    with bookkeeping(db, settings.durability):
        db.execute("BEGIN IMMEDIATE")
        try:
            done = db.execute(
                "SELECT forwarded_seq FROM streams WHERE sid = ?", (s.sid,)
            ).fetchone()[0]
            for batch in accepted:
                db.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))
                new = batch.bodies[max(0, done - batch.first_sequence + 1) :]
                size = sum(map(len, new))
                if new:
                    db.execute(
                        "UPDATE streams SET forwarded_seq = ?, forwarded_total ="
                        " forwarded_total + ?, forwarded_bytes = forwarded_bytes + ?,"
                        " last_forwarded_at = ?, last_error = NULL WHERE sid = ?",
                        (batch.last_sequence, len(new), size, now, s.sid),
                    )
                    if settings.keep_forwarded > 0:
                        db.execute(
                            "INSERT OR REPLACE INTO forward_log VALUES (?, ?, ?)",
                            (s.sid, batch.last_sequence, now),
                        )
                    size_total += size
                done = max(done, batch.last_sequence)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    delta.forwarded[s.name] = done
    if settings.keep_forwarded <= 0:
        delta.acked_unreclaimed += size_total
        delta.refusing = False
    return None, delta


def dead_letter(
    db: sqlite3.Connection, s: StreamState, batch: Batch, reason: str, status: int | None
) -> tuple[None, Delta]:
    """Move the single event of ``batch`` to the dead-letter table; the cursor passes it."""
    now = time.time()
    body = batch.bodies[0]
    delta = Delta()
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM batches WHERE batch_id = ?", (batch.batch_id,))
        done = db.execute("SELECT forwarded_seq FROM streams WHERE sid = ?", (s.sid,)).fetchone()[0]
        if batch.first_sequence <= done:  # settled already (see ack)
            db.execute("COMMIT")
            delta.forwarded[s.name] = done
            return None, delta
        db.execute(
            "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            (s.sid, batch.first_sequence, batch.ids[0], body, reason, status, now),
        )
        db.execute("DELETE FROM events WHERE sid = ? AND seq = ?", (s.sid, batch.first_sequence))
        db.execute(
            "UPDATE streams SET forwarded_seq = MAX(forwarded_seq, ?),"
            " dead_lettered_total = dead_lettered_total + 1,"
            " dead_lettered_bytes = dead_lettered_bytes + ?, last_error = ? WHERE sid = ?",
            (batch.first_sequence, len(body), f"dead-lettered {batch.ids[0]}: {reason}", s.sid),
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    delta.forwarded[s.name] = batch.first_sequence
    return None, delta


def set_last_error(db: sqlite3.Connection, s: StreamState, error: str | None) -> None:
    db.execute("UPDATE streams SET last_error = ? WHERE sid = ?", (error, s.sid))


def contiguous_run(rows: Sequence[_Row], max_bytes: int) -> list[_Row]:
    """The leading run of consecutive sequences that fits max_bytes as a JSON array: a
    hole (dropped or dead-lettered events) ends it, so a batch is always contiguous.
    Each row is (seq, ..., body)."""
    # The usual case, decided without the loop: no hole (seq is the key, so a span equal
    # to the count means consecutive) and the whole array fits.
    if rows and rows[-1][0] - rows[0][0] == len(rows) - 1:
        if sum(len(r[-1]) for r in rows) + len(rows) + 1 <= max_bytes:
            return list(rows)
    out: list[_Row] = []
    size = 1
    for row in rows:
        seq, body = row[0], row[-1]
        if out and (seq != out[-1][0] + 1 or size + len(body) + 1 > max_bytes):
            break
        out.append(row)
        size += len(body) + 1
    return out


class IdsInBodies(Sequence[str]):
    """A batch's event ids, read from its stored bodies only when asked for.

    Only bisection, dead-lettering and their log lines look at ids; the drain path does
    not, so take leaves them inside the bodies instead of fetching a column.
    """

    __slots__ = ("_bodies",)

    def __init__(self, bodies: Sequence[bytes]) -> None:
        self._bodies = bodies

    def __len__(self) -> int:
        return len(self._bodies)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [orjson.loads(b)["id"] for b in self._bodies[index]]
        return str(orjson.loads(self._bodies[index])["id"])

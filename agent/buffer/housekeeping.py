"""Housekeeping: delete acknowledged rows in bounded chunks, prune dedupe keys, give free
pages back to the filesystem, notice operator changes made from outside.

Forwarding only moves a cursor; the rows go here, later and in bulk, so the drain path
never waits on a big DELETE. With ``keep_forwarded`` they stay that long (for replays).
"""

from __future__ import annotations

import sqlite3

from agent.buffer import schema
from agent.buffer.state import BufferState, Delta, Settings


def delete_forwarded(
    db: sqlite3.Connection,
    settings: Settings,
    state: BufferState,
    delta: Delta,
    limit_rows: int | None,
    now: float,
    force: bool,
) -> int:
    """Delete forwarded rows (past keep_forwarded unless ``force``); returns bytes freed.

    Opens its own transaction unless called inside one (drop_oldest does)."""
    own_tx = not db.in_transaction
    if own_tx:
        db.execute("BEGIN IMMEDIATE")
    freed_total = 0
    try:
        for s in list(state.streams.values()):
            upto = max(s.forwarded_seq, delta.forwarded.get(s.name, 0))
            if settings.keep_forwarded > 0 and not force:
                row = db.execute(
                    "SELECT MAX(last_seq) FROM forward_log WHERE sid = ? AND forwarded_at < ?",
                    (s.sid, now - settings.keep_forwarded),
                ).fetchone()
                upto = min(upto, row[0] or 0)
            lo = db.execute("SELECT deleted_seq FROM streams WHERE sid = ?", (s.sid,)).fetchone()[0]
            if upto <= lo:
                continue
            if limit_rows is not None:
                upto = min(upto, lo + limit_rows)
            freed = db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM events WHERE sid = ? AND seq > ? AND seq <= ?",
                (s.sid, lo, upto),
            ).fetchone()[0]
            db.execute(
                "DELETE FROM events WHERE sid = ? AND seq > ? AND seq <= ?", (s.sid, lo, upto)
            )
            db.execute("DELETE FROM forward_log WHERE sid = ? AND last_seq <= ?", (s.sid, upto))
            db.execute(
                "UPDATE streams SET deleted_seq = ?, stored_bytes = stored_bytes - ? WHERE sid = ?",
                (upto, freed, s.sid),
            )
            delta.store(s.name, -freed)
            freed_total += freed
        if own_tx:
            db.execute("COMMIT")
    except BaseException:
        if own_tx and db.in_transaction:
            db.execute("ROLLBACK")
        raise
    if freed_total:
        delta.refusing = False
    if settings.keep_forwarded <= 0 or force:
        acked = state.acked_unreclaimed + delta.acked_unreclaimed
        after = 0 if force else max(0, acked - freed_total)
        delta.acked_unreclaimed += after - acked
    return freed_total


#: free pages are returned to the file system once more than this is free ...
VACUUM_ABOVE = 1 << 20
#: ... at most this much per housekeeping pass
VACUUM_PER_PASS = 16 << 20


def prune(db: sqlite3.Connection, settings: Settings, now: float) -> None:
    db.execute("DELETE FROM dedupe WHERE committed_at < ?", (now - settings.dedupe_window,))
    free_pages = db.execute("PRAGMA freelist_count").fetchone()[0]
    page = db.execute("PRAGMA page_size").fetchone()[0]
    # bounded in bytes, not pages: 16 MiB a pass whatever the file's page size (4096 pages
    # was 16 MiB with 4 KiB pages and would be 64 MiB of page moves with 16 KiB ones)
    if free_pages * page > VACUUM_ABOVE:
        # It frees one page per sqlite3_step, and the sqlite3 module steps a statement
        # without result columns only once: executescript runs it to completion.
        db.executescript(f"PRAGMA incremental_vacuum({max(1, VACUUM_PER_PASS // page)});")
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")


def operator_changes(db: sqlite3.Connection, state: BufferState, delta: Delta) -> None:
    """Re-read the stored sizes when an operator command changed them (the generation in
    meta moved): e.g. `edge-agent dead-letter drop` lowers stored_bytes in the file, and
    the running agent's room for appends must grow with it."""
    generation = schema.operator_generation(db)
    if generation == state.operator_generation:
        return
    delta.operator_generation = generation
    delta.reload_stored = {
        name: stored for name, stored in db.execute("SELECT name, stored_bytes FROM streams")
    }


def run(
    db: sqlite3.Connection, settings: Settings, state: BufferState, max_rows: int, now: float
) -> tuple[int, Delta]:
    """One housekeeping pass (one job in the writer's thread)."""
    delta = Delta()
    freed = delete_forwarded(db, settings, state, delta, max_rows, now, False)
    prune(db, settings, now)
    operator_changes(db, state, delta)
    return freed, delta

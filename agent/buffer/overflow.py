"""Overflow under ``on_full = "drop_oldest"``: free room by dropping the oldest unsent
events, and tell the central side with an ``mfg.agent.gap`` event in the stream.

Runs inside the group commit's transaction (agent/buffer/ingest.py), in the writer's
thread; it changes the file and records the size changes in the transaction's Delta.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from typing import Any

import orjson

from agent import event as envelope
from agent.buffer import housekeeping
from agent.buffer.state import BufferState, Delta, EventRow, Settings, Staged
from agent.ids import ulid
from agent.interfaces import NewEvent

log = logging.getLogger("edge_agent.buffer")

GAP_TYPE = "mfg.agent.gap"
DROP_OLDEST_REASON = "buffer_full_drop_oldest"


class Overflow:
    """drop_oldest for one transaction: its staged streams and its pending rows."""

    def __init__(
        self,
        db: sqlite3.Connection,
        settings: Settings,
        state: BufferState,
        delta: Delta,
        staged: dict[str, Staged],
        pending_rows: list[EventRow],
        now: float,
    ) -> None:
        self.db = db
        self.settings = settings
        self.state = state
        self.delta = delta
        self.staged = staged
        self.pending_rows = pending_rows
        self.now = now

    def drop_oldest(self, need: int) -> None:
        """Free at least ``need`` bytes: forwarded rows first, then the oldest unsent events.

        Frees at least 5% of max_bytes at a time, so a full buffer does not drop one event
        per append. Each stream keeps one open mfg.agent.gap event while its sink is down:
        a drop extends that event's range in place (it was never sent, so nobody has seen
        it) instead of appending another, so a long outage cannot fill the buffer with gap
        events, and every range stays exact.
        """
        target = max(need, self.settings.max_bytes // 20)
        before = self.state.room(self.settings, self.delta)
        housekeeping.delete_forwarded(
            self.db, self.settings, self.state, self.delta, None, self.now, True
        )
        if self.state.room(self.settings, self.delta) - before >= need:
            return
        freed = 0
        in_flight = {
            sid: last
            for sid, last in self.db.execute("SELECT sid, MAX(last_seq) FROM batches GROUP BY sid")
        }
        while freed < target:
            oldest = self._oldest_unsent(in_flight)
            if oldest is None:
                break  # only in-flight events and our own rows left: nothing to drop
            sid, first, floor = oldest
            freed += self._drop_run(sid, first, floor, freed, target)

    def _oldest_unsent(self, in_flight: dict[int, int]) -> tuple[int, int, int] | None:
        """(sid, first seq, floor) of the stream whose oldest unsent business event (never
        our own rows, never one in a batch) is the oldest."""
        best: tuple[float, int, int, int] | None = None
        for s in self.state.streams.values():
            floor = max(s.forwarded_seq, in_flight.get(s.sid, 0))
            row = self.db.execute(
                "SELECT committed_at, seq FROM events WHERE sid = ? AND seq > ? "
                "AND ctl = 0 ORDER BY seq LIMIT 1",
                (s.sid, floor),
            ).fetchone()
            if row and (best is None or row[0] < best[0]):
                best = (row[0], s.sid, row[1], floor)
        return None if best is None else best[1:]

    def _drop_run(self, sid: int, first: int, floor: int, freed: int, target: int) -> int:
        """Delete one contiguous run of business events from ``first``; record the gap.
        Returns the room gained (bytes dropped minus what the gap event grew)."""
        db = self.db
        take: list[int] = []
        acc = 0
        for seq, size, is_ctl in db.execute(
            "SELECT seq, size, ctl FROM events WHERE sid = ? AND seq >= ? ORDER BY seq LIMIT 2000",
            (sid, first),
        ):
            # a dropped run is contiguous and holds business events only
            if is_ctl or (take and seq != take[-1] + 1) or (take and freed + acc >= target):
                break
            take.append(seq)
            acc += size
        last = take[-1]
        db.execute("DELETE FROM events WHERE sid = ? AND seq >= ? AND seq <= ?", (sid, first, last))
        stream = self.state.by_sid(sid)
        name = stream.name
        st = self.staged.setdefault(name, Staged(sid, stream.last_seq, stream.checkpoint_seq))
        db.execute(
            "UPDATE streams SET dropped_total = dropped_total + ?, "
            "dropped_bytes = dropped_bytes + ?, stored_bytes = stored_bytes - ? "
            "WHERE sid = ?",
            (len(take), acc, acc, sid),
        )
        self.delta.store(name, -acc)
        grown = self._extend_open_gap(sid, floor, first, last, len(take))
        if grown is None:
            grown = self._append_gap(sid, name, st, first, last, len(take))
        self.delta.store(name, grown)
        log.warning(
            "buffer full: dropped %d oldest events of stream %s (sequences %d-%d, %d bytes); "
            "an mfg.agent.gap event tells the central side",
            len(take),
            name,
            first,
            last,
            acc,
            extra={"stream": name, "first_sequence": first, "last_sequence": last},
        )
        return acc - grown

    def _gap_body(self, name: str, eid: str, seq: int, first: int, last: int, count: int) -> bytes:
        epoch = self.state.epoch
        return envelope.encode(
            NewEvent(
                type=GAP_TYPE,
                subject=name,
                time=envelope.now_rfc3339(),
                data={
                    "streamepoch": epoch,
                    "first_sequence": first,
                    "last_sequence": last,
                    "count": count,
                    "reason": DROP_OLDEST_REASON,
                },
            ),
            id=eid,
            source=envelope.source_uri(self.settings.plant, name),
            seq=seq,
            epoch=epoch,
            plant=self.settings.plant,
            agent_id=self.settings.agent_id,
        )

    def _append_gap(
        self, sid: int, name: str, st: Staged, first: int, last: int, count: int
    ) -> int:
        """A new gap event at the end of the stream; returns its size."""
        seq = st.last_seq + 1
        eid = ulid()
        body = self._gap_body(name, eid, seq, first, last, count)
        self.pending_rows.append((sid, seq, eid, self.now, len(body), body, 1))
        st.last_seq = seq
        self.db.execute(
            "UPDATE streams SET ingested_total = ingested_total + 1, ingested_bytes = "
            "ingested_bytes + ?, stored_bytes = stored_bytes + ? WHERE sid = ?",
            (len(body), len(body), sid),
        )
        return len(body)

    def _newest_gap(
        self, sid: int, floor: int
    ) -> tuple[int, str, bytes, int | None, dict[str, Any]] | None:
        """The newest own row that is a gap event (checkpoints in between are passed over):
        rows of this transaction first, the file only when none of them is one."""
        pending = (
            (r[1], r[2], r[5], i)
            for i, r in reversed(list(enumerate(self.pending_rows)))
            if r[0] == sid and r[6] == 1
        )
        stored = (
            (row[0], row[1], bytes(row[2]), None)
            for row in self.db.execute(
                "SELECT seq, id, body FROM events WHERE sid = ? AND seq > ? AND ctl = 1 "
                "ORDER BY seq DESC LIMIT 100",
                (sid, floor),
            )
        )
        for seq, eid, body, index in itertools.chain(pending, stored):
            ev = orjson.loads(body)
            if ev.get("type") == GAP_TYPE:
                return seq, eid, body, index, ev
        return None

    def _extend_open_gap(
        self, sid: int, floor: int, first: int, last: int, count: int
    ) -> int | None:
        """Widen the stream's newest drop_oldest gap event to cover ``first..last`` when that
        event is still unsent (above ``floor``: in no batch) and nothing but our own rows lie
        between its range and ``first``. Returns the change in its size, or None when there
        is no such event and a new one must be appended.

        The widened range may then hold the gap event's own sequence or a checkpoint's; the
        receiver gets those, so "every sequence in the range that does not arrive was
        dropped, count says how many" stays exact.
        """
        found = self._newest_gap(sid, floor)
        if found is None:
            return None
        seq, eid, body, index, ev = found
        data = ev.get("data") or {}
        if data.get("reason") != DROP_OLDEST_REASON:
            return None
        low = int(data["last_sequence"])  # the open range ends here
        if low < floor or low >= first:
            return None  # events after its range were sent: widening would claim them
        # between the open range and this run only rows that will arrive (our own)
        present = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(ctl = 0), 0) FROM events "
            "WHERE sid = ? AND seq > ? AND seq < ?",
            (sid, low, first),
        ).fetchone()
        pending_between = sum(1 for r in self.pending_rows if r[0] == sid and low < r[1] < first)
        if present[1] or present[0] + pending_between != first - low - 1:
            return None
        new_body = self._gap_body(
            ev["subject"], eid, seq, int(data["first_sequence"]), last, int(data["count"]) + count
        )
        grown = len(new_body) - len(body)
        if index is not None:
            r = self.pending_rows[index]
            self.pending_rows[index] = (r[0], r[1], r[2], r[3], len(new_body), new_body, r[6])
        else:
            self.db.execute(
                "UPDATE events SET body = ?, size = ? WHERE sid = ? AND seq = ?",
                (new_body, len(new_body), sid, seq),
            )
        self.db.execute(
            "UPDATE streams SET ingested_bytes = ingested_bytes + ?, "
            "stored_bytes = stored_bytes + ? WHERE sid = ?",
            (grown, grown, sid),
        )
        return grown

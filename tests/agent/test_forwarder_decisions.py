"""The forwarder's decision table (agent/forwarder.py, docs/contract.md section 3), one
test per row, driven by a scripted Sink over a real Buffer file.

The fake is of OUR Sink interface (agent/interfaces.py), not of a peer: it answers each
batch as the script says and records what it was sent. Every test asserts what an
operator or the central side would observe: the acknowledged cursor, dead-letter rows
and their reasons, the sizes batches were split to, the same batch id on a retry, the
wait before it, an AUTH pause that keeps everything, and the order of delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.buffer import Buffer
from agent.forwarder import ForwarderSettings, StreamForwarder
from agent.interfaces import Batch, ComponentState, NewEvent, Outcome, SendResult, Sink, State

STREAM = "line1"
FAST = ForwarderSettings(
    max_events=1000,
    linger_ms=0,
    backoff_initial=0.01,
    backoff_max=0.05,
    auth_retry_interval=0.5,
    poll_interval=0.05,
)


@dataclass(frozen=True)
class Sent:
    batch_id: str
    first: int
    last: int
    subjects: tuple[str, ...]
    outcome: Outcome
    at: float


class ScriptedSink(Sink):
    """Answers each batch with ``script(batch, attempt)``; ``attempt`` counts the sends
    of that batch id (1 for the first)."""

    def __init__(self, script: Callable[[Batch, int], SendResult], max_in_flight: int = 1) -> None:
        self.name = "scripted"
        self.max_in_flight = max_in_flight
        self.script = script
        self.sent: list[Sent] = []
        self._attempts: dict[str, int] = {}

    async def send(self, batch: Batch) -> SendResult:
        await asyncio.sleep(0)
        n = self._attempts[batch.batch_id] = self._attempts.get(batch.batch_id, 0) + 1
        result = self.script(batch, n)
        subjects = tuple(orjson.loads(b)["subject"] for b in batch.bodies)
        self.sent.append(
            Sent(batch.batch_id, batch.first_sequence, batch.last_sequence, subjects,
                 result.outcome, time.monotonic())
        )  # fmt: skip
        return result

    def state(self) -> ComponentState:
        return ComponentState(State.CONNECTED)

    def delivered(self) -> list[str]:
        return [s for x in self.sent if x.outcome is Outcome.ACCEPTED for s in x.subjects]


def ev(subject: str) -> NewEvent:
    data = {"work_order": "WO-1", "item": "P-1", "good": {"value": 1, "uom": "EA"}}
    return NewEvent("mfg.production.counted", data, "2026-11-23T10:00:00.000Z", subject=subject)


async def until(cond: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Rig:
    def __init__(self, buf: Buffer, sink: ScriptedSink, settings: ForwarderSettings) -> None:
        self.buf = buf
        self.sink = sink
        self.fwd = StreamForwarder(buf, STREAM, sink, settings)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.fwd.run())

    def cursor(self) -> int:
        return self.buf.stream_state(STREAM)[1]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        await self.buf.close()


async def rig(
    tmp_path: Path,
    subjects: list[str],
    script: Callable[[Batch, int], SendResult],
    settings: ForwarderSettings = FAST,
    max_in_flight: int = 1,
) -> Rig:
    buf = await Buffer.open(tmp_path / "b.db", plant="p1", agent_id="a1", durability="os")
    await buf.append(STREAM, [ev(s) for s in subjects])
    return Rig(buf, ScriptedSink(script, max_in_flight), settings)


def names(n: int) -> list[str]:
    return [f"e{i}" for i in range(1, n + 1)]


# ---------------------------------------------------------------------------- ACCEPTED


async def test_accepted_advances_the_cursor_batch_by_batch_in_order(tmp_path: Path) -> None:
    settings = dataclasses.replace(FAST, max_events=4)
    r = await rig(tmp_path, names(10), lambda b, n: SendResult.accepted(200), settings)
    try:
        r.start()
        await until(lambda: r.cursor() == 10)
        assert [(s.first, s.last) for s in r.sink.sent] == [(1, 4), (5, 8), (9, 10)]
        assert r.sink.delivered() == names(10)
        assert len({s.batch_id for s in r.sink.sent}) == 3
        (st,) = await r.buf.stream_stats()
        assert st.forwarded_total == 10 and st.backlog_events == 0 and st.dead_letters == 0
        assert await r.buf.pending_batches(STREAM) == []  # every batch row settled
    finally:
        await r.stop()


# ---------------------------------------------------------------------------- RETRY


async def test_retry_resends_the_same_batch_id_after_backoff_then_advances(
    tmp_path: Path,
) -> None:
    """408/425/429/5xx/network: the same batch (same Idempotency-Key), Retry-After honoured."""

    def script(b: Batch, n: int) -> SendResult:
        if n == 1:
            return SendResult.retry("HTTP 503", 503)
        if n == 2:
            return SendResult.retry("HTTP 429", 429, retry_after=0.3)
        return SendResult.accepted(200)

    r = await rig(tmp_path, names(5), script)
    try:
        r.start()
        await until(lambda: r.cursor() == 5)
        sent = r.sink.sent
        assert [s.outcome for s in sent] == [Outcome.RETRY, Outcome.RETRY, Outcome.ACCEPTED]
        assert len({s.batch_id for s in sent}) == 1  # the same key every time
        assert {(s.first, s.last) for s in sent} == {(1, 5)}
        assert sent[2].at - sent[1].at >= 0.29  # the peer's Retry-After, not the jitter
        assert r.sink.delivered() == names(5)
        assert (await r.buf.stream_stats())[0].dead_letters == 0
    finally:
        await r.stop()


async def test_retry_keeps_the_cursor_and_says_retrying(tmp_path: Path) -> None:
    r = await rig(tmp_path, names(3), lambda b, n: SendResult.retry("connection refused"))
    try:
        r.start()
        await until(lambda: len(r.sink.sent) >= 5)
        assert r.cursor() == 0
        assert r.fwd.status.state == "retrying"
        assert r.fwd.status.last_error == "connection refused"
        assert len({s.batch_id for s in r.sink.sent}) == 1
        gaps = [b.at - a.at for a, b in zip(r.sink.sent, r.sink.sent[1:], strict=False)]
        assert all(g < 5.0 for g in gaps)  # capped (backoff_max 0.05 s, generous bound)
        (st,) = await r.buf.stream_stats()
        assert st.last_error == "connection refused" and st.backlog_events == 3
    finally:
        await r.stop()


# ---------------------------------------------------------------------------- REJECTED


async def test_rejected_bisects_dead_letters_the_bad_event_alone_rest_in_order(
    tmp_path: Path,
) -> None:
    """400/422: split in halves until the refused event is alone; it is dead-lettered with
    the response as reason; the others are delivered in order."""

    def script(b: Batch, n: int) -> SendResult:
        if any(b'"subject":"bad"' in body for body in b.bodies):
            return SendResult.rejected("HTTP 422: data.good.uom missing", 422)
        return SendResult.accepted(200)

    subjects = ["e1", "e2", "e3", "e4", "bad", "e6", "e7", "e8"]
    r = await rig(tmp_path, subjects, script)
    try:
        r.start()
        await until(lambda: r.cursor() == 8)
        assert [(s.first, s.last, s.outcome) for s in r.sink.sent] == [
            (1, 8, Outcome.REJECTED),
            (1, 4, Outcome.ACCEPTED),
            (5, 8, Outcome.REJECTED),
            (5, 6, Outcome.REJECTED),
            (5, 5, Outcome.REJECTED),
            (6, 6, Outcome.ACCEPTED),
            (7, 8, Outcome.ACCEPTED),
        ]
        assert r.sink.delivered() == ["e1", "e2", "e3", "e4", "e6", "e7", "e8"]
        (dl,) = await r.buf.dead_letters(STREAM)
        assert dl.sequence == 5 and dl.status == 422
        assert dl.reason == "HTTP 422: data.good.uom missing"
        assert orjson.loads(dl.body)["subject"] == "bad"
        (st,) = await r.buf.stream_stats()
        assert st.dead_lettered_total == 1 and st.forwarded_total == 7
        assert st.backlog_events == 0
        assert await r.buf.pending_batches(STREAM) == []
    finally:
        await r.stop()


# ---------------------------------------------------------------------------- TOO_LARGE


async def test_too_large_halves_the_batch_size_and_delivers_everything(tmp_path: Path) -> None:
    """413: halve the batch size for this stream; nothing is dead-lettered."""

    def script(b: Batch, n: int) -> SendResult:
        if len(b) > 3:
            return SendResult.too_large("HTTP 413", 413)
        return SendResult.accepted(200)

    r = await rig(tmp_path, names(10), script)
    try:
        r.start()
        await until(lambda: r.cursor() == 10)
        sizes = [(s.last - s.first + 1, s.outcome) for s in r.sink.sent]
        assert sizes[:2] == [(10, Outcome.TOO_LARGE), (5, Outcome.TOO_LARGE)]
        assert {n for n, o in sizes[2:]} == {2} and all(o is Outcome.ACCEPTED for _, o in sizes[2:])
        assert r.fwd.max_events == 2
        assert r.sink.delivered() == names(10)
        assert await r.buf.dead_letters(STREAM) == []
        assert await r.buf.pending_batches(STREAM) == []  # the refused ones were discarded
    finally:
        await r.stop()


async def test_too_large_single_event_is_dead_lettered(tmp_path: Path) -> None:
    """A single event still too large goes to the dead letters; the rest flows on."""

    def script(b: Batch, n: int) -> SendResult:
        if any(b'"subject":"huge"' in body for body in b.bodies):
            return SendResult.too_large("HTTP 413: 2 MiB over the limit", 413)
        return SendResult.accepted(200)

    r = await rig(tmp_path, ["e1", "e2", "huge", "e4"], script)
    try:
        r.start()
        await until(lambda: r.cursor() == 4)
        assert r.sink.delivered() == ["e1", "e2", "e4"]
        (dl,) = await r.buf.dead_letters(STREAM)
        assert dl.sequence == 3 and dl.status == 413
        assert dl.reason == "HTTP 413: 2 MiB over the limit"
        assert r.sink.sent[-2].first == r.sink.sent[-2].last == 3  # alone when refused
    finally:
        await r.stop()


# ---------------------------------------------------------------------------- AUTH


async def test_auth_keeps_everything_pauses_and_says_so_then_resumes(tmp_path: Path) -> None:
    """401/403: nothing is dropped or dead-lettered, the same batch is retried slowly
    (auth_retry_interval), status and the stream's last error say AUTH."""
    allowed = asyncio.Event()

    def script(b: Batch, n: int) -> SendResult:
        if not allowed.is_set():
            return SendResult.auth("HTTP 401: bad token", 401)
        return SendResult.accepted(200)

    r = await rig(tmp_path, names(6), script)
    try:
        r.start()
        await until(lambda: len(r.sink.sent) >= 2)
        assert r.cursor() == 0
        assert r.fwd.status.state == "auth_failed"
        assert r.fwd.status.last_error == "HTTP 401: bad token"
        a, b = r.sink.sent[:2]
        assert a.batch_id == b.batch_id and (a.first, a.last) == (1, 6)
        assert b.at - a.at >= 0.45  # the slow auth interval, not the fast backoff
        (st,) = await r.buf.stream_stats()
        assert st.last_error == "AUTH: HTTP 401: bad token"
        assert st.backlog_events == 6 and st.dead_letters == 0
        allowed.set()  # credentials fixed
        await until(lambda: r.cursor() == 6)
        assert r.sink.delivered() == names(6)
        assert len({s.batch_id for s in r.sink.sent}) == 1
        await until(lambda: r.fwd.status.state in ("sending", "idle"))
        assert r.fwd.status.last_error is None
    finally:
        await r.stop()


# ---------------------------------------------------------------------------- ordering


class GatedSink(ScriptedSink):
    """A ScriptedSink whose send of the first batch waits for ``gate``: the head stays on
    the wire while the later sends are answered. Records sends that were cancelled."""

    def __init__(self, script: Callable[[Batch, int], SendResult], max_in_flight: int) -> None:
        super().__init__(script, max_in_flight)
        self.gate = asyncio.Event()
        self.started: list[int] = []
        self.cancelled: list[int] = []

    async def send(self, batch: Batch) -> SendResult:
        self.started.append(batch.first_sequence)
        try:
            if batch.first_sequence == 1:
                await self.gate.wait()
            return await super().send(batch)
        except asyncio.CancelledError:
            self.cancelled.append(batch.first_sequence)
            raise


async def test_a_later_send_that_raises_cancels_nothing_and_is_raised_unwrapped(
    tmp_path: Path, caplog: Any
) -> None:
    """A send that raises while the head is still on the wire does not cancel the head (it
    is acknowledged); when that batch becomes the head its exception reaches the run loop
    as itself (not a task group's wrapper), which logs, restarts, and delivers it."""
    settings = dataclasses.replace(FAST, max_events=2)

    def script(b: Batch, n: int) -> SendResult:
        if b.first_sequence == 3 and n == 1:
            raise RuntimeError("boom")
        return SendResult.accepted(200)

    buf = await Buffer.open(tmp_path / "b.db", plant="p1", agent_id="a1", durability="os")
    await buf.append(STREAM, [ev(s) for s in names(6)])
    sink = GatedSink(script, max_in_flight=3)
    r = Rig(buf, sink, settings)
    try:
        r.start()
        await until(lambda: any(x.first == 5 for x in sink.sent))  # 3-4 raised meanwhile
        assert r.cursor() == 0 and sink.cancelled == []
        sink.gate.set()
        await until(lambda: r.fwd.status.last_error == "internal error: boom")
        assert r.cursor() == 2  # the head was acknowledged; nothing passed the failed batch
        assert sink.cancelled == []
        failed = [x for x in caplog.records if "forwarder for stream" in x.getMessage()]
        assert failed and failed[0].exc_info is not None
        assert failed[0].exc_info[0] is RuntimeError  # unwrapped
        await until(lambda: r.cursor() == 6, within=60)  # the restart (5 s) delivers the rest
        assert sorted(set(sink.delivered())) == names(6)
        # 5-6 was answered while 3-4 failed, never acknowledged past it: sent again after
        # the restart, under its own batch id
        ids = [x.batch_id for x in sink.sent if x.first == 5]
        assert len(ids) == 2 and len(set(ids)) == 1
    finally:
        await r.stop()


async def test_stop_cancels_every_send_in_flight(tmp_path: Path) -> None:
    settings = dataclasses.replace(FAST, max_events=2)

    def hold(b: Batch, n: int) -> SendResult:
        return SendResult.accepted(200)

    buf = await Buffer.open(tmp_path / "b.db", plant="p1", agent_id="a1", durability="os")
    await buf.append(STREAM, [ev(s) for s in names(6)])
    sink = GatedSink(hold, max_in_flight=3)
    sink.gate = asyncio.Event()  # never set: the head stays on the wire
    r = Rig(buf, sink, settings)
    r.start()
    await until(lambda: len(sink.started) == 3)
    await r.stop()
    assert sink.cancelled == [1]  # the later two were answered, the head was cancelled
    assert r.task is not None and r.task.cancelled()


async def test_pipelined_batches_settle_in_order_after_a_retry(tmp_path: Path) -> None:
    """With batches in flight (max_in_flight), a RETRY of the head resends it and then the
    later ones, in order, under their own ids; the cursor never passes an unsent batch."""
    settings = dataclasses.replace(FAST, max_events=2)
    cursor_seen: list[int] = []
    rig_ref: list[Rig] = []

    def script(b: Batch, n: int) -> SendResult:
        cursor_seen.append(rig_ref[0].cursor())
        if b.first_sequence == 3 and n == 1:
            return SendResult.retry("HTTP 500", 500)
        return SendResult.accepted(200)

    r = await rig(tmp_path, names(8), script, settings, max_in_flight=3)
    rig_ref.append(r)
    try:
        r.start()
        await until(lambda: r.cursor() == 8)
        ids: dict[tuple[int, int], set[str]] = {}
        for x in r.sink.sent:
            ids.setdefault((x.first, x.last), set()).add(x.batch_id)
        assert sorted(ids) == [(1, 2), (3, 4), (5, 6), (7, 8)]
        assert all(len(v) == 1 for v in ids.values())  # a resend keeps its batch id
        assert [x.outcome for x in r.sink.sent].count(Outcome.RETRY) == 1
        # batches on the wire with the head were answered but not acknowledged past it:
        # after the head's resend, each later one goes again, in order
        last = [(x.first, x.last, x.outcome) for x in r.sink.sent[-3:]]
        assert last == [(f, f + 1, Outcome.ACCEPTED) for f in (3, 5, 7)]
        assert cursor_seen == sorted(cursor_seen)  # the cursor only moves forward
    finally:
        await r.stop()


# ---------------------------------------------------------------------------- read-ahead


class ReadAheadSink(ScriptedSink):
    """One batch on the wire (max_in_flight 1) and one read ahead: records what was
    prepared, what was on the wire at that moment, and how many sends overlapped."""

    read_ahead = 1

    def __init__(self, script: Callable[[Batch, int], SendResult]) -> None:
        super().__init__(script, max_in_flight=1)
        self.prepared: list[tuple[int, int | None]] = []  # (first seq, first seq on the wire)
        self.on_wire: int | None = None
        self.overlaps = 0
        self.release = asyncio.Event()
        self.release.set()

    async def prepare(self, batch: Batch) -> None:
        self.prepared.append((batch.first_sequence, self.on_wire))

    async def send(self, batch: Batch) -> SendResult:
        if self.on_wire is not None:
            self.overlaps += 1
        self.on_wire = batch.first_sequence
        try:
            await self.release.wait()
            return await super().send(batch)
        finally:
            self.on_wire = None


async def test_read_ahead_prepares_the_next_batch_while_one_is_on_the_wire(
    tmp_path: Path,
) -> None:
    """A sink with read_ahead = 1 gets the next batch prepared while the current one is
    still on the wire, but never two sends at once, and the order is the buffer's."""
    settings = dataclasses.replace(FAST, max_events=2)
    r = await rig(tmp_path, names(8), lambda b, n: SendResult.accepted(200), settings)
    sink = ReadAheadSink(r.sink.script)
    r.sink = sink
    r.fwd.sink = sink
    sink.release.clear()  # the first batch stays on the wire
    try:
        r.start()
        await until(lambda: len(sink.prepared) >= 2)
        await asyncio.sleep(0.1)
        assert sink.prepared[1] == (3, 1)  # batch 3-4 prepared while 1-2 was on the wire
        assert [x.first for x in sink.sent] == []  # and not sent before 1-2 was answered
        sink.release.set()
        await until(lambda: r.cursor() == 8)
        assert sink.overlaps == 0
        assert [(x.first, x.last) for x in sink.sent] == [(1, 2), (3, 4), (5, 6), (7, 8)]
        assert sink.delivered() == names(8)
    finally:
        await r.stop()


async def test_read_ahead_batch_waits_for_a_retried_head_and_keeps_its_id(
    tmp_path: Path,
) -> None:
    """The batch read ahead is not sent while the head is retried; after the head is
    accepted everything follows in order, each batch under one id."""
    settings = dataclasses.replace(FAST, max_events=2)

    def script(b: Batch, n: int) -> SendResult:
        if b.first_sequence == 1 and n <= 2:
            return SendResult.retry("HTTP 503", 503)
        return SendResult.accepted(200)

    r = await rig(tmp_path, names(6), script, settings)
    sink = ReadAheadSink(script)
    r.sink = sink
    r.fwd.sink = sink
    try:
        r.start()
        await until(lambda: r.cursor() == 6)
        firsts = [(x.first, x.outcome) for x in sink.sent]
        assert firsts[:3] == [(1, Outcome.RETRY), (1, Outcome.RETRY), (1, Outcome.ACCEPTED)]
        assert [f for f, o in firsts if o is Outcome.ACCEPTED] == [1, 3, 5]
        assert len({x.batch_id for x in sink.sent if x.first == 1}) == 1
        assert sink.overlaps == 0
    finally:
        await r.stop()

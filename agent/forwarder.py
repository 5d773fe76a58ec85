"""Per-stream forwarding: batching, ordering, retry, bisection, dead letters, replays.

One StreamForwarder per stream, all of them independent, so a stuck stream never stalls
the others. Within a stream the order is strict: a batch is acknowledged in the buffer
only after every batch before it, and the cursor moves only on ACCEPTED.

What the sink answers decides what happens (the contract's table):

    ACCEPTED   advance the cursor; next batch
    RETRY      same batch, same batch id, after capped exponential backoff with full jitter
               (or the Retry-After the peer asked for)
    REJECTED   bisect until the refused event is alone; dead-letter it; the rest flows on
    TOO_LARGE  halve the batch size for this stream (a single event that is too large is
               dead-lettered)
    AUTH       keep everything, retry slowly, say so loudly in logs and status
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.ids import ulid
from agent.interfaces import Batch, BatchStore, ComponentState, Outcome, SendResult, Sink, State
from agent.outage import SinkOutage, SinkOutages
from agent.tasks import Captured, captured

log = logging.getLogger("edge_agent.forwarder")

#: callback(stream, sink_name, seconds, events, outcome) for metrics
ResultObserver = Callable[[str, str, float, int, str], None]

#: a batch the pipeline holds: its send task and the event that lets it leave
_InHand = tuple[Batch, "asyncio.Task[Captured[tuple[SendResult, float]]]", asyncio.Event]


@dataclass(frozen=True, slots=True)
class ForwarderSettings:
    max_events: int = 1000
    max_bytes: int = 1 << 20
    linger_ms: int = 5  # agent/config.py says why
    backoff_initial: float = 0.5
    backoff_max: float = 15.0
    auth_retry_interval: float = 60.0
    #: how often to look for operator requests (dead-letter retry, replay)
    poll_interval: float = 2.0


class PriorityGate:
    """After an outage, high-priority streams drain first.

    A normal stream waits while some high-priority stream is busy draining successfully.
    A high-priority stream that is failing does not hold the others back.
    """

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._cond = asyncio.Condition()

    async def set_busy(self, stream: str, busy: bool) -> None:
        if busy == (stream in self._busy):
            return
        async with self._cond:
            if busy:
                self._busy.add(stream)
            else:
                self._busy.discard(stream)
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """Some high-priority stream is draining."""
        return bool(self._busy)

    async def wait_turn(self) -> None:
        if not self._busy:
            return
        async with self._cond:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._cond.wait_for(lambda: not self._busy)


class StreamForwarder:
    def __init__(
        self,
        buffer: BatchStore,
        stream: str,
        sink: Sink,
        settings: ForwarderSettings,
        *,
        priority: str = "normal",
        gate: PriorityGate | None = None,
        observe: ResultObserver | None = None,
        outages: SinkOutages | None = None,
    ) -> None:
        self.buffer = buffer
        self.stream = stream
        self.sink = sink
        self.settings = settings
        self.priority = priority
        self.gate = gate
        self.observe = observe
        self.max_events = settings.max_events
        self.max_bytes = settings.max_bytes
        self.status = ComponentState(state=State.IDLE, since=time.time())
        self._attempt = 0
        self._last_poll = 0.0
        #: the sink's outage, shared with the other streams to the same sink: a few log
        #: lines per outage instead of one per retry (agent/outage.py)
        self.outage: SinkOutage = (outages or SinkOutages()).get(sink.name)

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Forward until cancelled. An unexpected error is logged and the loop restarts."""
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a database error: never give up on a stream
                log.exception("forwarder for stream %s failed; restarting in 5 s", self.stream)
                self._set_state("error", f"internal error: {exc}")
                await asyncio.sleep(5)

    async def _run(self) -> None:
        for batch in await self.buffer.pending_batches(self.stream):
            log.info(
                "resending batch %s of stream %s (sequences %d-%d) persisted before a restart",
                batch.batch_id,
                self.stream,
                batch.first_sequence,
                batch.last_sequence,
                extra=self._extra(batch),
            )
            await self._deliver(batch)
        wakeup = self.buffer.wakeup_event(self.stream)
        window = max(1, int(getattr(self.sink, "max_in_flight", 1)))
        ahead = max(0, int(getattr(self.sink, "read_ahead", 0)))
        # Events in flight are never dropped under drop_oldest, so all batches taken
        # together stay within a tenth of the buffer: there is always something to drop.
        self.max_bytes = max(
            1024, min(self.settings.max_bytes, self.buffer.max_bytes // (10 * (window + ahead)))
        )
        while True:
            await self._operator_requests()
            if self.priority != "high" and self.gate is not None:
                await self.gate.wait_turn()
            wakeup.clear()
            last, forwarded = self.buffer.stream_state(self.stream)
            if 0 < last - forwarded < self.max_events and self.settings.linger_ms > 0:
                # Let a few more arrive so an idle-but-steady stream still makes real batches.
                await asyncio.sleep(self.settings.linger_ms / 1000)
            first = await self.buffer.take_batch(
                self.stream, 0, self.max_events, self.max_bytes, self.priority
            )
            if first is None:
                await self._mark_busy(False)
                self._set_state("idle")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.poll_interval):
                        await wakeup.wait()
                continue
            await self._mark_busy(True)
            if window == 1 and ahead == 0:
                await self._deliver(first)
            else:
                await self._pipeline(first, window, ahead)

    async def _pipeline(self, first: Batch, window: int, ahead: int = 0) -> None:
        """Keep up to ``window`` batches on the wire and ``ahead`` more taken and prepared
        behind them; apply acknowledgements in order only.

        The sends are tasks of one TaskGroup that ends with this call, so none outlives
        it (a stop cancels them). Each send keeps its own outcome (agent/tasks.captured):
        a later send that fails cancels nothing; the head's exception is raised here,
        unwrapped, as a send outside a pipeline would raise it."""
        inflight: collections.deque[_InHand] = collections.deque()
        failure: Exception | None = None
        settle: tuple[Batch, SendResult, list[Batch]] | None = None
        async with asyncio.TaskGroup() as tg:
            try:
                settle = await self._keep_window(tg, inflight, first, window, ahead)
            except Exception as exc:  # noqa: BLE001 - raised again below, unwrapped
                failure = exc
            finally:  # on failure or cancellation: nothing this pipeline sent outlives it
                for _, t, _ in inflight:
                    t.cancel()
        if failure is not None:
            raise failure
        if settle is None:
            return
        # Something went wrong: settle the rest one by one, in order, same batch ids.
        head, result, rest = settle
        settled = await self._deliver(head, first_result=result)
        for b in rest:
            if settled:
                settled = await self._deliver(b)
            else:  # head was re-formed smaller: later batches must not overtake it
                await self.buffer.discard_batch(b)

    async def _keep_window(
        self,
        tg: asyncio.TaskGroup,
        inflight: collections.deque[_InHand],
        first: Batch,
        window: int,
        ahead: int,
    ) -> tuple[Batch, SendResult, list[Batch]] | None:
        """Send and acknowledge in order until the buffer has nothing more (None) or a
        head is not accepted: then every later send is awaited and (head, its result,
        the later batches) returned to be settled one by one.

        Each taken batch is a task that prepares it (Sink.prepare) and then waits for its
        turn: the first ``window`` of the deque have it, the next gets it the moment the
        head is accepted, before the head's ack is written. Batches are taken in groups
        (one transaction and one fsync for all of them: Buffer.take_batches) once half the
        slots are free, and the take runs while heads are acknowledged and sends go on:
        awaited inline it left the wire idle for its whole length (py-spy: the event loop
        and the writer thread each idle a fifth of an MQTT drain)."""
        slots = window + ahead
        refill = max(1, slots // 2)
        after = first.last_sequence
        taking: asyncio.Task[list[Batch]] | None = None
        exhausted = False  # the last take found less than it asked for

        def launch(batch: Batch) -> None:
            turn = asyncio.Event()
            if len(inflight) < window:
                turn.set()
            task = tg.create_task(
                captured(self._send_in_turn, batch, turn), name=f"send:{batch.batch_id}"
            )
            inflight.append((batch, task, turn))

        def take(count: int) -> asyncio.Task[list[Batch]]:
            return tg.create_task(
                self.buffer.take_batches(
                    self.stream, after, self.max_events, self.max_bytes, count, self.priority
                ),
                name=f"take:{self.stream}",
            )

        async def taken() -> list[Batch]:
            """The batches of the take under way (none if none): made durable already, so
            each is launched, dropped with discard_batch, or settled, never forgotten."""
            nonlocal taking, exhausted
            if taking is None:
                return []
            t, taking = taking, None
            got = await t
            exhausted = not got
            return got

        launch(first)
        try:
            while inflight or taking is not None:
                free = slots - len(inflight)
                if taking is None and not exhausted and free >= refill and not self._yields():
                    taking = take(free)
                if not inflight:  # everything acknowledged: wait for what the take finds
                    for b in await taken():
                        launch(b)
                        after = b.last_sequence
                    continue
                head, task, _ = inflight[0]
                if taking is not None and not task.done():
                    await asyncio.wait({task, taking}, return_when=asyncio.FIRST_COMPLETED)
                    if taking.done():
                        for b in await taken():
                            launch(b)
                            after = b.last_sequence
                        continue
                inflight.popleft()
                result, seconds = (await task).get()
                self._observe(head, result, seconds)
                exhausted = False  # room again: look once more
                if result.outcome is Outcome.ACCEPTED:
                    # the heads behind it that are answered and accepted too: one ack for
                    # all of them (PUBACKs arrive together)
                    accepted = [(head, result)]
                    while inflight and inflight[0][1].done():
                        got = inflight[0][1].result()
                        if got.error is not None or got.value is None:
                            break
                        nxt_result, nxt_seconds = got.value
                        if nxt_result.outcome is not Outcome.ACCEPTED:
                            break
                        nxt = inflight.popleft()[0]
                        self._observe(nxt, nxt_result, nxt_seconds)
                        accepted.append((nxt, nxt_result))
                    if self._yields():  # a high-priority stream drains: hand back unsent
                        for b in await taken():
                            await self.buffer.discard_batch(b)
                        await self._drop_unsent(inflight)
                        # the next take starts after what is still held, not the dropped
                        last = accepted[-1][0]
                        after = inflight[-1][0].last_sequence if inflight else last.last_sequence
                    else:
                        for _, _, turn in list(inflight)[:window]:
                            turn.set()
                    await self._accepted_all(accepted)
                    continue
                rest = [b for b, _, _ in inflight] + await taken()
                for _, t, turn in inflight:
                    if not turn.is_set():  # never sent: nothing to wait for
                        t.cancel()
                    await asyncio.wait([t])  # a sent one's outcome is kept, not raised
                inflight.clear()
                return head, result, rest
            return None
        finally:
            if taking is not None:  # cancelled or failed meanwhile: the take is a writer job
                taking.cancel()  # that runs to its end; its batch rows stay for a restart

    def _yields(self) -> bool:
        """A normal stream takes nothing more while a high-priority one drains (the main
        loop then waits its turn at the gate)."""
        return self.priority != "high" and self.gate is not None and self.gate.busy

    async def _drop_unsent(self, inflight: collections.deque[_InHand]) -> None:
        """Forget the batches taken but not yet sent (the tail of the deque): their rows go,
        and they are taken again, under new ids, when it is this stream's turn."""
        while inflight and not inflight[-1][2].is_set():
            batch, task, _ = inflight.pop()
            task.cancel()
            await asyncio.wait([task])
            await self.buffer.discard_batch(batch)

    async def _send_in_turn(self, batch: Batch, turn: asyncio.Event) -> tuple[SendResult, float]:
        await self.sink.prepare(batch)
        await turn.wait()
        return await self._timed_send(batch)

    # ------------------------------------------------------------------ one batch

    async def _timed_send(self, batch: Batch) -> tuple[SendResult, float]:
        t0 = time.perf_counter()
        result = await self.sink.send(batch)
        return result, time.perf_counter() - t0

    async def _deliver(self, batch: Batch, first_result: SendResult | None = None) -> bool:
        """Send ``batch`` until it is accepted or dead-lettered (True), or discarded to be
        re-formed smaller (False: nothing after it may be sent before it)."""
        result = first_result
        while True:
            if result is None:
                result, seconds = await self._timed_send(batch)
                self._observe(batch, result, seconds)
            outcome = result.outcome
            if outcome is Outcome.ACCEPTED:
                await self._accepted(batch, result)
                return True
            if outcome is Outcome.RETRY:
                delay = self._backoff(result.retry_after)
                self._set_state("retrying", result.reason)
                log.debug(
                    "stream %s: batch %s (sequences %d-%d) not delivered: %s; retry %d in %.1f s",
                    self.stream,
                    batch.batch_id,
                    batch.first_sequence,
                    batch.last_sequence,
                    result.reason,
                    self._attempt,
                    delay,
                    extra=self._extra(batch),
                )
                await self.outage.failed(
                    self.stream,
                    result.reason,
                    retry_in=delay,
                    extra=self._extra(batch),
                    figures=self._figures,
                )
                await self._note_error(result.reason)
                await asyncio.sleep(delay)
            elif outcome is Outcome.AUTH:
                self._set_state("auth_failed", result.reason)
                await self.outage.failed(
                    self.stream,
                    result.reason,
                    auth=True,
                    retry_in=self.settings.auth_retry_interval,
                    extra=self._extra(batch),
                    figures=self._figures,
                )
                await self._note_error(f"AUTH: {result.reason}")
                await self._mark_busy(False)
                await asyncio.sleep(self.settings.auth_retry_interval)
            elif outcome is Outcome.TOO_LARGE:
                if len(batch) == 1:
                    await self._dead_letter(batch, result)
                    return True
                self.max_events = max(1, len(batch) // 2)
                log.warning(
                    "stream %s: batch %s of %d events is too large (%s); batch size now %d",
                    self.stream,
                    batch.batch_id,
                    len(batch),
                    result.reason,
                    self.max_events,
                    extra=self._extra(batch),
                )
                await self.buffer.discard_batch(batch)
                return False  # the main loop re-reads from the cursor with the smaller size
            elif outcome is Outcome.REJECTED:
                if len(batch) == 1:
                    await self._dead_letter(batch, result)
                    return True
                return await self._bisect(batch, result)
            result = None

    async def _bisect(self, batch: Batch, result: SendResult) -> bool:
        log.warning(
            "stream %s: batch %s (sequences %d-%d) rejected (%s); bisecting to find the bad events",
            self.stream,
            batch.batch_id,
            batch.first_sequence,
            batch.last_sequence,
            result.reason,
            extra=self._extra(batch),
        )
        for sub in await self.buffer.split_batch(batch):
            if not await self._deliver(sub):
                return False
        return True

    async def _dead_letter(self, batch: Batch, result: SendResult) -> None:
        reason = result.reason or result.outcome.value
        await self.buffer.dead_letter(batch, reason, result.status)
        log.error(
            "stream %s: event %s (sequence %d) refused by the central side and moved to the "
            "dead-letter table: %s (see: edge-agent dead-letter list)",
            self.stream,
            batch.ids[0],
            batch.first_sequence,
            reason,
            extra=self._extra(batch),
        )

    async def _accepted_all(self, accepted: list[tuple[Batch, SendResult]]) -> None:
        if len(accepted) == 1:
            await self._accepted(*accepted[0])
            return
        await self.buffer.ack_many([b for b, _ in accepted])
        for batch, result in accepted:
            await self._after_ack(batch, result)

    async def _accepted(self, batch: Batch, result: SendResult) -> None:
        await self.buffer.ack(batch)
        await self._after_ack(batch, result)

    async def _after_ack(self, batch: Batch, result: SendResult) -> None:
        if self._attempt or self.status.state not in ("sending", "idle"):
            log.debug("stream %s: delivering again after %d retries", self.stream, self._attempt)
        await self.outage.delivered(self.stream, figures=self._figures)
        self._attempt = 0
        self._set_state("sending")
        log.debug(
            "stream %s: batch %s delivered (sequences %d-%d, %d events)",
            self.stream,
            batch.batch_id,
            batch.first_sequence,
            batch.last_sequence,
            len(batch),
            extra=self._extra(batch),
        )

    # ------------------------------------------------------------------ operator requests

    async def _operator_requests(self) -> None:
        now = time.monotonic()
        if now - self._last_poll < self.settings.poll_interval:
            return
        self._last_poll = now
        for dl in await self.buffer.retry_requested(self.stream):
            batch = Batch(
                self.stream, ulid(), self.buffer.epoch, dl.sequence, dl.sequence, [dl.id], [dl.body]
            )
            result, seconds = await self._timed_send(batch)
            self._observe(batch, result, seconds)
            ok = result.outcome is Outcome.ACCEPTED
            await self.buffer.resolve_dead_letter(
                self.stream, dl.sequence, delivered=ok, reason=result.reason or result.outcome.value
            )
            log.info(
                "stream %s: dead letter %s retried: %s",
                self.stream,
                dl.id,
                "delivered" if ok else f"refused again ({result.reason})",
                extra=self._extra(batch),
            )
        for replay_id, from_seq, to_seq in await self.buffer.pending_replays(self.stream):
            await self._replay(replay_id, from_seq, to_seq)

    async def _replay(self, replay_id: int, from_seq: int, to_seq: int) -> None:
        after = from_seq - 1
        while True:
            rows = await self.buffer.read_range(self.stream, after, to_seq, self.max_events)
            if not rows:
                await self.buffer.finish_replay(replay_id)
                log.info(
                    "stream %s: replay %d done (up to sequence %d)", self.stream, replay_id, to_seq
                )
                return
            # contiguous runs only, like any batch
            run = [rows[0]]
            for r in rows[1:]:
                if r[0] != run[-1][0] + 1:
                    break
                run.append(r)
            batch = Batch(
                self.stream, ulid(), self.buffer.epoch, run[0][0], run[-1][0],
                [r[1] for r in run], [r[2] for r in run], self.priority,
            )  # fmt: skip
            result, seconds = await self._timed_send(batch)
            self._observe(batch, result, seconds)
            if result.outcome in (Outcome.RETRY, Outcome.AUTH):
                await asyncio.sleep(self._backoff(result.retry_after))
                continue
            if result.outcome is not Outcome.ACCEPTED:
                log.error(
                    "stream %s: replayed batch %s (sequences %d-%d) refused: %s; skipped",
                    self.stream, batch.batch_id, batch.first_sequence, batch.last_sequence,
                    result.reason, extra=self._extra(batch),
                )  # fmt: skip
            after = run[-1][0]
            await self.buffer.finish_replay(replay_id, progressed_to=after + 1)

    # ------------------------------------------------------------------ helpers

    def _backoff(self, retry_after: float | None) -> float:
        self._attempt += 1
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, 3600.0)
        cap = min(
            self.settings.backoff_max, self.settings.backoff_initial * (2 ** min(self._attempt, 30))
        )
        return random.uniform(0, cap)  # full jitter  # noqa: S311

    async def _figures(self, streams: set[str]) -> tuple[int, float | None]:
        """Backlog and oldest unsent age of ``streams``, for an outage summary (a minute
        apart at most, so one read of the streams table is cheap)."""
        rows = await self.buffer.stream_stats()
        now = time.time()
        mine = [r for r in rows if r.name in streams]
        oldest = [r.oldest_unsent_at for r in mine if r.oldest_unsent_at]
        return (
            sum(r.backlog_events for r in mine),
            now - min(oldest) if oldest else None,
        )

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.status.change(state, error)

    async def _note_error(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.buffer.set_last_error(self.stream, reason)

    async def _mark_busy(self, busy: bool) -> None:
        if self.priority == "high" and self.gate is not None:
            await self.gate.set_busy(self.stream, busy)

    def _observe(self, batch: Batch, result: SendResult, seconds: float) -> None:
        if self.observe is not None:
            with contextlib.suppress(Exception):
                self.observe(self.stream, self.sink.name, seconds, len(batch), result.outcome.value)

    def _extra(self, batch: Batch) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "batch_id": batch.batch_id,
            "first_sequence": batch.first_sequence,
            "last_sequence": batch.last_sequence,
            "sink": self.sink.name,
        }

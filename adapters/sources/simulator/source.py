"""A simulated production line: machine states, counts, material, the odd quality hold.

It exists so that a newcomer sees events flow without hardware (``edge-agent demo``), and
so tests and benchmarks have a source with a known rate and a known count. Events are
committed in groups per tick, like a real source under load.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from adapters.sources.simulator.config import SimulatorConfig
from agent.errors import BufferFull
from agent.event import now_rfc3339
from agent.interfaces import ComponentState, Ingest, NewEvent, Source

log = logging.getLogger("edge_agent.sources.simulator")

STATES = ["running", "idle", "down", "setup"]
TICK = 0.05  # seconds: events of a tick share one append (one commit)


class SimulatorSource(Source):
    def __init__(self, name: str, stream: str, config: SimulatorConfig) -> None:
        self.name = name
        self.stream = stream
        self.config = config
        self._rng = random.Random(config.seed)
        self._state = ComponentState(state="starting", since=time.time())
        self._machine_state = "running"
        self._good = 0
        self._emitted = 0
        self._pad = "x" * config.payload_bytes if config.payload_bytes else None
        self._hold_open = False

    def state(self) -> ComponentState:
        self._state.detail = {"emitted": self._emitted, "machine_state": self._machine_state}
        return self._state

    async def run(self, ingest: Ingest) -> None:
        c = self.config
        self._state.state, self._state.since = "connected", time.time()
        due = 0.0
        last = time.monotonic()
        pending: list[NewEvent] = []
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            due += (now - last) * c.rate
            last = now
            n = int(due)
            if c.limit:
                n = min(n, c.limit - self._emitted - len(pending))
            due -= int(due)
            pending.extend(self._next() for _ in range(max(0, n)))
            if not pending:
                if c.limit and self._emitted >= c.limit:
                    self._state.change("finished")
                    await asyncio.Event().wait()  # done: idle until cancelled
                continue
            try:
                await ingest.append(self.stream, pending)
            except BufferFull as exc:
                # A simulated machine cannot be held back: it keeps producing, and what
                # does not fit is counted as lost at the source, like a real sensor.
                self._state.note_error(str(exc))
                log.warning("simulator %s: %s", self.name, exc)
                await asyncio.sleep(0.5)
                continue
            self._emitted += len(pending)
            pending = []

    def _base(self) -> dict[str, Any]:
        return {"line": self.config.line, "machine": self.config.machine}

    def _next(self) -> NewEvent:
        c = self.config
        r = self._rng.random()
        now = now_rfc3339()
        if r < 0.05:
            prev = self._machine_state
            self._machine_state = self._rng.choice([s for s in STATES if s != prev])
            data: dict[str, Any] = {
                **self._base(),
                "state": self._machine_state,
                "previous_state": prev,
            }
            if self._machine_state == "down":
                data["reason_code"] = self._rng.choice(["M-104", "M-221", "E-017"])
            ev = NewEvent("mfg.machine.state_changed", data, now, subject=c.machine)
        elif r < 0.20:
            data = {
                **self._base(),
                "work_order": c.work_order,
                "component_item": "STEEL-COIL-2MM",
                "lot": "L-2211",
                "quantity": {"value": round(self._rng.uniform(0.5, 2.5), 3), "uom": "KGM"},
            }
            ev = NewEvent(
                "mfg.material.consumed", data, now, subject=c.work_order, correlationid=c.work_order
            )
        elif r < 0.21:
            self._hold_open = not self._hold_open
            kind = "mfg.quality.hold_placed" if self._hold_open else "mfg.quality.hold_released"
            data = {**self._base(), "item": c.item, "lot": "L-2211", "location": "QA-CAGE"}
            data["reason"] = "burr on edge, inspect" if self._hold_open else "inspected, use as is"
            ev = NewEvent(kind, data, now, subject=c.item, correlationid=c.work_order)
        else:
            self._good += 1
            data = {
                **self._base(),
                "work_order": c.work_order,
                "item": c.item,
                "good": {"value": 1, "uom": "EA"},
                "scrap": {"value": 1 if self._rng.random() < 0.02 else 0, "uom": "EA"},
            }
            ev = NewEvent(
                "mfg.production.counted",
                data,
                now,
                subject=c.work_order,
                correlationid=c.work_order,
            )
        if self._pad is not None:
            ev.data["attributes"] = {"pad": self._pad}  # type: ignore[index]
        return ev

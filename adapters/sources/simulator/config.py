"""Config of the simulated production line (the demo's source, also used by tests)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.config import SourceConfig


class SimulatorConfig(SourceConfig):
    type: Literal["simulator"] = "simulator"
    #: events per second across all event kinds
    rate: float = Field(default=5.0, gt=0, le=200_000)
    line: str = "line-1"
    machine: str = "press-01"
    work_order: str = "WO-4711"
    item: str = "PART-100"
    #: random seed, for runs that must repeat
    seed: int | None = None
    #: stop after this many events (0 = never): tests and benchmarks use it
    limit: int = Field(default=0, ge=0)
    #: pad each event's data to about this many bytes (benchmarks)
    payload_bytes: int = Field(default=0, ge=0, le=65536)

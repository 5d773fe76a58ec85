"""Garbage-collector settings of the agent process (``edge-agent run``), set once at start.

The ingest hot path allocates several container objects per event (the source's data
dict, the NewEvent, the row tuple, the Committed), nearly all short-lived and acyclic, so
reference counting frees them; the cyclic collector only has to look at them. With
CPython's default gen-0 threshold (700 allocations) it runs every ~100 events and walks
every young object each time. Measured in one process (``python -m bench.opcua_path``,
10,000 OPC UA items a tick): the collector took 1.2 s of 5.7 s of CPU by default and 0.3 s
with a gen-0 threshold of 20,000 (issue 14's profile); in the buffer's SQL thread alone
(py-spy, 10,000-event appends) it was 12% of the group commit by default.

* ``gc.freeze()`` after start-up moves everything alive then (modules, config, adapters'
  tables) into the permanent generation: never scanned again by any collection, and the
  objects' pages are not dirtied by it;
* gen 0 at ``GEN0_THRESHOLD``: a young collection every 20,000 allocations. Garbage in
  cycles lives a little longer (at most that many objects before a collection), which the
  agent's memory bound (docs/performance.md) does not notice. Generations 1 and 2 keep
  their default ratios.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000


def tune_for_ingest() -> None:
    """Freeze what start-up made and raise the gen-0 threshold. Idempotent."""
    gc.collect()  # start-up's garbage goes, not into the permanent generation
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)

"""edge-agent run's garbage-collector settings (agent/gc_tuning.py)."""

from __future__ import annotations

import gc

from agent.gc_tuning import GEN0_THRESHOLD, tune_for_ingest


def test_tune_for_ingest_freezes_start_up_and_raises_gen0_only() -> None:
    before = gc.get_threshold()
    try:
        keep = [[i] for i in range(100)]  # alive at "start-up"
        tune_for_ingest()
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() >= len(keep)
        tune_for_ingest()  # idempotent
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

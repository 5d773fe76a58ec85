"""Figure (issue 14): how many OPC UA items at 1 Hz the opcua source keeps up with on ONE
core. Recorded PublishResponses fed at 1 Hz ticks in a process pinned with taskset (the
asyncua server cannot produce that many changes on a 2-core machine): bench/opcua_path.py
``--ceiling`` says how, and what "keeps up" means."""

from __future__ import annotations

import os
from typing import Any

from bench.common import Ctx, figure
from bench.opcua_path import CEILING_NS as SWEEP
from bench.opcua_path import ceiling


def run(ctx: Ctx) -> dict[str, Any]:
    core = max(os.sched_getaffinity(0))  # the last CPU; the rest of the machine elsewhere
    res = ceiling(SWEEP if not ctx.quick else SWEEP[::2], ctx.n(15, 8), core)
    runs = res["runs"]
    return {
        "opcua_ceiling": figure(
            value=res["ceiling_items"],
            unit="items at 1 Hz kept up with on one core",
            target="measured (issue 14)",
            first_not_keeping_up=res["first_not_keeping_up"],
            cpu_bound_items=res["cpu_bound_items"],
            us_per_notification=res["us_per_notification_median"],
            cpu_of_core_max=res["cpu_of_core_max"],
            load_average=[round(x, 1) for x in res["load_average"]],
            runs=runs,
            detail="; ".join(
                f"{r['items']:,}: {'keeps up' if r['keeps_up'] else 'BEHIND'} "
                f"({r['committed_per_s']:,}/{r['produced_per_s']:,} committed/produced per s, "
                f"queue max {r['queue_max']:,}, late {r['late_max_s']} s, "
                f"{r['cpu_of_core'] * 100:.0f}% of the core, waiting for it "
                f"{r['runqueue_wait_of_run'] * 100:.0f}% of the run, {r['us_per_notification']} us each)"
                for r in runs
            ),
        )
    }

"""What arrived, per (source, stream, epoch): the figures that prove delivery complete.

Built from the gateway's SQLite file only, so ``GET /report`` (online) and ``edge-agent
gateway report --db FILE`` (offline, gateway stopped or running) say the same thing.
docs/gateway.md explains each figure.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from gateway.store import COUNTERS, connect

Interval = tuple[int, int]

_RUNS = """
SELECT MIN(seq), MAX(seq) FROM (
    SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS island
    FROM (SELECT DISTINCT seq FROM events WHERE sk = ?)
) GROUP BY island ORDER BY 1
"""


def _merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _complement(covered: list[Interval], upper: int) -> list[Interval]:
    """Sequences in 1..upper not in ``covered`` (merged, sorted)."""
    out: list[Interval] = []
    nxt = 1
    for a, b in covered:
        if a > upper:
            break
        if a > nxt:
            out.append((nxt, a - 1))
        nxt = max(nxt, b + 1)
    if nxt <= upper:
        out.append((nxt, upper))
    return out


def _stream_report(conn: sqlite3.Connection, row: tuple) -> dict:
    sk, source, stream, epoch, received, duplicates, out_of_order, id_conflicts, highest = row[:9]
    batches = row[9]
    runs: list[Interval] = [tuple(r) for r in conn.execute(_RUNS, (sk,))]
    explained_rows = conn.execute(
        "SELECT first_sequence, last_sequence, count, reason, kind, event_id FROM explained"
        " WHERE sk = ? ORDER BY first_sequence, kind",
        (sk,),
    ).fetchall()
    explained = [
        {"first_sequence": a, "last_sequence": b, "count": c, "reason": r, "kind": k, "id": eid}
        for a, b, c, r, k, eid in explained_rows
    ]
    cp_row = conn.execute(
        "SELECT seq, id, last_sequence, count, time FROM checkpoints"
        " WHERE sk = ? ORDER BY seq DESC, at DESC LIMIT 1",
        (sk,),
    ).fetchone()
    covered = _merge(runs + [(a, b) for a, b, *_ in explained_rows])
    upper = max(highest, cp_row[2] if cp_row else 0)
    missing = _complement(covered, upper)
    complete_up_to = covered[0][1] if covered and covered[0][0] == 1 else 0
    received_distinct = sum(b - a + 1 for a, b in runs)
    explained_count = sum(b - a + 1 for a, b in covered) - received_distinct
    checkpoint = None
    if cp_row:
        seq, cid, last, count, cp_time = cp_row
        checkpoint = {
            "sequence": seq,
            "id": cid,
            "streamepoch": epoch,
            "last_sequence": last,
            "count": count,
            "time": cp_time,
            "complete": complete_up_to >= last,
        }
    missing_count = sum(b - a + 1 for a, b in missing)
    return {
        "source": source,
        "stream": stream,
        "epoch": epoch,
        "received": received,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "id_conflicts": id_conflicts,
        "batches": batches,
        "first_sequence": runs[0][0] if runs else None,
        "highest_sequence": highest or None,
        "missing": [list(r) for r in missing],
        "missing_count": missing_count,
        "explained": explained,
        "explained_count": explained_count,
        "complete_up_to": complete_up_to,
        "last_checkpoint": checkpoint,
        "ok": missing_count == 0 and id_conflicts == 0,
    }


def build_report(conn: sqlite3.Connection, *, db_path: str | Path | None = None) -> dict:
    """The report as a JSON-ready dict (see docs/gateway.md for each figure)."""
    rows = conn.execute(
        "SELECT sk, source, stream, epoch, received, duplicates, out_of_order, id_conflicts,"
        " highest, batches FROM streams ORDER BY stream, source, first_at, sk"
    ).fetchall()
    streams = [_stream_report(conn, row) for row in rows]
    totals = {"streams": len(streams)}
    for name in ("received", "duplicates", "out_of_order", "id_conflicts", "batches"):
        totals[name] = sum(s[name] for s in streams)
    totals["missing"] = sum(s["missing_count"] for s in streams)
    totals["explained"] = sum(s["explained_count"] for s in streams)
    totals["ok"] = all(s["ok"] for s in streams)
    counters = dict.fromkeys(COUNTERS, 0)
    counters.update(dict(conn.execute("SELECT name, n FROM counters").fetchall()))
    return {
        "db": str(db_path) if db_path is not None else None,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "streams": streams,
        "totals": totals,
        "requests": counters,
    }


def read_report(db_path: str | Path) -> dict[str, Any]:
    """The report from a gateway database file (read-only; the gateway may be running)."""
    conn = connect(db_path, readonly=True)
    try:
        return build_report(conn, db_path=db_path)
    finally:
        conn.close()


def _ranges(items: list[list[int]]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in items)


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal: one block per stream, then totals."""
    lines = [f"gateway report ({report['db'] or 'live'}, {report['generated_at']})"]
    if not report["streams"]:
        lines.append("no events received yet")
    for s in report["streams"]:
        lines.append("")
        lines.append(f"stream {s['stream']}  epoch {s['epoch']}  source {s['source']}")
        lines.append(
            f"  received {s['received']}  duplicates {s['duplicates']}  "
            f"out_of_order {s['out_of_order']}  id_conflicts {s['id_conflicts']}  "
            f"batches {s['batches']}"
        )
        if s["highest_sequence"]:
            lines.append(
                f"  sequences {s['first_sequence']}..{s['highest_sequence']}  "
                f"complete up to {s['complete_up_to']}"
            )
        missing = _ranges(s["missing"]) if s["missing"] else "none"
        lines.append(f"  missing {s['missing_count']}: {missing}")
        for e in s["explained"]:
            span = (
                str(e["first_sequence"])
                if e["first_sequence"] == e["last_sequence"]
                else f"{e['first_sequence']}-{e['last_sequence']}"
            )
            lines.append(f"  explained {span} ({e['kind']}, count {e['count']}): {e['reason']}")
        cp = s["last_checkpoint"]
        if cp:
            verdict = "complete" if cp["complete"] else "NOT complete"
            lines.append(
                f"  last checkpoint at {cp['sequence']}: last_sequence {cp['last_sequence']}"
                f" count {cp['count']} -> {verdict}"
            )
        lines.append(f"  {'OK' if s['ok'] else 'PROBLEM: unexplained gaps or id conflicts'}")
    t = report["totals"]
    lines.append("")
    lines.append(
        f"totals: streams {t['streams']}  received {t['received']}  duplicates {t['duplicates']}"
        f"  out_of_order {t['out_of_order']}  id_conflicts {t['id_conflicts']}"
        f"  missing {t['missing']}  explained {t['explained']}  batches {t['batches']}"
    )
    lines.append("requests: " + "  ".join(f"{k} {v}" for k, v in report["requests"].items()))
    return "\n".join(lines)

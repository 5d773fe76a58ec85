"""The status table fits 100 columns, is plain text off a terminal, and shows source detail."""

from __future__ import annotations

import io
import re
import time
from typing import Any

from rich.console import Console

from agent.status_view import renderable, source_detail

ANSI = re.compile(r"\x1b\[")


def _snapshot() -> dict[str, Any]:
    now = time.time()
    return {
        "schema": 1,
        "agent": {"id": "edge-line-assembly-07", "plant": "plant-koeln-nord", "version": "0.1.0",
                  "running": True, "pid": 4242, "started_at": now - 7300,
                  "heartbeat_age_s": 0.4},
        "buffer": {"path": "/var/lib/edge-agent/buffer.db", "file_bytes": 52_428_800,
                   "used_bytes": 31_457_280, "max_bytes": 1_073_741_824, "on_full": "block",
                   "durability": "fsync", "epoch": 3, "ingest_rate_eps": 120.5,
                   "full_in_s": 3600.0, "refused_total": 17,
                   "last_write_error": "disk I/O error writing /var/lib/edge-agent/buffer.db "
                                       "(is the disk full? check df -h)"},
        "streams": [
            {"stream": "line1-assembly-signals", "sink": "central", "priority": "high",
             "last_sequence": 1_000_500, "forwarded_sequence": 500,
             "backlog_events": 1_000_000, "backlog_bytes": 30_000_000,
             "oldest_unsent_age_s": 7200.5, "last_forwarded_at": now - 7000,
             "last_error": "connect timeout to https://gateway.example.com:443 " * 5,
             "state": "retrying", "dead_letters": 2, "ingested_total": 1_000_502,
             "forwarded_total": 500, "dropped_total": 1_234_567, "dead_lettered_total": 2,
             "refused_total": 17},
        ],
        "sinks": [
            {"name": "central-gateway-https", "type": "https", "state": "disconnected",
             "since": now - 60, "last_error": "TLS handshake failed: certificate expired " * 4},
        ],
        "sources": [
            {"name": "line1-plc-opcua-main", "type": "opcua", "stream": "line1",
             "state": "connected", "since": now - 7200, "last_error": None,
             "detail": {"endpoint": "opc.tcp://plc1:4840", "items_configured": 120,
                        "items_monitored": 118, "notifications_per_second": 450.4,
                        "events_committed": 89_990, "lost_in_flight": 4,
                        "held_back_by_full_buffer": True, "failed_nodes": {"a": "Bad"}}},
            {"name": "mes", "type": "mes_http", "stream": "mes", "state": "connected",
             "since": now - 30, "last_error": "schema: missing field order_id " * 6,
             "detail": {"accepted": 1234, "duplicates": 5,
                        "rejected": {"invalid_json": 2, "schema": 1}}},
            {"name": "drop", "type": "drop_folder", "stream": "mes", "state": "finished",
             "since": None, "last_error": None, "detail": {}},
        ],
    }  # fmt: skip


def _render(snap: dict[str, Any]) -> str:
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=False).print(renderable(snap))
    return out.getvalue()


def test_fits_100_columns_without_ansi() -> None:
    text = _render(_snapshot())
    assert not ANSI.search(text), "escape codes in plain output"
    long = [line for line in text.splitlines() if len(line) > 100]
    assert not long, f"lines over 100 columns: {long}"
    assert "items 118/120  450/s" in text
    assert "accepted 1,234  rejected 3" in text
    assert "source drop" in text
    assert "disconnected" in text  # states are never cut short
    assert "sink central-gateway-https: TLS handshake failed" in text


def test_source_detail_summary() -> None:
    assert source_detail({"accepted": 1234, "rejected": {"a": 2, "b": 1}}) == (
        "accepted 1,234  rejected 3"
    )
    assert source_detail({"accepted": 7, "rejected": {}, "duplicates": 0}) == "accepted 7"
    assert source_detail({"accepted": 7, "duplicates": 2, "held_back": True}) == (
        "accepted 7  dup 2  held back"
    )
    assert source_detail({"items_monitored": 120, "items_configured": 120,
                          "notifications_per_second": 450.4}) == "items 120  450/s"  # fmt: skip
    assert source_detail({"emitted": 10, "machine_state": "running"}) == "accepted 10"
    assert source_detail({}) == ""
    assert source_detail(None) == ""

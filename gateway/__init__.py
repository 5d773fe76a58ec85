"""Reference gateway: the central side of the wire contract's HTTPS binding.

It accepts CloudEvents batches exactly as the contract says (checking every header and
envelope), deduplicates on (source, id), commits to its own SQLite file before answering
2xx, and reports per stream and epoch what arrived, what is missing and what is explained.
Tests, benchmarks and ``edge-agent demo`` forward to it; central teams use it to check
their own receiver (and their agent configuration) against the contract. See
docs/gateway.md.

    cli.py       ``edge-agent gateway`` (serve) and ``edge-agent gateway report``
    server.py    aiohttp routes, failure injection (Faults), GatewayServer lifecycle
    validate.py  the contract checks on headers and envelopes
    store.py     the SQLite file: events in arrival order, counters, idempotency keys
    report.py    the report figures, from the file alone
"""

from gateway.report import build_report, read_report, render_text
from gateway.store import GatewayDbError, read_events

__all__ = [
    "GatewayDbError",
    "build_report",
    "read_events",
    "read_report",
    "render_text",
]

"""The CloudEvents envelope, encoded once at commit time.

The forwarder and every sink send these bytes as they are (joined into a JSON array), so
what the central side receives is exactly what was committed: the same id, sequence and
epoch on every retry and replay.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from agent.interfaces import NewEvent
from agent.vocabulary import TYPES, dataschema

SPECVERSION = "1.0"


def source_uri(plant: str, stream: str) -> str:
    return f"edge-agent://{plant}/{stream}"


def format_sequence(seq: int) -> str:
    """20-digit zero padded, so string order equals numeric order."""
    return f"{seq:020d}"


def format_time(t: str | datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a Z, e.g. 2026-11-23T10:15:02.123Z."""
    if isinstance(t, str):
        return t
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    return format_time(datetime.now(UTC))


def encode(
    ev: NewEvent, *, id: str, source: str, seq: int, epoch: str, plant: str, agent_id: str
) -> bytes:
    envelope: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id,
        "source": source,
        "type": ev.type,
        "time": format_time(ev.time),
        "datacontenttype": "application/json",
        # the vocabulary's versioned URN; an unknown type raises VocabularyError here, but
        # every source validates its data with agent.vocabulary before it appends
        # Sources validate types before appending; an unknown one must still never fail
        # the whole group commit it shares with other sources' events.
        "dataschema": ev.dataschema
        or (dataschema(ev.type) if ev.type in TYPES else f"urn:edge-agent:schema:{ev.type}:1"),
        "sequence": format_sequence(seq),
        "streamepoch": epoch,
        "plant": plant,
        "agentid": agent_id,
    }
    if ev.subject is not None:
        envelope["subject"] = ev.subject
    if ev.correlationid is not None:
        envelope["correlationid"] = ev.correlationid
    envelope["data"] = ev.data
    return orjson.dumps(envelope, option=orjson.OPT_NON_STR_KEYS)

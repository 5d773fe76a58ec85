"""ULIDs (https://github.com/ulid/spec) for event, batch and epoch ids.

A group commit assigns thousands of ids at once, and per-id encoding in Python costs more
than the SQLite insert itself (python-ulid: about 8 us an id here). So ids of one group use
the spec's monotonic mode: one 48-bit millisecond time and one random 80-bit value whose
low 20 bits count up. Only those last four characters differ within a group, and they
come from a table. Ids stay 26 Crockford base32 characters, unique (60 fresh random bits
per group) and sortable by time.
"""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> 2 symbols
_HEAD_SHIFTS = range(120, 19, -10)  # the 11 pairs above the counting 20 bits
_GROUP_MAX = 1 << 20


def _encode_head(value: int) -> str:
    return "".join([_PAIRS[(value >> s) & 1023] for s in _HEAD_SHIFTS])


def ulids(n: int, now_ms: int | None = None) -> list[str]:
    """n new ULIDs sharing one timestamp and random prefix, in increasing order."""
    out: list[str] = []
    while n > 0:
        k = min(n, _GROUP_MAX)
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        rnd = int.from_bytes(os.urandom(8), "big") >> 4  # 60 random bits
        head = _encode_head((ms << 80) | (rnd << 20))
        pairs = _PAIRS
        out.extend([head + pairs[i >> 10] + pairs[i & 1023] for i in range(k)])
        n -= k
    return out


def ulid() -> str:
    return ulids(1)[0]

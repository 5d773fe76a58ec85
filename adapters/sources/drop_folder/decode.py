"""Turn a dropped file's bytes into canonical events, or into a list of what is wrong.

Validation is all-or-nothing per file: :func:`decode_file` looks at every line and returns
either all events (no problems) or every problem it found (line number and why), so the
rejection report tells the operator everything to fix in one go.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapters.sources.mes_common import MesInputError, parse_mes_payload
from agent.interfaces import NewEvent

from .config import Config, CsvOptions

#: the report lists at most this many problems, then says how many more there were
MAX_REPORTED = 1000


@dataclass(slots=True)
class Decoded:
    events: list[NewEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lines: int = 0
    #: short machine-readable reason of the first problem (status "rejected by reason")
    reason: str = ""

    def problem(self, line: int, reason: str, text: str) -> None:
        if not self.reason:
            self.reason = reason
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(f"line {line}: {text}")
        elif len(self.problems) == MAX_REPORTED:
            self.problems.append("... more problems not listed (fix the ones above first)")


def decode_file(name: str, content: bytes, config: Config) -> Decoded:
    """Decode a whole file. ``name`` picks the format (.csv or JSON Lines)."""
    out = Decoded()
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        out.problem(line, "encoding", f"not UTF-8 (byte {exc.start}): save the file as UTF-8")
        return out
    is_csv = name.lower().endswith(".csv")
    rows = _csv_rows(text, config.csv) if is_csv else _jsonl_rows(text)
    for line, obj, error in rows:
        out.lines = max(out.lines, line)
        if error is not None:
            out.problem(line, "syntax", error)
            continue
        assert obj is not None
        try:
            out.events.append(
                parse_mes_payload(
                    obj,
                    config.mapping,
                    extra_uom_codes=config.extra_uom_codes,
                    drop_empty=is_csv,
                )
            )
        except MesInputError as exc:
            out.problem(line, "invalid", "; ".join(f"{p}: {m}" if p else m for p, m in exc.errors))
    if out.problems:
        out.events.clear()
    return out


Row = tuple[int, dict[str, Any] | None, str | None]


def _jsonl_rows(text: str) -> Iterator[Row]:
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield n, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield n, None, f"expected one JSON object per line, got {type(obj).__name__}"
            continue
        yield n, obj, None


def _csv_rows(text: str, opts: CsvOptions) -> Iterator[Row]:
    """Rows as flat MES objects keyed by the header's column names; the mapping renames
    them, and an empty cell counts as an absent field (``drop_empty``)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=opts.delimiter)
    header: list[str] | None = None
    try:
        for cells in reader:
            line = reader.line_num
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield line, None, f"{len(cells)} cells but the header has {len(header)} columns"
                continue
            yield line, dict(zip(header, cells, strict=True)), None
    except csv.Error as exc:
        yield reader.line_num, None, f"not valid CSV ({exc})"
    if header is None:
        yield 1, None, "empty CSV file (a header line is required)"

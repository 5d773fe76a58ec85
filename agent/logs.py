"""Logging setup: readable on a terminal, JSON lines for journald and log collectors.

Every logger lives under ``edge_agent`` (``logging.getLogger("edge_agent.forwarder")``).
Lines about a batch pass its identity as ``extra`` so a collector can filter on it::

    log.info("batch accepted", extra={"stream": s, "batch_id": b.id,
                                       "first_sequence": lo, "last_sequence": hi, "sink": n})

The JSON formatter writes those keys as top-level fields; the text formatter appends them as
``key=value``. A redaction filter on the handler replaces every value registered with
:func:`register_secret` (tokens, passwords, keys read from ``*_file``) by ``***`` in the
message, its arguments, the extra fields and tracebacks, so a secret that slips into an
exception text still never reaches the log.

Under systemd (``JOURNAL_STREAM`` names the device and inode of our stderr, so stderr *is*
the journal's stream, not a file or pipe the unit redirected it to) every line starts with
its syslog priority in the sd-daemon form, ``<3>`` for an error, ``<4>`` a warning, ``<6>``
info, ``<7>`` debug: journald strips it and files the line under that priority, so
``journalctl -p err -u edge-agent`` shows exactly the errors. We chose the prefix over the
native journal protocol (a datagram per record to /run/systemd/journal/socket, with fields
such as BATCH_ID) because it needs no socket, no fallback for large records and nothing
that can fail or block while logging, works unchanged in the one-file binary and in any
container whose stderr is a journal stream, and the JSON line journald stores as MESSAGE
already carries those fields (stream, batch_id, first_sequence, last_sequence) for a
collector, or for ``journalctl -o cat | jq``. A multi-line record (a text traceback) gets
the prefix on every line, so no line of it falls back to the unit's default priority.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

__all__ = [
    "EXTRA_FIELDS",
    "JournalPriorityFormatter",
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "register_secret",
    "redact",
    "setup_logging",
    "stream_is_journal",
    "syslog_priority",
]

ROOT = "edge_agent"
REDACTED = "***"

#: ``extra`` keys the formatters know about (others are written too, these come first).
EXTRA_FIELDS = (
    "stream",
    "batch_id",
    "first_sequence",
    "last_sequence",
    "events",
    "sink",
    "source",
    "outcome",
    "attempt",
    "delay_s",
)

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
#: secrets sorted longest first, so a secret containing another is replaced whole
_ordered: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    """Never log ``value``. Values shorter than 4 characters are ignored (they would
    redact ordinary words and betray nothing of note)."""
    global _ordered
    if not value or len(value) < 4:
        return
    with _secrets_lock:
        _secrets.add(value)
        _ordered = tuple(sorted(_secrets, key=len, reverse=True))


def clear_secrets() -> None:
    """Forget registered secrets (tests, and a reload that replaced every credential)."""
    global _ordered
    with _secrets_lock:
        _secrets.clear()
        _ordered = ()


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))


class RedactingFilter(logging.Filter):
    """Rewrites a record so no registered secret survives formatting.

    Installed on the handler (not a logger) so records from every library that propagate
    to the root are covered too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _ordered:
            return True
        # Render the message now, then drop args: a secret hidden in an argument's repr
        # is caught, and formatting cannot reintroduce it.
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the line
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, _redact_value(value))
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    ordered = {k: fields.pop(k) for k in EXTRA_FIELDS if k in fields}
    ordered.update(fields)
    return ordered


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        return formatter.formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, value)
        exc = _exception_text(self, record)
        if exc:
            doc["exc"] = exc
        if record.stack_info:
            doc["stack"] = record.stack_info
        return orjson.dumps(doc, default=str).decode()


#: Python level -> syslog priority (sd-daemon.h: SD_ERR "<3>", SD_WARNING "<4>", ...)
def syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalPriorityFormatter(logging.Formatter):
    """Wraps another formatter: ``<N>`` before every line of its output."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def stream_is_journal(stream: TextIO, environ: Any = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected (JOURNAL_STREAM is
    ``device:inode`` of it; a unit or shell that redirected stderr elsewhere keeps the
    variable but not the stream, and then gets no prefixes)."""
    import os

    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class TextFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL logger: message key=value ...`` for people."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        name = record.name.removeprefix(ROOT + ".")
        line = f"{ts} {record.levelname:<7} {name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in extras.items())
        exc = _exception_text(self, record)
        if exc:
            line += "\n" + exc
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


def _text(value: Any) -> str:
    s = str(value)
    return repr(s) if (" " in s or s == "") else s


def _use_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "json":
        return True
    if fmt == "text":
        return False
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def setup_logging(
    level: str = "info",
    fmt: Literal["auto", "text", "json"] | str = "auto",
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Configure the root logger once for the process and return the handler.

    ``fmt="auto"`` means text on a terminal and JSON lines otherwise (under systemd stderr
    goes to journald, which is not a terminal). Calling it again (a reload that changed
    ``[log]``) replaces the previous handler instead of adding a second one. Noisy
    libraries are held at warning so ``debug`` stays about the agent.
    """
    if fmt not in ("auto", "text", "json"):
        raise ValueError(f"log format '{fmt}' is not one of auto, text, json")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level '{level}' is not one of debug, info, warning, error")
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter = JsonFormatter() if _use_json(fmt, out) else TextFormatter()
    if stream_is_journal(out):
        formatter = JournalPriorityFormatter(formatter)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    handler.set_name("edge_agent")

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "edge_agent"]:
        root.removeHandler(old)
        old.close()  # StreamHandler.close() leaves the stream itself open
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(numeric)
    for noisy in ("asyncua", "aiohttp.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)
    return handler

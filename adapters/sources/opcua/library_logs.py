"""asyncua's own log lines, brought to what docs/opcua.md promises.

When the server restarts, asyncua's publish loop logs ERROR "Publish iteration crashed;
retrying in 1s" with a full traceback, although a server restart is an expected event that
the source handles itself (it reports the loss as a warning and reconnects). An ERROR with
a traceback tells an operator "bug" and pages people; so these lines become one warning
line naming the cause, without the traceback.
"""

from __future__ import annotations

import logging

#: (logger name, start of the message) of asyncua's retry-loop lines
RETRY_LINES = (
    ("asyncua.client.ua_session.UaSession", "Publish iteration crashed"),
    ("asyncua.client.client", "Connection supervisor iteration crashed"),
)


class ExpectedRetryFilter(logging.Filter):
    """Turn an asyncua retry-loop ERROR with traceback into a one-line WARNING."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not str(record.msg).startswith(self.prefix):
            return True
        cause = record.exc_info[1] if record.exc_info else None
        text = str(record.msg).replace("crashed", "failed")
        if cause is not None:
            text += f" (cause: {type(cause).__name__}: {cause})"
        record.msg, record.args = text, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def install() -> None:
    """Idempotent: the filter is added once per logger."""
    for name, prefix in RETRY_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedRetryFilter) for f in logger.filters):
            logger.addFilter(ExpectedRetryFilter(prefix))

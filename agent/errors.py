"""The agent's exception tree. Adapters translate library errors at their boundary
(``raise SourceError(...) from exc``) so callers only ever see these.

    EdgeAgentError                 base; str(err) is one line a user can act on
    ├── ConfigError                bad config file: "key.path: what is wrong (how to fix)"
    ├── BufferError_               the local buffer
    │   ├── BufferFull             at max_bytes under on_full = "block": hold the source back
    │   │   └── DiskFull           the filesystem refused a write: nothing was committed
    │   └── BufferCorrupt          file unreadable at start: it was quarantined
    ├── SourceError                a source could not collect (connection, security, mapping)
    └── SinkError                  a sink could not be set up (bad CA file, bad key)
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(EdgeAgentError):
    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class BufferError_(EdgeAgentError):  # noqa: N801 - avoid shadowing the builtin BufferError
    pass


class BufferFull(BufferError_):
    def __init__(self, used: int, limit: int) -> None:
        self.used = used
        self.limit = limit
        super().__init__(
            f"buffer full: {used} of {limit} bytes used; events are refused until the sink "
            "drains the backlog or buffer.max_bytes is raised"
        )


class BufferCorrupt(BufferError_):
    pass


class DiskFull(BufferFull):
    """The filesystem is full: handled like BufferFull by sources (hold back, retry)."""

    def __init__(self, message: str) -> None:  # noqa: B042
        self.used = self.limit = 0
        BufferError_.__init__(self, message)


class SourceError(EdgeAgentError):
    pass


class SinkError(EdgeAgentError):
    pass

"""NATS JetStream sink: batches published to ``<prefix>.<plant>.<stream>`` with
``Nats-Msg-Id`` = batch id, so the stream deduplicates resends (docs/nats.md)."""

from adapters.sinks.nats.config import Config
from adapters.sinks.nats.sink import NatsSink, build

__all__ = ["Config", "NatsSink", "build"]

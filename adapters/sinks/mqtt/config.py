"""``[sinks.NAME]`` with ``type = "mqtt"``: publish batches to the central MQTT broker.

Option names match the MQTT source (``adapters/sources/mqtt``) wherever they mean the same
thing, so an operator who configured one can configure the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from adapters.mqtt_connection import MqttConnection
from agent.config import ByteSize, Duration, SinkConfig

if TYPE_CHECKING:
    from agent.preflight import Check

#: MQTT's hard ceiling for one packet (remaining length is at most 268,435,455 bytes).
MQTT_MAX_PACKET = 268_435_460


class Config(SinkConfig, MqttConnection):
    type: Literal["mqtt"] = "mqtt"

    def preflight(self, check: Check) -> None:
        self.connection_preflight(check)

    #: topics are <topic_prefix>/<plant>/<stream>; status on <topic_prefix>/<plant>/agents/<id>/status
    topic_prefix: str = "edge"
    #: gzip the batch payload (content type then ends in +gzip)
    gzip: bool = False
    #: batches of one stream on the wire at once, acknowledged in order (one connection keeps
    #: the order); 1 = stop and wait. 20 is paho's window and mosquitto's Receive Maximum, so
    #: the default never waits on itself while the broker would take more: with 8 the whole
    #: agent drained a 1M backlog at 313-319k events/s, with 20 at 502-542k (2 cores, local
    #: mosquitto, docs/performance.md)
    max_in_flight: int = Field(default=20, ge=1, le=1000)
    #: publish the retained online/offline status message and the Last Will
    presence: bool = True
    #: TCP connect, TLS handshake and CONNACK, each
    connect_timeout: Duration = Field(default=10.0, gt=0)
    #: no PUBACK this long on a live connection: drop it and report retry
    ack_timeout: Duration = Field(default=60.0, gt=0)
    reconnect_min: Duration = Field(default=0.5, gt=0)
    reconnect_max: Duration = Field(default=30.0, gt=0)
    #: cap on one PUBLISH packet; the broker's own limit (MQTT 5 CONNACK) applies as well.
    #: Set it for MQTT 3.1.1 brokers, which cannot announce theirs.
    max_packet_size: ByteSize | None = Field(default=None, ge=1024, le=MQTT_MAX_PACKET)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "+#\x00") or v.startswith("/") or v.endswith("/"):
            raise ValueError("must be a topic path without wildcards or outer '/', e.g. edge")
        return v

"""``[sources.NAME]`` with ``type = "sparkplug"``: be a Sparkplug B 3.0 primary host.

A source type of its own rather than a ``format`` of the mqtt source: a Sparkplug host
has its own lifecycle (STATE birth and Will, rebirth requests, clean sessions as the
specification requires, QoS 0 data) and no per-topic field mapping, so its options share
only the connection with the mqtt source (adapters/mqtt_connection.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from adapters.mqtt_connection import MqttConnection
from agent.config import Duration, SourceConfig

if TYPE_CHECKING:
    from agent.preflight import Check

_ID = re.compile(r"[^/+#\x00]+")


class Config(SourceConfig, MqttConnection):
    type: Literal["sparkplug"] = "sparkplug"

    def preflight(self, check: Check) -> None:
        self.connection_preflight(check)

    url: str = "mqtt://127.0.0.1:1883"
    #: MQTT 3.1.1 by default, unlike the mqtt source: Sparkplug 3.0 allows 3.1.1 and 5
    #: alike and uses no MQTT 5 feature (STATE's Will is retained QoS 1 in both; a host
    #: connects with a clean session either way), while paho 2.2 parses a v5 PUBLISH's
    #: properties into a fresh Properties object and clears it again per message: about
    #: 30 us a message, a third of the source's receive (docs/performance.md, issue 12)
    protocol: Literal["5", "3.1.1"] = "3.1.1"
    #: Sparkplug group ids to host (each subscribed as spBv1.0/<group>/#); "+" for all
    groups: list[str] = Field(min_length=1)
    #: the primary host id edge nodes are configured with: STATE is spBv1.0/STATE/<host_id>
    host_id: str = Field(min_length=1, max_length=200)
    #: publish STATE (birth, Will, offline while the buffer refuses events); off for a
    #: passive host that only listens
    primary: bool = True
    #: least time between two rebirth requests to one edge node while one is owed
    rebirth_interval: Duration = Field(default=5.0, gt=0)
    #: how often the buffer's room is looked at (STATE offline when it refuses events)
    room_check_interval: Duration = Field(default=0.25, gt=0)
    #: how long to wait before trying a refused commit again
    retry_interval: Duration = Field(default=0.5, gt=0)
    #: when no commit is in flight, how long the first message of a group waits for more
    #: before the group is committed: at a steady trickle (an edge node publishing every
    #: millisecond) one commit (one fsync, two thread hops) per message otherwise, which
    #: at 1,000 payloads/s cost a third of the agent's CPU (docs/performance.md); 0: none
    commit_linger: Duration = Field(default=0.01, ge=0, le=1)
    #: messages held in memory while the buffer refuses events or the commits fall behind;
    #: data beyond is dropped, counted (dropped_overflow) and answered by a rebirth request
    #: (births and deaths are always kept). QoS 0 cannot be held back at the broker.
    max_held_messages: int = Field(default=100_000, ge=1)
    #: default edge-agent-<agent id>-<source name>
    client_id: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for g in v:
            if g != "+" and not _ID.fullmatch(g):
                raise ValueError(f"{g!r}: a group id has no '/', '+', '#' (or is '+' for all)")
        if len(set(v)) != len(v):
            raise ValueError("a group is listed twice")
        return v

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, v: str) -> str:
        if not _ID.fullmatch(v):
            raise ValueError("a host id has no '/', '+' or '#'")
        return v

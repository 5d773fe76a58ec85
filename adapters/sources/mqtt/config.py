"""``[sources.NAME]`` with ``type = "mqtt"``: subscribe to the plant's local broker."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from adapters.mqtt_connection import MqttConnection
from adapters.sources.mes_common import FieldMapping
from adapters.sources.mqtt.uns import check_template
from agent.config import ByteSize, Duration, Model, SourceConfig, parse_bytes
from agent.tls import LegacyKey

if TYPE_CHECKING:
    from agent.preflight import Check


class Subscription(Model):
    """One topic filter and how its payloads map to canonical events."""

    #: MQTT topic filter, wildcards allowed ("plant/line1/+/counted")
    topic: str
    #: the MES's own field names -> canonical fields; when the topic says what the payload
    #: is, fix the type with ``mapping.constants.type`` (see adapters/sources/mes_common)
    mapping: FieldMapping = FieldMapping()
    #: unified namespace: name the topic's levels, e.g. "{enterprise}/{site}/{area}/{line}/{cell}/{tag}";
    #: payloads are then values ({"value": ..., "timestamp": ...} or bare) and each becomes
    #: one mfg.signal.sampled (see adapters/sources/mqtt/uns.py)
    topic_template: str | None = None
    #: with topic_template: the stream of these events, from the level names ("{site}.{line}");
    #: default the source's stream
    stream: str | None = None

    @model_validator(mode="after")
    def _uns(self) -> Subscription:
        if self.topic_template is None:
            if self.stream is not None:
                raise ValueError("stream: needs a topic_template to name levels from")
            return self
        try:
            names = check_template(self.topic_template)
        except ValueError as exc:
            raise ValueError(f"topic_template: {exc}") from None
        if self.mapping != FieldMapping():
            raise ValueError(
                "mapping: a topic_template subscription takes value payloads, no mapping"
            )
        if self.stream is not None:
            for used in re.findall(r"\{([^}]*)\}", self.stream):
                if used not in names:
                    raise ValueError(f"stream: {{{used}}} is not a level of the topic_template")
        return self

    @field_validator("topic")
    @classmethod
    def _filter(cls, v: str) -> str:
        if not v or len(v.encode()) > 65535 or "\x00" in v:
            raise ValueError("must be a non-empty MQTT topic filter")
        levels = v.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError("'#' must be a whole last level, e.g. plant/line1/#")
            if "+" in level and level != "+":
                raise ValueError("'+' must be a whole level, e.g. plant/+/counted")
        return v


class Config(SourceConfig, MqttConnection):
    type: Literal["mqtt"] = "mqtt"

    def preflight(self, check: Check) -> None:
        self.connection_preflight(check)

    #: mqtt://host:1883 or mqtts://host:8883
    url: str = "mqtt://127.0.0.1:1883"
    #: fixed, so the broker keeps our session (and the messages queued in it) across restarts;
    #: default edge-agent-<agent id>-<source name>
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    #: MQTT 5: how long the broker keeps the session while the agent is away
    session_expiry: Duration = 7 * 86400.0
    #: MQTT 5 Receive Maximum: unacknowledged messages the broker may send us at once
    receive_maximum: int = Field(default=100, ge=1, le=65535)
    #: payloads larger than this are rejected (and acknowledged)
    max_payload: ByteSize = parse_bytes("1MiB")
    #: how long to wait before trying a commit again while the buffer is full
    retry_interval: Duration = Field(default=1.0, gt=0)
    subscriptions: list[Subscription] = Field(min_length=1)
    #: UN/CEFACT unit codes this site uses beyond the built-in list
    extra_uom_codes: list[str] = []

    #: before the one TLS model (agent.tls), the check switch had its own name here
    legacy_tls_keys: ClassVar[dict[str, LegacyKey]] = {
        "tls_insecure_skip_verify": LegacyKey("verify_certificate", inverted=True),
    }

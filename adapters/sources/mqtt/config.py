"""``[sources.NAME]`` with ``type = "mqtt"``: subscribe to the plant's local broker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from adapters.sources.mes_common import FieldMapping
from agent.config import ByteSize, Duration, Model, SourceConfig, check_url, parse_bytes


class Subscription(Model):
    """One topic filter and how its payloads map to canonical events."""

    #: MQTT topic filter, wildcards allowed ("plant/line1/+/counted")
    topic: str
    #: the MES's own field names -> canonical fields; when the topic says what the payload
    #: is, fix the type with ``mapping.constants.type`` (see adapters/sources/mes_common)
    mapping: FieldMapping = FieldMapping()

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


class Config(SourceConfig):
    type: Literal["mqtt"] = "mqtt"
    #: mqtt://host:1883 or mqtts://host:8883
    url: str = "mqtt://127.0.0.1:1883"
    #: plain mqtt:// to anything but loopback is refused unless this says so
    allow_insecure: bool = False
    #: fixed, so the broker keeps our session (and the messages queued in it) across restarts;
    #: default edge-agent-<agent id>-<source name>
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    protocol: Literal["5", "3.1.1"] = "5"
    #: MQTT 5: how long the broker keeps the session while the agent is away
    session_expiry: Duration = 7 * 86400.0
    keepalive: Duration = Field(default=30.0, ge=5, le=65535)
    #: MQTT 5 Receive Maximum: unacknowledged messages the broker may send us at once
    receive_maximum: int = Field(default=100, ge=1, le=65535)
    #: payloads larger than this are rejected (and acknowledged)
    max_payload: ByteSize = parse_bytes("1MiB")
    reconnect_min: Duration = Field(default=1.0, gt=0)
    reconnect_max: Duration = Field(default=60.0, gt=0)
    #: how long to wait before trying a commit again while the buffer is full
    retry_interval: Duration = Field(default=1.0, gt=0)
    subscriptions: list[Subscription] = Field(min_length=1)
    #: UN/CEFACT unit codes this site uses beyond the built-in list
    extra_uom_codes: list[str] = []

    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    #: CA bundle to verify the broker (default: the system's)
    ca_file: Path | None = None
    #: client certificate and key for mutual TLS
    cert_file: Path | None = None
    key_file: Path | None = None
    #: turns off certificate and host name checks. Only for a lab broker.
    tls_insecure_skip_verify: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError("only scheme, host and port belong in the url (use username)")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("the port must be a number 1-65535") from None
        return v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", v):
            raise ValueError("use letters, digits, '_', '.', ':' or '-'")
        return v

    @model_validator(mode="after")
    def _check(self) -> Config:
        try:
            check_url(self.url, self.allow_insecure, secure="mqtts", plain="mqtt")
        except ValueError as exc:
            raise ValueError(
                f"url: {exc} (the broker is not on this host: use mqtts:// "
                "or set allow_insecure = true for a trusted plant network)"
            ) from None
        if self.password is not None and self.password_file is not None:
            raise ValueError("password: set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("username: required when a password is set")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: set both cert_file and key_file for mutual TLS")
        if not self.tls and (self.ca_file or self.cert_file or self.tls_insecure_skip_verify):
            raise ValueError("url: TLS options need an mqtts:// url")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max: must be >= reconnect_min")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

"""``[sinks.NAME]`` with ``type = "mqtt"``: publish batches to the central MQTT broker.

Option names match the MQTT source (``adapters/sources/mqtt``) wherever they mean the same
thing, so an operator who configured one can configure the other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.config import ByteSize, Duration, SinkConfig, check_url

#: MQTT's hard ceiling for one packet (remaining length is at most 268,435,455 bytes).
MQTT_MAX_PACKET = 268_435_460


class Config(SinkConfig):
    type: Literal["mqtt"] = "mqtt"
    #: mqtts://HOST[:PORT] (default port 8883) or mqtt://HOST[:PORT] (default 1883)
    url: str
    #: plain mqtt:// to anything but loopback is refused unless this says so
    allow_insecure: bool = False
    protocol: Literal["5", "3.1.1"] = "5"
    #: topics are <topic_prefix>/<plant>/<stream>; status on <topic_prefix>/<plant>/agents/<id>/status
    topic_prefix: str = "edge"
    #: default edge-agent-<agent id>-<sink name>
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    #: gzip the batch payload (content type then ends in +gzip)
    gzip: bool = False
    #: batches of one stream on the wire at once, acknowledged in order (one connection keeps
    #: the order); 1 = stop and wait
    max_in_flight: int = Field(default=8, ge=1, le=1000)
    #: publish the retained online/offline status message and the Last Will
    presence: bool = True
    keepalive: Duration = Field(default=30.0, ge=5, le=65535)
    #: TCP connect, TLS handshake and CONNACK, each
    connect_timeout: Duration = Field(default=10.0, gt=0)
    #: no PUBACK this long on a live connection: drop it and report retry
    ack_timeout: Duration = Field(default=60.0, gt=0)
    #: reconnect backoff: doubles from reconnect_min up to reconnect_max, with jitter
    reconnect_min: Duration = Field(default=0.5, gt=0)
    reconnect_max: Duration = Field(default=30.0, gt=0)
    #: cap on one PUBLISH packet; the broker's own limit (MQTT 5 CONNACK) applies as well.
    #: Set it for MQTT 3.1.1 brokers, which cannot announce theirs.
    max_packet_size: ByteSize | None = Field(default=None, ge=1024, le=MQTT_MAX_PACKET)

    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    #: CA bundle to verify the broker (default: the system's trust store)
    ca_file: Path | None = None
    #: check that the broker's certificate names the host in url (the chain is always checked)
    verify_hostname: bool = True
    #: client certificate and key for mutual TLS
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must be mqtts://HOST[:PORT] or mqtt://HOST[:PORT]")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError("only scheme, host and port belong in the url (use username)")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("the port must be a number 1-65535") from None
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "+#\x00") or v.startswith("/") or v.endswith("/"):
            raise ValueError("must be a topic path without wildcards or outer '/', e.g. edge")
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
                "or set allow_insecure = true for a trusted network)"
            ) from None
        if self.password is not None and self.password_file is not None:
            raise ValueError("password: set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("username: required when a password is set")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: set both cert_file and key_file for mutual TLS")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError("url: ca_file, cert_file and key_file need an mqtts:// url")
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

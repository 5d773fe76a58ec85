"""How to reach an MQTT broker: shared by the MQTT sink and the MQTT source.

One model, so both spell their options the same way and check them the same way: an
operator who configured one has configured the other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.config import Duration, check_url
from agent.tls import TlsOptions

if TYPE_CHECKING:
    from agent.preflight import Check


class MqttConnection(TlsOptions):
    #: mqtts://HOST[:PORT] (default port 8883) or mqtt://HOST[:PORT] (default 1883)
    url: str
    #: plain mqtt:// to anything but loopback is refused unless this says so
    allow_insecure: bool = False
    protocol: Literal["5", "3.1.1"] = "5"
    #: default edge-agent-<agent id>-<name>
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    keepalive: Duration = Field(default=30.0, ge=5, le=65535)
    #: reconnect backoff: doubles from reconnect_min up to reconnect_max, with jitter
    reconnect_min: Duration = Field(default=1.0, gt=0)
    reconnect_max: Duration = Field(default=60.0, gt=0)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # ca_file, cert_file, key_file, verify_hostname, verify_certificate: agent.tls.TlsOptions

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

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", v):
            raise ValueError("use letters, digits, '_', '.', ':' or '-'")
        return v

    @model_validator(mode="after")
    def _check_connection(self) -> MqttConnection:
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
        if not self.tls and (self.tls_files or self.tls_verification_off):
            raise ValueError(
                "url: ca_file, cert_file, key_file, verify_hostname and verify_certificate "
                "need an mqtts:// url"
            )
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max: must be >= reconnect_min")
        return self

    def connection_preflight(self, check: Check) -> None:
        """The files run opens to connect: password, CA bundle, client certificate and key."""
        check.secret_file("password_file", self.password_file)
        if self.tls:
            self.tls_preflight(check)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

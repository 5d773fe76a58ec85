"""``[sources.NAME]`` with ``type = "mes_http"``: an HTTP endpoint MES systems push events to."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from adapters.sources.mes_common import FieldMapping
from agent.config import ByteSize, Duration, SourceConfig, is_loopback_host, parse_bytes
from agent.errors import ConfigError
from agent.tls import deprecation_sink
from agent.vocabulary import UOM_PATTERN

if TYPE_CHECKING:
    from agent.preflight import Check


def split_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8080' / '[::1]:8080' / '0.0.0.0:0' -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"'{listen}' is not HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080)")
    return host.strip("[]"), int(port)


#: in-flight requests get at most this long at stop (inside the sources' 6 s share)
SHUTDOWN_TIMEOUT_MAX = 5.0

log = logging.getLogger("edge_agent.config")


class Config(SourceConfig):
    type: Literal["mes_http"] = "mes_http"
    #: address to bind; anything but loopback needs a token
    listen: str = "127.0.0.1:8080"
    #: bearer token MES clients must send (Authorization: Bearer ...)
    token: SecretStr | None = None
    token_file: Path | None = None
    #: serve HTTPS with this certificate chain and key (PEM)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: largest request body accepted; larger ones get 413 without being read
    max_body_bytes: ByteSize = Field(default=parse_bytes("1MiB"), ge=1024)
    #: most events in one request
    max_events: int = Field(default=10_000, ge=1, le=1_000_000)
    #: Retry-After sent with 503 while the buffer is full
    retry_after: Duration = Field(default=5.0, ge=1)
    #: seconds in-flight requests get to finish when the agent stops; at most 5 s, so it
    #: fits the sources' share of the stop budget (agent/lifecycle.py)
    #: capped at SHUTDOWN_TIMEOUT_MAX (the sources' share of the stop budget), with a warning
    shutdown_timeout: Duration = Field(default=5.0, ge=0)
    #: site-specific UN/CEFACT rec. 20 unit codes accepted besides the built-in list
    extra_uom_codes: list[str] = Field(default_factory=list)
    mapping: FieldMapping | None = None

    @field_validator("shutdown_timeout")
    @classmethod
    def _shutdown_timeout(cls, v: float, info: ValidationInfo) -> float:
        """Longer than the sources' share of the stop budget would let systemd kill the
        agent mid-stop; a config written for an older version still starts (capped, one
        warning line), rather than refusing to start after an upgrade."""
        if v <= SHUTDOWN_TIMEOUT_MAX:
            return v
        where, notes = deprecation_sink(info)
        line = (
            f"{where}shutdown_timeout = {v:g}s is longer than the sources' share of the stop "
            f"budget: capped at {SHUTDOWN_TIMEOUT_MAX:g}s (docs/ARCHITECTURE.md, Lifecycle)"
        )
        if notes is None:
            log.warning("%s", line)
        else:
            notes.append(line)
        return SHUTDOWN_TIMEOUT_MAX

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        split_listen(v)
        return v

    @field_validator("extra_uom_codes")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:

        for code in v:
            if not re.fullmatch(UOM_PATTERN, code):
                raise ValueError(f"'{code}' is not a rec. 20 code (2-3 upper-case letters/digits)")
        return v

    @field_validator("token_file", "tls_cert", "tls_key")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None and v.is_dir():
            raise ValueError(f"{v} is a directory, not a file (name the file in it)")
        if v is not None and not v.is_file():
            raise ValueError(f"{v}: no such file (check the path)")
        return v

    @model_validator(mode="after")
    def _security(self) -> Config:
        if self.token is not None and self.token_file is not None:
            raise ConfigError("token", "set token or token_file, not both")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ConfigError("token", "is empty (set a long random token)")
        host, _ = split_listen(self.listen)
        if not is_loopback_host(host) and self.token is None and self.token_file is None:
            raise ConfigError(
                "token",
                f"required when listen is not a loopback address ({self.listen}): set token "
                "or token_file, or listen on 127.0.0.1",
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ConfigError(missing, "required with the other tls_ key (set both or neither)")
        return self

    def preflight(self, check: Check) -> None:
        check.secret_file("token_file", self.token_file)
        check.cert_and_key("tls_cert", self.tls_cert, "tls_key", self.tls_key)
        check.listen("listen", *split_listen(self.listen))

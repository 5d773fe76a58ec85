"""Config of the HTTPS sink: the contract's HTTPS binding."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator

from agent.config import Duration, SinkConfig, check_url

if TYPE_CHECKING:
    from agent.preflight import Check


class HttpsSinkConfig(SinkConfig):
    type: Literal["https"] = "https"
    #: the gateway's batch endpoint
    url: str
    #: plain http:// to a non-loopback host, or TLS without verification, only when true
    allow_insecure: bool = False
    #: CA bundle (PEM) to verify the gateway; the system trust store when unset
    ca_file: Path | None = None
    #: check the certificate but not that it matches the host name: never, unless you must
    insecure_skip_verify: bool = False
    #: client certificate and key (PEM) for mutual TLS
    client_cert: Path | None = None
    client_key: Path | None = None
    #: bearer token, from a file (preferred) or "${ENV}"
    token: SecretStr | None = None
    token_file: Path | None = None
    gzip: bool = True
    gzip_level: int = Field(default=1, ge=1, le=9)
    timeout: Duration = 30.0
    connect_timeout: Duration = 10.0

    @model_validator(mode="after")
    def _check(self) -> HttpsSinkConfig:
        try:
            check_url(self.url, self.allow_insecure, secure="https", plain="http")
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        if self.insecure_skip_verify and not self.allow_insecure:
            raise ValueError(
                "insecure_skip_verify: turns TLS verification off; set allow_insecure = true too"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_key: client_cert and client_key go together (mutual TLS)")
        for key in ("ca_file", "client_cert", "client_key", "token_file"):
            p = getattr(self, key)
            if p is not None and Path(p).is_dir():
                raise ValueError(f"{key}: {p} is a directory, not a file (name the file in it)")
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{key}: no such file: {p}")
        if self.token is not None and self.token_file is not None:
            raise ValueError("token_file: set token or token_file, not both")
        return self

    def preflight(self, check: Check) -> None:
        # the sink loads its TLS files at start whatever the URL's scheme
        check.ca_bundle("ca_file", self.ca_file)
        check.cert_and_key("client_cert", self.client_cert, "client_key", self.client_key)
        check.secret_file("token_file", self.token_file)

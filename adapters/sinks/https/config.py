"""Config of the HTTPS sink: the contract's HTTPS binding."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from agent.config import Duration, SinkConfig, check_url
from agent.tls import LegacyKey, TlsOptions

if TYPE_CHECKING:
    from agent.preflight import Check


class HttpsSinkConfig(SinkConfig, TlsOptions):
    type: Literal["https"] = "https"
    #: the gateway's batch endpoint
    url: str
    #: plain http:// to a non-loopback host, or TLS without verification
    #: (verify_hostname / verify_certificate = false), only when true
    allow_insecure: bool = False
    # ca_file, cert_file, key_file, verify_hostname, verify_certificate: agent.tls.TlsOptions
    #: bearer token, from a file (preferred) or "${ENV}"
    token: SecretStr | None = None
    token_file: Path | None = None
    gzip: bool = True
    gzip_level: int = Field(default=1, ge=1, le=9)
    timeout: Duration = 30.0
    connect_timeout: Duration = 10.0

    #: the sink's names before the one TLS model (agent.tls): still read, with a warning
    legacy_tls_keys: ClassVar[dict[str, LegacyKey]] = {
        "client_cert": LegacyKey("cert_file"),
        "client_key": LegacyKey("key_file"),
        "insecure_skip_verify": LegacyKey("verify_hostname", inverted=True),
    }

    @model_validator(mode="after")
    def _check(self) -> HttpsSinkConfig:
        try:
            check_url(self.url, self.allow_insecure, secure="https", plain="http")
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        if self.tls_verification_off and not self.allow_insecure:
            key = "verify_hostname" if not self.verify_hostname else "verify_certificate"
            raise ValueError(f"{key}: turns TLS verification off; set allow_insecure = true too")
        for key in ("ca_file", "cert_file", "key_file", "token_file"):
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
        self.tls_preflight(check)
        check.secret_file("token_file", self.token_file)

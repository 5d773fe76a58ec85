"""``[sinks.NAME]`` with ``type = "nats"``: publish batches into a NATS JetStream stream.

Secrets come from a file (``*_file``, preferred) or inline as ``"${ENV}"``; TLS options
are those of every TLS adapter (agent.tls.TlsOptions: ``ca_file``, ``cert_file``,
``key_file``, ``verify_hostname``, ``verify_certificate``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.config import Duration, SinkConfig, is_loopback_host
from agent.tls import TlsOptions

if TYPE_CHECKING:
    from agent.preflight import Check

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


class Config(SinkConfig, TlsOptions):
    type: Literal["nats"] = "nats"

    def preflight(self, check: Check) -> None:
        """The files run opens to connect: credentials, secrets, CA bundle, client pair."""
        check.secret_file("credentials_file", self.credentials_file)
        check.secret_file("password_file", self.password_file)
        check.secret_file("token_file", self.token_file)
        if self.tls:
            self.tls_preflight(check)

    #: one or more servers of the cluster, comma-separated or a list:
    #: tls://host:4222 (TLS) or nats://host:4222 (plain; loopback only unless allow_insecure)
    url: str | list[str]
    allow_insecure: bool = False
    #: subjects are <subject_prefix>.<plant>.<stream>
    subject_prefix: str = "edge"
    #: the JetStream stream that must capture those subjects (checked at start)
    stream: str = "EDGE"
    #: no PubAck this long: the batch is retried under the same Nats-Msg-Id
    ack_timeout: Duration = Field(default=10.0, gt=0)
    connect_timeout: Duration = Field(default=5.0, gt=0)
    #: first pause between reconnect rounds; doubles (with jitter) up to 30 s
    reconnect_wait: Duration = Field(default=1.0, gt=0)
    #: credentials: a .creds file (NKey seed + user JWT), or user + password, or a token
    credentials_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    # ca_file, cert_file, key_file, verify_hostname, verify_certificate: agent.tls.TlsOptions

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or not all(_TOKEN.fullmatch(t) for t in v.split(".")):
            raise ValueError("must be dot-separated tokens of letters, digits, '_' or '-' (edge)")
        return v

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: str) -> str:
        if not _TOKEN.fullmatch(v):
            raise ValueError("a JetStream stream name: letters, digits, '_' or '-'")
        return v

    @property
    def servers(self) -> list[str]:
        items = self.url if isinstance(self.url, list) else self.url.split(",")
        return [s.strip() for s in items if s.strip()]

    @property
    def tls(self) -> bool:
        return any(urlsplit(s).scheme == "tls" for s in self.servers)

    @model_validator(mode="after")
    def _check(self) -> Config:
        servers = self.servers
        if not servers:
            raise ValueError("url: name at least one server, e.g. tls://nats.example.com:4222")
        schemes = set()
        for s in servers:
            parts = urlsplit(s)
            if parts.scheme not in ("nats", "tls") or not parts.hostname:
                raise ValueError(f"url: {s!r} must be tls://HOST[:PORT] or nats://HOST[:PORT]")
            schemes.add(parts.scheme)
            if parts.scheme == "nats" and not self.allow_insecure:
                if not is_loopback_host(parts.hostname):
                    raise ValueError(
                        f"url: {s!r} is plain text to another host; use tls:// "
                        "(or set allow_insecure = true)"
                    )
        if len(schemes) > 1:
            raise ValueError("url: use tls:// for every server or for none")
        for key in ("credentials_file", "password_file", "token_file", "ca_file"):
            p = getattr(self, key)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{key}: no such file: {p}")
        for key in ("cert_file", "key_file"):
            p = getattr(self, key)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{key}: no such file: {p}")
        if (self.tls_files or self.tls_verification_off) and not self.tls:
            key = (
                ("ca_file" if self.ca_file else "cert_file")
                if self.tls_files
                else ("verify_hostname" if not self.verify_hostname else "verify_certificate")
            )
            raise ValueError(f"{key}: TLS options need tls:// server urls")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password_file: set password or password_file, not both")
        if self.token is not None and self.token_file is not None:
            raise ValueError("token_file: set token or token_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if has_password and not self.username:
            raise ValueError("username: a password needs a username")
        methods = [
            m
            for m, on in (
                ("credentials_file", self.credentials_file is not None),
                ("username", bool(self.username)),
                ("token", self.token is not None or self.token_file is not None),
            )
            if on
        ]
        if len(methods) > 1:
            raise ValueError(f"{methods[1]}: choose one of {' / '.join(methods)}, not several")
        return self

"""One TOML file, validated by pydantic, with errors that name the key path and the fix.

Sources and sinks are tables keyed by a name the operator picks (``[sources.line1]``,
``[sinks.central]``) with a ``type`` naming the adapter; each adapter owns its config model
(``adapters/<kind>/<type>/config.py``) and is looked up in ``agent.registry`` (entry points),
so a new adapter does not touch this file.

Secrets never live in the model as plain ``str``: they are ``SecretStr`` filled from a
``*_file`` key or a ``${ENV}`` reference, so repr, logs and status cannot show them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from agent.errors import ConfigError

log = logging.getLogger("edge_agent.config")
log.addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from agent.preflight import Check

# --------------------------------------------------------------------------- value types

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_UNITS |= {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_bytes(value: Any) -> int:
    """'2GiB', '500 MB', 1048576 -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 2GB")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"'{value}' is not a size (use e.g. 512MiB, 2GB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_duration(value: Any) -> float:
    """'5m', '250ms', '7d', '1h30m', 30 -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 7d")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"'{value}' is not a duration (use e.g. 250ms, 30s, 5m, 12h, 7d)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Model(BaseModel):
    """Strict base: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret(value: SecretStr | None, file: Path | None, key: str) -> str | None:
    """The secret from ``key`` or ``key_file``; a file's trailing newline is dropped."""
    if value is not None:
        return value.get_secret_value()
    if file is None:
        return None
    try:
        return file.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}_file", f"cannot read {file}: {exc.strerror}") from exc


# --------------------------------------------------------------------------- base models


class SourceConfig(Model):
    """Base of every ``[sources.NAME]`` table; adapters subclass it."""

    type: str
    #: the stream this source writes to; defaults to the source's name
    stream: str | None = None
    enabled: bool = True

    @field_validator("stream")
    @classmethod
    def _stream_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64)")
        return v

    def preflight(self, check: Check) -> None:
        """Open what `run` would open for this source (files, ports, directories) and
        report each problem through ``check`` with its key; start nothing."""


class SinkConfig(Model):
    """Base of every ``[sinks.NAME]`` table; adapters subclass it."""

    type: str

    def preflight(self, check: Check) -> None:
        """Open what `run` would open for this sink (TLS and secret files) and report each
        problem through ``check`` with its key; start nothing."""


#: An identifier that goes into URIs and MQTT topics as it is.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

#: Every ``pattern=`` of the config models, in words: an error shows these, never the regex.
PATTERN_WORDS = {
    NAME_PATTERN: "letters, digits, '.', '-' and '_' only, starting with a letter or digit",
}


class AgentSection(Model):
    id: str = Field(default_factory=socket.gethostname, min_length=1)
    plant: str = Field(default="plant", pattern=NAME_PATTERN)


class BufferSection(Model):
    path: Path = Path("edge-agent.db")
    durability: Literal["fsync", "os"] = "fsync"
    max_bytes: ByteSize = parse_bytes("1GiB")
    on_full: Literal["block", "drop_oldest"] = "block"
    keep_forwarded: Duration = 0.0
    checkpoint_interval: Duration = 300.0
    #: how long an MES source event id is remembered for de-duplication
    dedupe_window: Duration = 86400.0


class ForwarderSection(Model):
    max_events: int = Field(default=1000, ge=1, le=100_000)
    max_bytes: ByteSize = parse_bytes("1MiB")
    #: 5 ms, not 20: the linger is most of the end-to-end latency at moderate rates (a
    #: batch that is not full waits this long), and issue 16 asks p99 <= 15 ms at 1,000
    #: events/s; a full batch never waits, so throughput does not depend on it
    linger_ms: int = Field(default=5, ge=0, le=60_000)
    backoff_initial: Duration = 0.5
    #: the longest pause between retries: it is also how late delivery may resume after
    #: an outage ends (full jitter draws between 0 and this)
    backoff_max: Duration = 15.0
    auth_retry_interval: Duration = 60.0


class StreamSection(Model):
    sink: str | None = None
    priority: Literal["high", "normal"] = "normal"


class MetricsSection(Model):
    enabled: bool = True
    listen: str = "127.0.0.1:9464"


class LogSection(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "text", "json"] = "auto"


class Config(Model):
    agent: AgentSection = AgentSection()
    buffer: BufferSection = BufferSection()
    forwarder: ForwarderSection = ForwarderSection()
    streams: dict[str, StreamSection] = {}
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()
    sinks: dict[str, SinkConfig] = {}
    sources: dict[str, SourceConfig] = {}
    #: one line per deprecated key the file used (logged at load, shown by `config check`)
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._warnings

    def sink_for(self, stream: str) -> str:
        s = self.streams.get(stream)
        if s and s.sink:
            return s.sink
        return next(iter(self.sinks))

    def priority_of(self, stream: str) -> str:
        s = self.streams.get(stream)
        return s.priority if s else "normal"


# --------------------------------------------------------------------------- loading

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: Any, path: str) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else k) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise ConfigError(
                    path, f"environment variable {name} is not set (export it, or use a *_file key)"
                )
            return os.environ[name]

        return _ENV_REF.sub(sub, node)
    return node


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _first_error(exc: ValidationError, prefix: str) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; config/example.toml lists every key)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "string_pattern_mismatch":
        pattern = str((err.get("ctx") or {}).get("pattern", ""))
        words = PATTERN_WORDS.get(pattern, "not in the expected form (see config/example.toml)")
        msg = f"{words} (got {json.dumps(err.get('input'), ensure_ascii=False)})"
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    # A model-level validator names its key as "key: message" (it has no location).
    m = re.match(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): (.+)$", msg)
    if m and err["type"] == "value_error":
        loc, msg = (*loc, m.group(1)), m.group(2)
    return ConfigError(_loc(prefix, loc), msg)


def _validate_components(
    raw: dict[str, Any], kind: str, deprecations: list[str] | None = None
) -> dict[str, Any]:
    from agent import registry

    table = raw.get(kind, {})
    if not isinstance(table, dict):
        raise ConfigError(kind, "must be a table of named entries, e.g. [" + kind + ".NAME]")
    out: dict[str, Any] = {}
    for name, body in table.items():
        path = f"{kind}.{name}"
        if not isinstance(body, dict):
            raise ConfigError(path, "must be a table")
        body = dict(body)
        if "type" not in body and name in registry.known(kind):
            body["type"] = name
        type_ = body.get("type")
        if type_ is None:
            raise ConfigError(
                f"{path}.type",
                f"required key is missing (one of: {', '.join(registry.known(kind))})",
            )
        model = registry.config_model(kind, str(type_), path)
        try:
            context = {"path": path, "deprecations": deprecations}
            out[name] = model.model_validate(body, context=context)
        except ValidationError as exc:
            raise _first_error(exc, path) from None
        except ConfigError as exc:
            raise ConfigError(_loc(path, (exc.path,)) if exc.path else path, exc.message) from None
    return out


def parse_config(raw: dict[str, Any], *, base_dir: Path | None = None) -> Config:
    """Validate an already-parsed TOML document. Raises ConfigError (one line)."""
    raw = _expand_env(raw, "")
    deprecations: list[str] = []
    sinks = _validate_components(raw, "sinks", deprecations)
    sources = _validate_components(raw, "sources", deprecations)
    rest = {k: v for k, v in raw.items() if k not in ("sinks", "sources")}
    try:
        cfg = Config.model_validate(rest)
    except ValidationError as exc:
        raise _first_error(exc, "") from None
    cfg = cfg.model_copy(update={"sinks": sinks, "sources": sources})
    if base_dir is not None and not cfg.buffer.path.is_absolute():
        cfg = cfg.model_copy(
            update={"buffer": cfg.buffer.model_copy(update={"path": base_dir / cfg.buffer.path})}
        )
    _cross_check(cfg)
    cfg._warnings = tuple(deprecations)
    return cfg


def _cross_check(cfg: Config) -> None:
    if not cfg.sinks:
        raise ConfigError("sinks", "no sink configured (add e.g. [sinks.https] with a url)")
    for name, s in cfg.streams.items():
        if s.sink is not None and s.sink not in cfg.sinks:
            raise ConfigError(
                f"streams.{name}.sink",
                f"no sink named '{s.sink}' (configured: {', '.join(cfg.sinks)})",
            )
    if cfg.forwarder.backoff_max < cfg.forwarder.backoff_initial:
        raise ConfigError("forwarder.backoff_max", "must be >= forwarder.backoff_initial")
    host, _, port = cfg.metrics.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("metrics.listen", "must be HOST:PORT, e.g. 127.0.0.1:9464")


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError naming the file or the key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"{p}: no such file (pass -c PATH to a config file)") from None
    except OSError as exc:
        raise ConfigError("", f"{p}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"{p}: not UTF-8 text (byte {exc.start}; save the file as UTF-8)"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p}: not valid TOML: {exc}") from None
    cfg = parse_config(raw, base_dir=p.resolve().parent)
    for line in cfg.warnings:
        # dropped until logging is set up (the NullHandler on ``log``, no "last resort"
        # print): `config check` prints them itself, `run` logs them when run_agent loads
        # the file with logging in place
        log.warning("%s: %s", p, line)
    return cfg


def check_url(url: str, allow_insecure: bool, *, secure: str, plain: str) -> str:
    """Refuse a plain-text URL to anything but loopback unless allow_insecure says so."""
    parts = urlsplit(url)
    if parts.scheme not in (secure, plain) or not parts.hostname:
        raise ValueError(f"must be a {secure}:// URL with a host")
    if parts.scheme == plain and not allow_insecure and not is_loopback_host(parts.hostname):
        raise ValueError(f"must start with {secure}:// (set allow_insecure = true to override)")
    return url

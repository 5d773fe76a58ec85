"""The ``[sources.NAME]`` table of an OPC UA source (``type = "opcua"``).

One source is one client session to one server, writing to one stream. Nodes are named by
NodeId (``ns=2;s=Line1.Counter``, or ``nsu=URI;s=...`` so a namespace index that moves
between server restarts does not matter) or by browse path from the Root folder
(``Objects/2:Line1/2:Counter``). Every node says how it is sampled (sampling interval,
deadband, queue size) and what it becomes (raw ``mfg.signal.sampled`` and/or one business
event). Durations are seconds or strings such as ``250ms``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.config import Duration, Model, SourceConfig

if TYPE_CHECKING:
    from agent.preflight import Check

SecurityPolicy = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]

#: what a node can be mapped to besides (or instead of) the raw signal
EventKind = Literal[
    "mfg.signal.sampled",
    "mfg.production.counted",
    "mfg.machine.state_changed",
    "mfg.quality.hold",
]

MACHINE_STATES = ("running", "idle", "down", "setup")

_THUMB = re.compile(r"^[0-9A-Fa-f]{40}$")


def normalize_thumbprint(value: str) -> str:
    """'ab:cd:...' or 'AB CD ...' -> 'ABCD...' (40 upper-case hex digits, SHA-1)."""
    text = re.sub(r"[\s:]", "", value).upper()
    if not _THUMB.match(text):
        raise ValueError(
            "must be the server certificate's SHA-1 thumbprint: 40 hex digits, colons allowed "
            "(the refusal message of an untrusted server prints it)"
        )
    return text


class Attributes(Model):
    """Static business context copied into every event of a node."""

    plant: str | None = None
    line: str | None = None
    work_center: str | None = None
    machine: str | None = None
    item: str | None = None


class SubscriptionConfig(Model):
    """One OPC UA subscription: its publishing interval and how much a publish may carry."""

    publishing_interval: Duration = 1.0
    #: 0 lets the server decide; a limit keeps single publish responses small
    max_notifications_per_publish: int = Field(default=0, ge=0, le=1_000_000)
    priority: int = Field(default=0, ge=0, le=255)


class NodeConfig(Attributes):
    """One monitored item."""

    node_id: str | None = None
    browse_path: str | None = None
    #: subject of the events; defaults to the NodeId as configured (or the browse path)
    name: str | None = None
    subscription: str = "default"

    sampling_interval: Duration = 1.0
    #: the server keeps this many values per item between publishes; asked explicitly,
    #: since a requested size of 0 means "server default" (10,000 on an asyncua server)
    queue_size: int = Field(default=10, ge=1, le=100_000)
    discard_oldest: bool = True
    deadband_type: Literal["none", "absolute", "percent"] = "none"
    deadband: float = Field(default=0.0, ge=0)

    event: EventKind = "mfg.signal.sampled"
    #: also emit the raw mfg.signal.sampled when ``event`` is a business type
    raw: bool = True

    # mfg.production.counted
    unit: str = "EA"
    quantity_kind: Literal["good", "scrap"] = "good"
    #: largest value the counter reaches before it wraps to 0 (65535, 4294967295);
    #: without it a decrease is taken as a reset
    counter_max: int | None = Field(default=None, ge=1)
    work_order: str | None = None
    lot: str | None = None

    # mfg.machine.state_changed: value (as text: "0", "1", "true", "Running") -> state
    states: dict[str, Literal["running", "idle", "down", "setup"]] = {}

    # mfg.quality.hold_placed / hold_released
    #: values that mean "on hold" (booleans or enum values); anything else means released
    hold_values: list[bool | int | str] = [True]
    location: str | None = None
    reason: str | None = None

    #: after an outage, read the server's history for the gap (HistoryRead)
    backfill: bool = False

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Z0-9]{1,3}", v):
            raise ValueError("must be a UN/CEFACT rec. 20 code such as EA, KGM, MTR")
        return v

    @model_validator(mode="after")
    def _check(self) -> NodeConfig:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("set exactly one of node_id or browse_path")
        if self.deadband_type == "percent" and self.deadband > 100:
            raise ValueError("deadband is a percentage of the EURange here: use 0 to 100")
        if self.deadband_type == "none" and self.deadband:
            raise ValueError("deadband needs deadband_type = 'absolute' or 'percent'")
        if self.event == "mfg.machine.state_changed" and not self.states:
            raise ValueError(
                "a state node needs a value-to-state table, e.g. states = { 0 = 'idle', "
                "1 = 'running', 2 = 'down', 3 = 'setup' }"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or self.node_id or self.browse_path or "?"


class Config(SourceConfig):
    """An OPC UA client session: security, timing, and the nodes it monitors."""

    type: Literal["opcua"] = "opcua"
    endpoint: str

    security_policy: SecurityPolicy = "None"
    #: defaults to SignAndEncrypt when a policy is set
    security_mode: SecurityMode | None = None
    #: the agent's application instance certificate (DER or PEM) and key (PEM); when unset
    #: and a policy is set, one is generated under the agent's state directory
    certificate: Path | None = None
    private_key: Path | None = None
    #: must equal the URI in the certificate; read from the certificate when unset
    application_uri: str | None = None
    #: the OPC UA Part 12 PKI folder (trusted/certs, trusted/crl, issuers/certs, issuers/crl,
    #: rejected/; created when missing): trust a server by its own certificate or its CA
    pki_dir: Path | None = None
    #: refuse a CA-signed server certificate when its CA's CRL is not in the PKI
    #: (revocation status unknown); false accepts it with a warning
    require_crl: bool = True
    #: a flat folder of trusted server certificates (DER or PEM files), the older setting;
    #: used as one more trusted/certs
    trusted_certs_dir: Path | None = None
    #: or pin one server certificate by its SHA-1 thumbprint
    server_thumbprint: str | None = None

    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None

    #: default subscription's publishing interval; more subscriptions in ``subscriptions``
    publishing_interval: Duration = 1.0
    subscriptions: dict[str, SubscriptionConfig] = {}

    #: a connection is declared lost when no publish response or keep-alive came for this long
    liveness_timeout: Duration = Field(default=10.0, gt=0)
    connect_timeout: Duration = Field(default=10.0, gt=0)
    request_timeout: Duration = Field(default=5.0, gt=0)
    session_timeout: Duration = Field(default=60.0, gt=0)
    reconnect_initial: Duration = Field(default=1.0, gt=0)
    reconnect_max: Duration = Field(default=30.0, gt=0)
    #: after a security or login refusal, retry this slowly (the operator has to act)
    auth_retry_interval: Duration = Field(default=60.0, gt=0)

    #: notifications received but not yet committed; when full the client stops asking the
    #: server for more (backpressure: the server's per-item queues absorb, overflow is counted)
    max_pending: int = Field(default=50_000, ge=100, le=10_000_000)
    #: at most this many events per buffer append
    batch_max: int = Field(default=5_000, ge=1, le=100_000)
    #: wait this long for more notifications before an append
    batch_linger: Duration = 0.02
    #: longest outage that backfill (HistoryRead) tries to fill
    backfill_max: Duration = 3600.0

    #: static attributes that every node inherits unless it sets its own
    plant: str | None = None
    line: str | None = None
    work_center: str | None = None
    machine: str | None = None
    item: str | None = None

    nodes: list[NodeConfig] = Field(min_length=1)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError("must be an opc.tcp://HOST:PORT URL, e.g. opc.tcp://plc1:4840")
        return v

    @field_validator("server_thumbprint")
    @classmethod
    def _thumb(cls, v: str | None) -> str | None:
        return None if v is None else normalize_thumbprint(v)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.security_policy == "None":
            if self.security_mode not in (None, "None"):
                raise ValueError(
                    f"security_mode = '{self.security_mode}' needs a security_policy "
                    "(e.g. 'Basic256Sha256')"
                )
        elif self.security_mode == "None":
            raise ValueError("security_mode must be 'Sign' or 'SignAndEncrypt' with a policy")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both certificate and private_key, or neither")
        if self.security_policy != "None" and not (
            self.pki_dir or self.trusted_certs_dir or self.server_thumbprint
        ):
            raise ValueError(
                "a secured connection needs pki_dir (or trusted_certs_dir, or server_thumbprint) "
                "to check the server's certificate"
            )
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password needs a username")
        if self.username and self.password is None and self.password_file is None:
            raise ValueError("username needs password_file (or password)")
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_max must be >= reconnect_initial")
        names = {"default", *self.subscriptions}
        for i, node in enumerate(self.nodes):
            where = f"nodes[{i}] ({node.label})"
            if node.subscription not in names:
                raise ValueError(
                    f"{where}: subscription '{node.subscription}' is not defined "
                    f"(add [sources.NAME.subscriptions.{node.subscription}])"
                )
            attrs = self.attributes_of(node)
            if node.event == "mfg.production.counted" and not (node.work_order and "item" in attrs):
                raise ValueError(
                    f"{where}: a counter node needs work_order and item (set them on the node, "
                    "item may be set on the source)"
                )
            if node.event == "mfg.machine.state_changed" and not (
                "machine" in attrs or "work_center" in attrs
            ):
                raise ValueError(f"{where}: a state node needs machine or work_center")
            if node.event == "mfg.quality.hold" and "item" not in attrs:
                raise ValueError(f"{where}: a hold node needs item (on the node or the source)")
        return self

    def preflight(self, check: Check) -> None:
        """The application certificate (DER or PEM) and its key, the trust folder and the
        password file; a generated certificate needs nothing here (run makes it)."""
        cert = check.cert_and_key(
            "certificate", self.certificate, "private_key", self.private_key, der_ok=True
        )
        if cert is not None:
            from agent.errors import SourceError

            from . import security

            try:
                security.check_own_certificate(cert, Path(str(self.certificate)))
            except SourceError as exc:
                check.problem("certificate", str(exc))
            uri = security.application_uri_of(cert)
            if uri is None:
                check.problem(
                    "certificate",
                    f"{self.certificate} has no ApplicationUri in its SubjectAltName, which "
                    "OPC UA servers require (make one with: edge-agent opcua gen-cert)",
                )
            elif self.application_uri is not None and self.application_uri != uri:
                check.problem(
                    "application_uri",
                    f"'{self.application_uri}' differs from the URI in {self.certificate} "
                    f"('{uri}'): remove application_uri or make a matching certificate",
                )
        if self.trusted_certs_dir is not None:
            check.directory("trusted_certs_dir", self.trusted_certs_dir)
        if self.pki_dir is not None:
            # run creates the Part 12 folders in it and writes rejected certificates there
            check.creatable_directory("pki_dir", self.pki_dir)
        check.secret_file("password_file", self.password_file)

    @property
    def mode(self) -> str:
        if self.security_policy == "None":
            return "None"
        return self.security_mode or "SignAndEncrypt"

    def subscription(self, name: str) -> SubscriptionConfig:
        if name in self.subscriptions:
            return self.subscriptions[name]
        return SubscriptionConfig(publishing_interval=self.publishing_interval)

    def attributes_of(self, node: NodeConfig) -> dict[str, str]:
        """Static attributes of a node, inheriting the source's."""
        out: dict[str, str] = {}
        for key in ("plant", "line", "work_center", "machine", "item"):
            value = getattr(node, key) or getattr(self, key)
            if value is not None:
                out[key] = value
        return out

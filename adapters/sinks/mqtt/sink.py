"""The MQTT binding of the wire contract (section 4): one batch = one QoS 1 PUBLISH.

How it is driven
    paho-mqtt runs on the asyncio loop itself through its socket hooks: the loop watches
    the socket (``add_reader``/``add_writer``) and calls ``loop_read``/``loop_write``; a
    one-second tick calls ``loop_misc`` for keepalive. So every paho callback (CONNACK,
    PUBACK, disconnect) runs on the loop thread and resolves futures directly, with no
    locks. Only the blocking part of connecting (DNS, TCP, TLS handshake) runs in a worker
    thread; a callback paho fires there comes back through ``loop.call_soon_threadsafe``.

Connections
    Every connect uses a fresh paho client with a clean session. When a connection drops,
    every batch still waiting for its PUBACK is answered ``retry`` at once and the forwarder
    resends it under the same batch id; nothing relies on paho's own session resend.

Order
    ``send`` publishes in call order: everything before the PUBLISH happens under a FIFO
    lock, and one connection carries all batches, so the broker receives them in the order
    the forwarder handed them over. After a failure the sink holds back later batches of
    that stream (answering ``retry``) until the failed one is sent again, so a batch that
    was already queued cannot overtake the resend on the next connection.

Outcomes
    PUBACK reason < 0x80: accepted. Not connected, connection lost before PUBACK, no
    PUBACK within ``ack_timeout``: retry. Connection refused for credentials or
    authorisation (CONNACK 0x86, 0x87, 0x8A, 0x8C), a TLS certificate refused on either
    side, PUBACK 0x87 (not authorised for the topic) or 0x90 (topic invalid): auth.
    Payload over the broker's Maximum Packet Size (CONNACK) or ``max_packet_size``, PUBACK
    0x95: too_large. PUBACK 0x99 (payload format invalid): rejected.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from adapters.sinks.mqtt.config import Config
from agent.config import read_secret
from agent.errors import ConfigError, SinkError
from agent.interfaces import Batch, ComponentState, Outcome, SendResult, Sink, State
from agent.registry import AdapterContext
from agent.tasks import TaskScope
from agent.tls import TlsFileError

log = logging.getLogger("edge_agent.sink.mqtt")

CONTENT_TYPE = "application/cloudevents-batch+json"
#: the contract says gzip in the content type; "+gzip" is the RFC 8460 structured suffix
CONTENT_TYPE_GZIP = CONTENT_TYPE + "+gzip"
STATUS_CONTENT_TYPE = "application/json"

#: CONNACK reason codes that mean "the broker does not accept who we are"
AUTH_CONNACK = {0x86, 0x87, 0x8A, 0x8C}
_CONNACK_HINTS = {
    0x86: "check username and password / password_file",
    0x87: "check username and password / password_file or the client certificate, and the "
    "broker's ACL: it does not accept this client",
    0x8A: "the broker banned this client",
    0x8C: "the broker expects another authentication method",
    0x85: "the broker rejected client_id; set another one",
    0x84: 'the broker does not speak this MQTT version; try protocol = "3.1.1"',
}
#: after a failed batch, later batches of its stream wait at most this long for its resend
HOLD_TIMEOUT = 300.0
#: how long stop() waits for the offline status PUBACK and for DISCONNECT to go out
STOP_TIMEOUT = 2.0


class _Refused(Exception):
    """A connect attempt failed; ``auth`` says whether waiting alone will not help."""

    def __init__(self, reason: str, *, auth: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.auth = auth


@dataclass(eq=False, slots=True)
class _Pending:
    future: asyncio.Future[SendResult]
    batch: Batch | None  # None for the status message
    sent_at: float


@dataclass(slots=True)
class _Hold:
    epoch: str
    sequence: int
    until: float


class _PahoLog:
    """Takes paho's log calls: keeps its errors (socket, TLS) on the connection, since the
    last one explains a drop, and passes everything on at debug level. Formats lazily."""

    def __init__(self, conn: _Connection, sink: str) -> None:
        self._conn = conn
        self._sink = sink

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if level >= logging.ERROR:
            self._conn.errors.append(fmt % args)  # deque.append: fine from any thread
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sink %s: paho: " + fmt, self._sink, *args)


class _Connection:
    """One paho client and its socket. A new one for every connect attempt."""

    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.pending: dict[int, _Pending] = {}
        self.connack: asyncio.Future[tuple[ReasonCode, Properties]] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.fd: int | None = None
        self.closed = False
        self.max_packet_size: int | None = None
        #: paho's error log lines (socket and TLS errors); the last explains a drop
        self.errors: deque[str] = deque(maxlen=5)


def publish_packet_size(topic: bytes, properties_len: int, payload_len: int) -> int:
    """Bytes of a QoS 1 PUBLISH on the wire, as a broker's Maximum Packet Size counts them.

    ``properties_len`` is the length of the MQTT 5 property block including its own length
    prefix (0 for MQTT 3.1.1).
    """
    remaining = 2 + len(topic) + 2 + properties_len + payload_len
    return 1 + _varint_len(remaining) + remaining


def batch_properties_len(content_type: str, user: list[tuple[str, str]]) -> int:
    """Length of the property block _batch_properties builds, without paho packing it
    twice per batch: payload format indicator (2 bytes), content type (1 + 2 + n), each
    user property (1 + 2 + k + 2 + v), then the block's own variable-length prefix."""
    body = 2 + 3 + len(content_type.encode())
    body += sum(5 + len(k.encode()) + len(v.encode()) for k, v in user)
    return _varint_len(body) + body


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def _seq(n: int) -> str:
    return f"{n:020d}"


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rc_text(rc: ReasonCode) -> str:
    return f"{rc} (0x{rc.value:02X})"


def _close_socket(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        sock.close()


def _looks_like_cert_refusal(text: str) -> bool:
    t = text.lower()
    return "alert" in t and ("certificate" in t or "unknown ca" in t or "handshake" in t)


class MqttSink(Sink):
    """Publishes batches to ``<prefix>/<plant>/<stream>`` at QoS 1; see the module doc."""

    def __init__(self, name: str, config: Config, ctx: AdapterContext) -> None:
        for what, value in (("agent.id", ctx.agent_id), ("agent.plant", ctx.plant)):
            if not value or any(c in value for c in "/+#\x00"):
                raise ConfigError(what, f"'{value}' cannot be part of an MQTT topic (no / + #)")
        self.name = name
        self.max_in_flight = config.max_in_flight
        self._cfg = config
        self._ctx = ctx
        self._v5 = config.protocol == "5"
        self._prefix = f"{config.topic_prefix}/{ctx.plant}"
        self._status_topic = f"{self._prefix}/agents/{ctx.agent_id}/status"
        self._client_id = config.client_id or f"edge-agent-{ctx.agent_id}-sink-{name}"
        self._started_at = _now_rfc3339()
        self._state = ComponentState(state=State.STARTING, since=time.time())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tls: ssl.SSLContext | None = None
        self._password: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._scope: TaskScope | None = None
        #: one thread for the blocking part of connecting (DNS, TCP, TLS handshake)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: _Connection | None = None
        self._connecting = False
        self._stopping = False
        self._stopped = False
        self._changed = asyncio.Event()
        self._order = asyncio.Lock()
        self._holds: dict[str, _Hold] = {}
        #: PUBLISHes paho lets out before holding the rest back in order (paho's default,
        #: mosquitto's default Receive Maximum); lowered if a broker announces less
        self._inflight_limit = 20
        #: streams whose last PUBACK said "not authorised": shown in status until one passes
        self._denied: dict[str, str] = {}
        self._stats = {"published": 0, "acknowledged": 0, "failed": 0, "connects": 0}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load TLS material and credentials, then connect in the background.

        Raises SinkError for what the operator must fix in files (CA, key, password file);
        a broker that is down is not an error here: send() answers retry meanwhile.
        """
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tls = self._tls_context() if self._cfg.tls else None
        self._password = self._read_password()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"mqtt-connect-{self.name}")
        self._connecting = True
        self._scope = TaskScope(f"sink {self.name}")
        await self._scope.open()
        self._task = self._scope.spawn(self._run(), name=f"sink-{self.name}-mqtt")

    async def stop(self) -> None:
        """Say "offline" (retained), disconnect cleanly (no Last Will), end the task."""
        if self._stopped:
            return
        self._stopping = True
        self._notify()
        conn = self._conn
        if conn is not None and not conn.lost.done():
            if self._cfg.presence:
                sent = self._publish(
                    conn,
                    self._status_topic,
                    self._status("offline", "stopped"),
                    self._status_properties(),
                    True,
                )
                if isinstance(sent, _Pending):
                    await asyncio.wait({sent.future}, timeout=STOP_TIMEOUT)
            if not conn.lost.done():
                conn.client.disconnect()
                await asyncio.wait({conn.lost}, timeout=STOP_TIMEOUT)
            self._close(conn, "sink stopped")
        try:
            if self._task is not None:
                self._task.cancel()
            if self._scope is not None:
                await self._scope.close()  # raises TaskCrashed if _run crashed (a bug)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self._stopped = True
            self._set_state("stopped", None)

    def state(self) -> ComponentState:
        conn = self._conn
        self._state.detail = {
            "url": self._cfg.url,
            "protocol": self._cfg.protocol,
            "client_id": self._client_id,
            "in_flight": len(conn.pending) if conn else 0,
            "max_packet_size": conn.max_packet_size if conn else None,
            "receive_maximum": self._inflight_limit,
            "denied_streams": dict(self._denied),
            **self._stats,
        }
        return self._state

    # ------------------------------------------------------------------ send

    async def send(self, batch: Batch) -> SendResult:
        """Publish one batch and wait for its PUBACK; see the module doc for outcomes."""
        cfg = self._cfg
        payload = batch.payload
        if cfg.gzip:
            payload = gzip.compress(payload, compresslevel=5, mtime=0)
        topic = f"{self._prefix}/{batch.stream}"
        props, props_len = self._batch_properties(batch) if self._v5 else (None, 0)
        size = publish_packet_size(topic.encode(), props_len, len(payload))
        async with self._order:  # FIFO: publishes leave in call order
            ready = await self._ready()
            if isinstance(ready, SendResult):
                self._hold(batch)
                return ready
            conn = ready
            held = self._held(batch)
            if held is not None:
                return SendResult.retry(held)
            for limit, what in (
                (cfg.max_packet_size, "max_packet_size"),
                (conn.max_packet_size, "the broker's Maximum Packet Size"),
            ):
                if limit is not None and size > limit:
                    return SendResult.too_large(
                        f"{len(batch)} events make a {size}-byte PUBLISH, over {what} {limit}"
                    )
            sent = self._publish(conn, topic, payload, props, False, batch)
            if isinstance(sent, SendResult):
                self._hold(batch)
                return sent
        result = await sent.future
        if result.outcome in (Outcome.RETRY, Outcome.AUTH):
            self._hold(batch)
        return result

    def _batch_properties(self, batch: Batch) -> tuple[Properties, int]:
        """The contract's MQTT 5 properties and their packed length."""
        content_type = CONTENT_TYPE_GZIP if self._cfg.gzip else CONTENT_TYPE
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: no annotations
        props.ContentType = content_type
        props.PayloadFormatIndicator = 0 if self._cfg.gzip else 1
        user = [
            ("batch-id", batch.batch_id),
            ("stream", batch.stream),
            ("first-sequence", _seq(batch.first_sequence)),
            ("last-sequence", _seq(batch.last_sequence)),
            ("stream-epoch", batch.epoch),
        ]
        if self._cfg.gzip:
            user.append(("content-encoding", "gzip"))
        props.UserProperty = user
        return props, batch_properties_len(content_type, user)

    async def _ready(self) -> _Connection | SendResult:
        """The live connection; while a connect attempt runs, wait for it (bounded)."""
        assert self._loop is not None, "start() was not called"
        deadline = self._loop.time() + self._cfg.connect_timeout
        while True:
            if self._stopping:
                return SendResult.retry(f"sink {self.name} is stopping")
            conn = self._conn
            if conn is not None and not conn.lost.done():
                return conn
            remaining = deadline - self._loop.time()
            if not self._connecting or remaining <= 0:
                reason = self._state.last_error or "not connected to the broker"
                if self._state.state == "auth_failed":
                    return SendResult.auth(reason)
                return SendResult.retry(reason)
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                pass

    def _hold(self, batch: Batch) -> None:
        """Remember that ``batch`` must be sent again before later batches of its stream."""
        h = self._holds.get(batch.stream)
        if h is None or h.epoch != batch.epoch or batch.first_sequence < h.sequence:
            assert self._loop is not None
            self._holds[batch.stream] = _Hold(
                batch.epoch, batch.first_sequence, self._loop.time() + HOLD_TIMEOUT
            )

    def _held(self, batch: Batch) -> str | None:
        h = self._holds.get(batch.stream)
        if h is None:
            return None
        assert self._loop is not None
        if (
            h.epoch != batch.epoch
            or batch.first_sequence <= h.sequence
            or self._loop.time() > h.until
        ):
            del self._holds[batch.stream]
            return None
        return (
            f"batch from sequence {batch.first_sequence} waits: stream {batch.stream} must "
            f"first resend the batch from sequence {h.sequence}, which was not acknowledged"
        )

    def _publish(
        self,
        conn: _Connection,
        topic: str,
        payload: bytes,
        props: Properties | None,
        retain: bool,
        batch: Batch | None = None,
    ) -> _Pending | SendResult:
        assert self._loop is not None
        info = conn.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return SendResult.retry(f"publish failed: {mqtt.error_string(info.rc)}")
        pending = _Pending(self._loop.create_future(), batch, self._loop.time())
        conn.pending[info.mid] = pending
        if batch is not None:
            self._stats["published"] += 1
        return pending

    # ------------------------------------------------------------------ connection manager

    async def _run(self) -> None:
        """Connect, serve, reconnect with capped jittered backoff; until cancelled."""
        attempt = 0
        try:
            while not self._stopping:
                self._connecting = True
                try:
                    conn = await self._open()
                except _Refused as exc:
                    self._connecting = False
                    self._failed(exc)
                    await asyncio.sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                attempt = 0
                self._conn = conn
                self._connecting = False
                self._stats["connects"] += 1
                self._set_state("connected", None)
                log.info(
                    "sink %s connected to %s as %s (MQTT %s)",
                    self.name,
                    self._cfg.url,
                    self._client_id,
                    self._cfg.protocol,
                )
                self._notify()
                if self._cfg.presence:
                    self._announce(conn)
                reason = await self._serve(conn)
                self._conn = None
                self._close(conn, reason)
                if self._stopping:
                    break
                self._set_state("disconnected", reason)
                log.warning("sink %s lost the broker connection: %s", self.name, reason)
                self._notify()
                await asyncio.sleep(self._backoff(0))
        finally:
            self._connecting = False
            if self._conn is not None:
                self._close(self._conn, "sink stopped")
                self._conn = None
            self._notify()

    def _failed(self, exc: _Refused) -> None:
        previous = (self._state.state, self._state.last_error)
        state = "auth_failed" if exc.auth else "disconnected"
        self._set_state(state, exc.reason)
        if previous != (state, exc.reason):  # say it once, not every backoff round
            level = logging.ERROR if exc.auth else logging.WARNING
            log.log(level, "sink %s cannot connect: %s", self.name, exc.reason)
        self._notify()

    def _backoff(self, attempt: int) -> float:
        cap = min(self._cfg.reconnect_max, self._cfg.reconnect_min * 2 ** min(attempt, 30))
        return random.uniform(cap / 2, cap)

    async def _serve(self, conn: _Connection) -> str:
        """Tick keepalive and the PUBACK deadline until the connection is lost."""
        assert self._loop is not None
        while not conn.lost.done():
            await asyncio.wait({conn.lost}, timeout=1.0)
            if conn.lost.done():
                break
            conn.client.loop_misc()
            if conn.pending:
                oldest = next(iter(conn.pending.values()))
                if self._loop.time() - oldest.sent_at > self._cfg.ack_timeout:
                    self._lost(conn, f"no PUBACK within ack_timeout {self._cfg.ack_timeout:g}s")
        return conn.lost.result()

    async def _open(self) -> _Connection:
        """One attempt: TCP + TLS in a worker thread, then CONNACK on the loop."""
        assert self._loop is not None
        cfg = self._cfg
        where = f"{cfg.host}:{cfg.port}"
        conn = self._new_connection()
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no annotations
            properties.SessionExpiryInterval = 0
        connect = functools.partial(
            conn.client.connect,
            cfg.host,
            cfg.port,
            keepalive=int(cfg.keepalive),
            clean_start=True if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        assert self._executor is not None
        job = self._executor.submit(connect)
        try:
            rc = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # the thread cannot be interrupted: close what it opens once it is done
            job.add_done_callback(lambda _: _close_socket(conn.client))
            raise
        except ssl.SSLCertVerificationError as exc:
            self._close(conn, "tls")
            hint = "check ca_file" + (
                " and that url names a host the certificate lists" if cfg.verify_hostname else ""
            )
            raise _Refused(
                f"TLS to {where}: the broker's certificate was not accepted: "
                f"{exc.verify_message or exc} ({hint})",
                auth=True,
            ) from exc
        except ssl.SSLError as exc:
            self._close(conn, "tls")
            text = str(exc)
            if _looks_like_cert_refusal(text):
                raise _Refused(
                    f"TLS to {where}: the broker refused the client certificate: {exc.reason} "
                    "(check cert_file and key_file, and that the broker trusts their CA)",
                    auth=True,
                ) from exc
            raise _Refused(f"TLS handshake with {where} failed: {text}", auth=False) from exc
        except (OSError, ValueError) as exc:
            self._close(conn, "connect")
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise _Refused(f"cannot connect to {where}: {text}", auth=False) from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._close(conn, "connect")
            detail = conn.errors[-1] if conn.errors else mqtt.error_string(rc)
            raise self._early_close(f"cannot send CONNECT to {where}: {detail}", conn)
        self._attach(conn)
        either: set[asyncio.Future[Any]] = {conn.connack, conn.lost}
        try:
            await asyncio.wait(either, timeout=cfg.connect_timeout, return_when="FIRST_COMPLETED")
        except asyncio.CancelledError:
            self._close(conn, "sink stopped")
            raise
        if conn.connack.done():
            code, props = conn.connack.result()
            if code.is_failure:
                self._close(conn, "refused")
                advice = _CONNACK_HINTS.get(code.value)
                raise _Refused(
                    f"the broker at {where} refused the connection: {_rc_text(code)}"
                    + (f" ({advice})" if advice else ""),
                    auth=code.value in AUTH_CONNACK,
                )
            conn.max_packet_size = getattr(props, "MaximumPacketSize", None)
            receive_max = int(getattr(props, "ReceiveMaximum", 0) or 0)
            if 0 < receive_max < self._inflight_limit:
                # paho cannot lower its window on a live connection: reconnect with it
                self._inflight_limit = receive_max
                self._close(conn, "receive maximum")
                raise _Refused(
                    f"the broker at {where} accepts {receive_max} unacknowledged messages "
                    "(Receive Maximum); reconnecting with that window",
                    auth=False,
                )
            return conn
        if conn.lost.done():
            reason = conn.lost.result()
            self._close(conn, reason)
            raise self._early_close(
                f"the broker at {where} closed the connection before CONNACK: {reason}", conn
            )
        self._close(conn, "timeout")
        raise _Refused(
            f"no CONNACK from {where} within connect_timeout {cfg.connect_timeout:g}s",
            auth=False,
        )

    def _early_close(self, reason: str, conn: _Connection) -> _Refused:
        """A connection that ended before CONNACK. Under TLS this is how a broker refuses a
        client certificate: with TLS 1.3 it checks the certificate only after our side of
        the handshake completed, so connect() succeeded and the refusal arrives as an alert
        or a bare EOF on the first read."""
        if not self._cfg.tls:
            return _Refused(reason, auth=False)
        errors = " ".join(conn.errors)
        if _looks_like_cert_refusal(errors) or "EOF" in errors or not errors:
            return _Refused(
                f"{reason}: the broker refused the client certificate or requires one "
                "(check cert_file and key_file, and that the broker trusts their CA)",
                auth=True,
            )
        return _Refused(reason, auth=False)

    def _new_connection(self) -> _Connection:
        assert self._loop is not None
        cfg = self._cfg
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else True,
            reconnect_on_failure=False,
        )
        conn = _Connection(client, self._loop)
        client.connect_timeout = cfg.connect_timeout
        client.max_inflight_messages_set(self._inflight_limit)
        if cfg.username:
            client.username_pw_set(cfg.username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
            if cfg.tls_verification_off:
                client.tls_insecure_set(True)  # paho checks the host name itself otherwise
        if cfg.presence:
            will_props = None
            if self._v5:
                will_props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]  # paho: no annotations
                will_props.ContentType = STATUS_CONTENT_TYPE
            client.will_set(
                self._status_topic,
                self._status("offline", "connection lost (Last Will)"),
                qos=1,
                retain=True,
                properties=will_props,
            )
        on = functools.partial(self._threadsafe, conn)
        client.on_connect = on(self._on_connect)
        client.on_disconnect = on(self._on_disconnect)
        client.on_publish = on(self._on_publish)
        # a logger, not on_log: paho formats every debug line for on_log (costly per PUBLISH)
        client.enable_logger(self._paho_log(conn))  # type: ignore[arg-type]
        return conn

    # ------------------------------------------------------------------ socket plumbing

    def _attach(self, conn: _Connection) -> None:
        """Hand the connected socket to the asyncio loop (called on the loop thread)."""
        assert self._loop is not None
        loop = self._loop
        sock = conn.client.socket()
        if sock is None:
            self._lost(conn, "socket closed while connecting")
            return
        fd = sock.fileno()
        conn.fd = fd

        def register_write(_c: Any, _u: Any, _s: Any) -> None:
            if not conn.closed:
                loop.add_writer(fd, self._writable, conn)

        def unregister_write(_c: Any, _u: Any, _s: Any) -> None:
            if not conn.closed:
                loop.remove_writer(fd)

        def socket_close(_c: Any, _u: Any, _s: Any) -> None:
            if not conn.closed and conn.fd is not None:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
                conn.fd = None

        conn.client.on_socket_register_write = register_write
        conn.client.on_socket_unregister_write = unregister_write
        conn.client.on_socket_close = socket_close
        loop.add_reader(fd, self._readable, conn)
        if conn.client.want_write():
            loop.add_writer(fd, self._writable, conn)

    def _readable(self, conn: _Connection) -> None:
        try:
            client = conn.client
            client.loop_read()
            # TLS may hold decrypted bytes the selector cannot see
            while not conn.closed and (sock := client.socket()) is not None:
                pending = getattr(sock, "pending", None)
                if pending is None or pending() <= 0:
                    break
                client.loop_read()
        except Exception as exc:  # a bug here must not kill the loop's selector callback
            log.exception("sink %s: error reading from the broker", self.name)
            self._lost(conn, f"internal error while reading: {exc}")

    def _writable(self, conn: _Connection) -> None:
        try:
            if not conn.closed:
                conn.client.loop_write()
        except Exception as exc:
            log.exception("sink %s: error writing to the broker", self.name)
            self._lost(conn, f"internal error while writing: {exc}")

    def _close(self, conn: _Connection, reason: str) -> None:
        """Forget the connection: stop watching its socket, close it, answer its waiters."""
        self._lost(conn, reason)
        if conn.closed:
            return
        conn.closed = True
        if conn.fd is not None and self._loop is not None:
            self._loop.remove_reader(conn.fd)
            self._loop.remove_writer(conn.fd)
            conn.fd = None
        sock = conn.client.socket()
        if sock is not None:
            sock.close()

    def _lost(self, conn: _Connection, reason: str) -> None:
        """The connection is gone: every batch without PUBACK is answered retry now."""
        if not conn.lost.done():
            conn.lost.set_result(reason)
        pending, conn.pending = conn.pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_result(SendResult.retry(f"connection lost before PUBACK: {reason}"))
        if self._conn is conn and not self._stopping:
            self._notify()

    # ------------------------------------------------------------------ paho callbacks

    def _threadsafe(self, conn: _Connection, fn: Callable[..., None]) -> Callable[..., None]:
        """paho calls back on the loop thread, except while connect() runs in a worker."""

        def call(*args: Any) -> None:
            if threading.get_ident() == self._loop_thread:
                fn(conn, *args)
            elif self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(fn, conn, *args)

        return call

    def _on_connect(
        self, conn: _Connection, _c: Any, _u: Any, _f: Any, rc: ReasonCode, props: Properties
    ) -> None:
        if not conn.connack.done():
            conn.connack.set_result((rc, props))

    def _on_disconnect(
        self, conn: _Connection, _c: Any, _u: Any, flags: Any, rc: ReasonCode, _p: Any
    ) -> None:
        if self._stopping and not flags.is_disconnect_packet_from_server:
            reason = "sink stopped"
        elif flags.is_disconnect_packet_from_server:
            reason = f"the broker disconnected us: {_rc_text(rc)}"
        elif conn.errors:
            reason = conn.errors[-1]
        else:
            reason = "the broker closed the connection"
        self._lost(conn, reason)

    def _on_publish(
        self, conn: _Connection, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any
    ) -> None:
        pending = conn.pending.pop(mid, None)
        if pending is None:
            return
        result = self._puback_result(rc)
        batch = pending.batch
        if batch is None:
            if result.outcome is not Outcome.ACCEPTED:
                log.warning("sink %s: status message not accepted: %s", self.name, result.reason)
        elif result.outcome is Outcome.ACCEPTED:
            self._stats["acknowledged"] += 1
            if self._denied.pop(batch.stream, None) is not None and not self._denied:
                if self._state.state == "connected":
                    self._state.clear_error()
        else:
            self._stats["failed"] += 1
            if result.outcome is Outcome.AUTH:
                self._denied[batch.stream] = result.reason
                self._state.note_error(f"stream {batch.stream}: {result.reason}")
            log.warning(
                "sink %s: broker did not accept batch: %s",
                self.name,
                result.reason,
                extra={
                    "stream": batch.stream,
                    "batch_id": batch.batch_id,
                    "first_sequence": batch.first_sequence,
                    "last_sequence": batch.last_sequence,
                    "sink": self.name,
                    "outcome": result.outcome.value,
                },
            )
        if not pending.future.done():
            pending.future.set_result(result)

    def _puback_result(self, rc: ReasonCode) -> SendResult:
        if not rc.is_failure:
            return SendResult.accepted(rc.value)
        text = f"PUBACK {_rc_text(rc)}"
        if rc.value == 0x87:
            return SendResult.auth(
                f"{text}: this client may not publish to {self._prefix}/<stream> "
                "(fix the broker's ACL; the backlog is kept)",
                rc.value,
            )
        if rc.value == 0x90:
            return SendResult.auth(f"{text}: the broker refuses the topic name", rc.value)
        if rc.value == 0x95:
            return SendResult.too_large(text, rc.value)
        if rc.value == 0x99:
            return SendResult.rejected(text, rc.value)
        return SendResult.retry(text, rc.value)

    def _paho_log(self, conn: _Connection) -> _PahoLog:
        return _PahoLog(conn, self.name)

    # ------------------------------------------------------------------ helpers

    def _status_properties(self) -> Properties | None:
        """Every presence message (online, stopped) says it is JSON, as the Last Will does."""
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: no annotations
        props.ContentType = STATUS_CONTENT_TYPE
        return props

    def _announce(self, conn: _Connection) -> None:
        self._publish(
            conn, self._status_topic, self._status("online"), self._status_properties(), True
        )

    def _status(self, status: str, reason: str | None = None) -> bytes:
        body: dict[str, Any] = {
            "status": status,
            "agentid": self._ctx.agent_id,
            "plant": self._ctx.plant,
            "version": self._ctx.version,
            "started_at": self._started_at,
            "client_id": self._client_id,
        }
        if reason is not None:
            body["reason"] = reason
        if reason == "stopped":
            body["stopped_at"] = _now_rfc3339()
        return orjson.dumps(body)

    def _notify(self) -> None:
        """Wake every send() waiting in _ready()."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_state(self, state: str, error: str | None) -> None:
        self._state.change(state, error)

    def _tls_context(self) -> ssl.SSLContext:
        try:
            return self._cfg.tls_context()
        except TlsFileError as exc:
            raise SinkError(f"sinks.{self.name}.{exc}") from exc
        except OSError as exc:  # no OS trust store
            raise SinkError(f"sinks.{self.name}: {exc}") from exc

    def _read_password(self) -> str | None:
        try:
            secret = read_secret(self._cfg.password, self._cfg.password_file, "password")
        except ConfigError as exc:
            raise SinkError(f"sinks.{self.name}.{exc}") from exc
        if secret:
            try:
                from agent.logs import register_secret
            except ImportError:  # logging module not there: nothing to register with
                pass
            else:
                register_secret(secret)
        return secret


def build(name: str, config: Config, ctx: AdapterContext) -> MqttSink:
    return MqttSink(name, config, ctx)

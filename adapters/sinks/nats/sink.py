"""The NATS JetStream binding of the wire contract: one batch = one JetStream publish.

Subject and headers
    A batch goes to ``<subject_prefix>.<plant>.<stream>`` with the HTTPS binding's headers
    (``Idempotency-Key``, ``X-Edge-Stream``, ``X-Edge-First-Sequence``,
    ``X-Edge-Last-Sequence``, ``X-Edge-Stream-Epoch``, ``Content-Type``) plus
    ``Nats-Msg-Id`` = the batch id, which JetStream deduplicates on within the stream's
    duplicate window, and ``Nats-Expected-Stream`` so a subject captured by another stream
    is refused instead of landing somewhere nobody reads.

Outcomes
    PubAck: accepted (``duplicate: true`` too: the stream already holds that batch; it is
    counted). Not connected, connection lost before the PubAck, no PubAck within
    ``ack_timeout``, no responders (the stream's leader is being elected), JetStream 503 or
    a full stream: retry. Credentials refused, a permissions violation, no stream or another
    stream capturing our subject: auth (keep everything, retry slowly, loudly). Payload and
    headers over the server's ``max_payload`` or the stream's ``max_msg_size``: too_large.

Connections
    The sink runs its own connect loop (one server at a time, round robin, capped
    exponential back-off with full jitter; after credentials are refused it waits the
    agent's ``auth_retry_interval``), so a refused password is never hammered and 100
    agents coming back after a central outage do not reconnect in lock step. nats-py's own
    reconnect is off: a lost connection fails the batch in flight at once (retry, same
    Nats-Msg-Id) instead of queueing it in a client buffer.

Order
    One batch in flight per stream (``max_in_flight = 1``): a batch is published only after
    the previous one's PubAck, and a retried batch keeps its Nats-Msg-Id, so the stream
    holds each batch once and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from typing import Any

from adapters.sinks.nats.config import Config
from agent.config import read_secret
from agent.errors import ConfigError, SinkError
from agent.event import format_sequence
from agent.interfaces import Batch, ComponentState, SendResult, Sink, State
from agent.registry import AdapterContext
from agent.tasks import TaskScope, captured
from agent.tls import TlsFileError

log = logging.getLogger("edge_agent.sink.nats")

CONTENT_TYPE = "application/cloudevents-batch+json"
#: JetStream error codes (nats-server's errors.json) that mean "our configuration is wrong"
_JS_CONFIG_ERRORS = {10060: "the subject is captured by another stream than configured"}
#: ... "the message is too big for the stream"
_JS_TOO_LARGE = {10054}
#: the reconnect back-off doubles from reconnect_wait up to this
RECONNECT_MAX = 30.0


def header_bytes(headers: dict[str, str]) -> int:
    """Size of the NATS/1.0 header block as the server counts it against max_payload."""
    return len(b"NATS/1.0\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


def retry_horizon(ctx: AdapterContext, ack_timeout: float) -> float:
    """The longest time between a publish whose PubAck was lost and its resend, while the
    agent runs: one ack timeout plus the longest pause the forwarder takes before retrying
    (``forwarder.backoff_max``, or ``forwarder.auth_retry_interval`` after a refusal)."""
    return ack_timeout + max(ctx.backoff_max, ctx.auth_retry_interval)


def _may_hide_an_alert(exc: BaseException) -> bool:
    """A reset or an EOF while connecting over TLS. With TLS 1.3 the server checks our client
    certificate after the handshake; when our CONNECT crosses its refusal, the reset that
    answers the CONNECT makes the kernel drop the alert that said why, so the cause is
    unknown from this error alone."""
    return isinstance(exc, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError) or (
        "unexpected eof" in str(exc).lower()
    )


async def _tls_alert(url: str, tls: ssl.SSLContext, within: float = 2.0) -> str | None:
    """Ask the server again, writing nothing after the handshake, and read its verdict: the
    TLS alert it refuses our certificate with, or None (it accepted it, or said nothing).
    One extra connection, only after a connect failed in a way that hides the cause."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    writer = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, parts.port or 4222)
            await reader.readline()  # the server's INFO, in plain text before the upgrade
            await writer.start_tls(tls, server_hostname=host)
            await reader.read(1)
    except ssl.SSLError as exc:
        if "alert" in str(exc).lower():
            return f"{type(exc).__name__}: {exc}"
    except (OSError, TimeoutError):
        pass
    finally:
        if writer is not None:
            writer.close()
    return None


class _Refused(Exception):
    def __init__(self, reason: str, *, auth: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.auth = auth


class NatsSink(Sink):
    """Publishes batches into a JetStream stream; see the module doc."""

    max_in_flight = 1

    def __init__(self, name: str, config: Config, ctx: AdapterContext) -> None:
        for what, value in (("agent.plant", ctx.plant),):
            if not value or any(c in value for c in ".*> \t\x00"):
                raise ConfigError(what, f"'{value}' cannot be a NATS subject token (no . * >)")
        self.name = name
        self._cfg = config
        self._ctx = ctx
        self._prefix = f"{config.subject_prefix}.{ctx.plant}"
        self._state = ComponentState(state=State.STARTING, since=time.time())
        self._nc: Any = None
        self._js: Any = None
        self._lost: asyncio.Future[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._scope: TaskScope | None = None
        self._tls: ssl.SSLContext | None = None
        self._auth: dict[str, Any] = {}
        self._stopping = False
        #: why publishing cannot work at all (no stream, wrong stream): answered as auth
        self._config_problem: str | None = None
        #: resolved by the error callback when the server denies the publish in flight
        self._denied: asyncio.Future[str] | None = None
        self._last_error: str | None = None
        self._auth_failed = False
        self._connected = asyncio.Event()
        self._server: str | None = None
        self._max_msg_size: int | None = None
        self._stream_check: dict[str, Any] = {}
        self._stats = {
            "published": 0,
            "acknowledged": 0,
            "duplicates": 0,
            "failed": 0,
            "connects": 0,
            "last_stream_sequence": 0,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load TLS files and secrets (SinkError when they are unusable), then connect in
        the background: a cluster that is down is not an error here."""
        if self._task is not None:
            return
        self._tls = self._tls_context() if self._cfg.tls else None
        self._auth = self._credentials()
        self._scope = TaskScope(f"sink {self.name}")
        await self._scope.open()
        self._task = self._scope.spawn(self._run(), name=f"sink-{self.name}-nats")

    async def stop(self) -> None:
        if self._stopping and self._task is None:
            return
        self._stopping = True
        try:
            if self._task is not None:
                self._task.cancel()
            if self._scope is not None:
                await self._scope.close()  # raises TaskCrashed if _run crashed (a bug)
        finally:
            self._task = None
            await self._close_conn("sink stopped")
            self._set_state("stopped", None)

    def state(self) -> ComponentState:
        self._state.detail = {
            "servers": self._cfg.servers,
            "server": self._server,
            "stream": self._cfg.stream,
            "subject": f"{self._prefix}.<stream>",
            "stream_check": dict(self._stream_check),
            **self._stats,
        }
        return self._state

    def _set_state(self, state: str, error: str | None) -> None:
        self._state.change(state, error)
        if error is not None:
            self._last_error = error

    def _tls_context(self) -> ssl.SSLContext:
        try:
            return self._cfg.tls_context()
        except TlsFileError as exc:
            raise SinkError(f"sinks.{self.name}.{exc}") from exc
        except OSError as exc:  # no OS trust store
            raise SinkError(f"sinks.{self.name}: {exc}") from exc

    def _credentials(self) -> dict[str, Any]:
        c = self._cfg
        key = f"sinks.{self.name}"
        out: dict[str, Any] = {}
        if c.credentials_file is not None:
            try:
                c.credentials_file.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"{key}.credentials_file", f"cannot read {c.credentials_file}: {exc.strerror}"
                ) from exc
            out["user_credentials"] = str(c.credentials_file)
        if c.username:
            out["user"] = c.username
            out["password"] = read_secret(c.password, c.password_file, f"{key}.password") or ""
        token = read_secret(c.token, c.token_file, f"{key}.token")
        if token:
            out["token"] = token
        return out

    # ------------------------------------------------------------------ connecting

    async def _run(self) -> None:
        """The connect loop; an unexpected error is logged and the loop starts again."""
        while not self._stopping:
            try:
                await self._connect_loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a library surprise: never stop connecting
                log.exception("sink %s: connect loop failed; again in 5 s", self.name)
                self._set_state("error", f"internal error: {exc}")
                await self._close_conn("internal error")
                await asyncio.sleep(5)

    async def _connect_loop(self) -> None:
        servers = self._cfg.servers
        attempt = 0
        index = random.randrange(len(servers))  # noqa: S311 - spread agents over servers
        while not self._stopping:
            failures: list[_Refused] = []
            for _ in range(len(servers)):
                url = servers[index % len(servers)]
                index += 1
                try:
                    await self._connect(url)
                except _Refused as exc:
                    failures.append(exc)
                    if exc.auth:
                        break
                    continue
                attempt = 0
                failures = []
                await self._check_stream()
                assert self._lost is not None
                why = await self._lost
                self._connected.clear()
                if not self._stopping:
                    log.warning("sink %s: connection to %s lost: %s", self.name, url, why)
                    self._set_state("disconnected", f"connection to {url} lost: {why}")
                break
            if not failures:
                continue  # a lost connection: try the next server at once
            last = failures[-1]
            if last.auth:
                self._auth_failed = True
                self._set_state("auth_failed", last.reason)
                log.error(
                    "sink %s: THE NATS SERVER REFUSES OUR CREDENTIALS: %s. Nothing is dropped; "
                    "trying again in %.0f s.",
                    self.name,
                    last.reason,
                    self._ctx.auth_retry_interval,
                )
                await asyncio.sleep(self._ctx.auth_retry_interval)
                continue
            attempt += 1
            cap = min(RECONNECT_MAX, self._cfg.reconnect_wait * 2 ** min(attempt, 10))
            delay = random.uniform(cap / 2, cap)  # noqa: S311 - equal jitter
            reason = "; ".join(f.reason for f in failures)
            self._set_state("disconnected", reason)
            log.warning(
                "sink %s: cannot connect to any NATS server (%s); again in %.1f s",
                self.name,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _connect(self, url: str) -> None:
        import nats
        import nats.errors

        loop = asyncio.get_running_loop()
        lost: asyncio.Future[str] = loop.create_future()

        async def on_error(exc: Exception) -> None:
            text = f"{type(exc).__name__}: {exc}".strip()
            if "permissions violation" in str(exc).lower():
                denied = self._denied
                if denied is not None and not denied.done():
                    denied.set_result(f"{exc} (check the NATS user's publish permissions)")
            log.debug("sink %s: nats error: %s", self.name, text)
            self._last_error = text

        this: list[Any] = []  # the connection, once made

        def gone(why: str) -> None:
            if not lost.done():
                lost.set_result(why)
            # say so at once: the connect loop may be busy (the stream check) until it
            # sees the loss; not for a close of our own (_close_conn drops self._nc first)
            if this and self._nc is this[0] and not self._stopping:
                self._set_state("disconnected", f"connection to {url} lost: {lost.result()}")

        async def on_closed() -> None:
            gone(self._last_error or "closed")

        async def on_disconnected() -> None:
            gone(self._last_error or "disconnected")

        kw: dict[str, Any] = {
            "servers": [url],
            "name": f"edge-agent-{self._ctx.agent_id}-sink-{self.name}",
            "allow_reconnect": False,
            "connect_timeout": self._cfg.connect_timeout,
            "error_cb": on_error,
            "closed_cb": on_closed,
            "disconnected_cb": on_disconnected,
            "pending_size": 0,
            **self._auth,
        }
        if self._tls is not None:
            kw["tls"] = self._tls
            from urllib.parse import urlsplit

            kw["tls_hostname"] = urlsplit(url).hostname
        self._last_error = None
        try:
            nc = await nats.connect(**kw)
        except nats.errors.AuthorizationError as exc:
            raise _Refused(f"{url}: authorization violation ({exc})", auth=True) from exc
        except ssl.SSLCertVerificationError as exc:
            raise _Refused(
                f"{url}: TLS verification failed: {exc} (check ca_file)", auth=True
            ) from exc
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            text = f"{type(exc).__name__}: {exc}".strip(": ")
            low = text.lower()
            if isinstance(exc, ssl.SSLError) and "alert" in low:
                # the server refused our client certificate (mutual TLS)
                raise _Refused(f"{url}: TLS refused by the server: {text} (check cert_file)",
                               auth=True) from exc  # fmt: skip
            if _may_hide_an_alert(exc) and self._tls is not None and self._cfg.cert_file:
                alert = await _tls_alert(url, self._tls)
                if alert is not None:
                    raise _Refused(f"{url}: TLS refused by the server: {alert} (check "
                                   "cert_file)", auth=True) from exc  # fmt: skip
            if "authorization" in low or "authentication" in low:
                raise _Refused(f"{url}: {text}", auth=True) from exc
            raise _Refused(f"{url}: {text}", auth=False) from exc
        self._nc = nc
        this.append(nc)
        self._js = nc.jetstream(timeout=self._cfg.ack_timeout)
        self._lost = lost
        self._server = url
        self._auth_failed = False
        self._stats["connects"] += 1
        self._connected.set()
        if not lost.done():  # a server killed as we connected is not "connected"
            self._set_state("connected", None)
        log.info("sink %s: connected to %s (max_payload %d)", self.name, url, nc.max_payload)

    async def _close_conn(self, why: str) -> None:
        nc, self._nc = self._nc, None
        self._connected.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(why)

    async def _check_stream(self) -> None:
        """Stream exists, captures our subjects, dedupes long enough: say loudly if not."""
        cfg = self._cfg
        key = f"sinks.{self.name}.stream"
        subject = f"{self._prefix}.x"
        check: dict[str, Any] = {"stream": cfg.stream}
        try:
            info = await self._js.stream_info(cfg.stream)
        except Exception as exc:  # noqa: BLE001 - reported, then every send says so
            text = f"{type(exc).__name__}: {exc}"
            if "not found" in text.lower() or "10059" in text:
                self._config_problem = (
                    f"{key}: JetStream stream {cfg.stream!r} does not exist; create it with "
                    f"subjects [{self._prefix}.>] (see docs/nats.md)"
                )
            else:
                log.warning("sink %s: cannot read stream %s: %s", self.name, cfg.stream, text)
                check["error"] = text
                self._stream_check = check
                return
            log.error("sink %s: %s", self.name, self._config_problem)
            self._set_state("error", self._config_problem)
            check["error"] = self._config_problem
            self._stream_check = check
            return
        subjects = list(info.config.subjects or [])
        covered = any(_subject_matches(pattern, subject) for pattern in subjects)
        check.update(
            subjects=subjects,
            duplicate_window=info.config.duplicate_window,
            replicas=info.config.num_replicas,
            max_msg_size=info.config.max_msg_size,
        )
        msg_size = info.config.max_msg_size
        self._max_msg_size = msg_size if msg_size and msg_size > 0 else None
        if not covered:
            self._config_problem = (
                f"{key}: stream {cfg.stream!r} captures {subjects}, not {self._prefix}.> "
                "(add that subject to the stream, or fix subject_prefix / agent.plant)"
            )
            log.error("sink %s: %s", self.name, self._config_problem)
            self._set_state("error", self._config_problem)
            check["error"] = self._config_problem
        else:
            self._config_problem = None
        horizon = retry_horizon(self._ctx, cfg.ack_timeout)
        window = float(info.config.duplicate_window or 0)
        check["retry_horizon"] = horizon
        check["dedupe_ok"] = window >= horizon
        if window < horizon:
            log.error(
                "sink %s: %s: duplicate_window of stream %r is %.0f s, shorter than this "
                "agent's retry horizon of %.0f s (sinks.%s.ack_timeout + "
                "forwarder.auth_retry_interval / backoff_max): a resent batch may be stored "
                "twice; raise the stream's duplicate_window",
                self.name,
                key,
                cfg.stream,
                window,
                horizon,
                self.name,
            )
        self._stream_check = check

    # ------------------------------------------------------------------ send

    def _headers(self, batch: Batch) -> dict[str, str]:
        return {
            "Nats-Msg-Id": batch.batch_id,
            "Nats-Expected-Stream": self._cfg.stream,
            "Content-Type": CONTENT_TYPE,
            "Idempotency-Key": batch.batch_id,
            "X-Edge-Stream": batch.stream,
            "X-Edge-First-Sequence": format_sequence(batch.first_sequence),
            "X-Edge-Last-Sequence": format_sequence(batch.last_sequence),
            "X-Edge-Stream-Epoch": batch.epoch,
        }

    async def send(self, batch: Batch) -> SendResult:
        import nats.errors
        import nats.js.errors

        nc, js, lost = self._nc, self._js, self._lost
        if nc is None or lost is None or lost.done() or not nc.is_connected:
            reason = self._last_error or "not connected"
            if self._auth_failed:
                return SendResult.auth(f"NATS credentials refused: {reason}")
            return SendResult.retry(f"not connected to NATS ({reason})")
        if self._config_problem is not None:
            await self._check_stream()  # fixed meanwhile (stream created, subject added)?
            if self._config_problem is not None:
                return SendResult.auth(self._config_problem)
        payload = batch.payload
        headers = self._headers(batch)
        size = len(payload) + header_bytes(headers)
        for limit, what in (
            (nc.max_payload, "the server's max_payload"),
            (self._max_msg_size, f"stream {self._cfg.stream}'s max_msg_size"),
        ):
            if limit is not None and size > limit:
                return SendResult.too_large(
                    f"{len(batch)} events make a {size}-byte message, over {what} {limit}"
                )
        subject = f"{self._prefix}.{batch.stream}"
        self._stats["published"] += 1
        denied: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._denied = denied
        # the publish races a lost connection and a denial; its task ends in this call
        async with asyncio.TaskGroup() as tg:
            pub = tg.create_task(
                captured(
                    js.publish, subject, payload, timeout=self._cfg.ack_timeout, headers=headers
                ),
                name=f"sink-{self.name}-publish",
            )
            racing: set[asyncio.Future[Any]] = {pub, lost, denied}
            try:
                done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            finally:  # lost, denied, or cancelled: the publish is not waited for
                self._denied = None
                if not pub.done():
                    pub.cancel()
        if pub not in done:
            self._stats["failed"] += 1
            if denied.done():
                reason = f"publish to {subject} denied: {denied.result()}"
                self._set_state("auth_failed", reason)
                return SendResult.auth(reason)
            return SendResult.retry(f"connection lost before the PubAck ({lost.result()})")
        try:
            ack = pub.result().get()
        except nats.errors.TimeoutError:
            self._stats["failed"] += 1
            return SendResult.retry(
                f"no PubAck within ack_timeout {self._cfg.ack_timeout:g} s from {self._server}"
            )
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
            self._stats["failed"] += 1
            return SendResult.retry(
                f"no JetStream stream answered on {subject} (leader election, or the stream "
                f"{self._cfg.stream} is missing)"
            )
        except nats.js.errors.APIError as exc:
            self._stats["failed"] += 1
            return self._classify_api_error(exc)
        except nats.errors.MaxPayloadError:
            return SendResult.too_large(f"{size}-byte message over the server's max_payload")
        except (nats.errors.Error, OSError) as exc:
            self._stats["failed"] += 1
            text = f"{type(exc).__name__}: {exc}"
            if "permissions violation" in text.lower():
                return SendResult.auth(text)
            return SendResult.retry(f"publish failed: {text}")
        if ack.duplicate:
            self._stats["duplicates"] += 1
        self._stats["acknowledged"] += 1
        self._stats["last_stream_sequence"] = ack.seq
        if self._state.state != "connected":
            self._set_state("connected", None)
        return SendResult.accepted()

    def _classify_api_error(self, exc: Any) -> SendResult:
        code = getattr(exc, "code", None)
        err_code = getattr(exc, "err_code", None)
        text = f"JetStream error {code}/{err_code}: {getattr(exc, 'description', exc)}"
        if err_code in _JS_TOO_LARGE:
            return SendResult.too_large(text)
        if err_code in _JS_CONFIG_ERRORS:
            return SendResult.auth(f"{text} ({_JS_CONFIG_ERRORS[err_code]})")
        if code in (401, 403):
            return SendResult.auth(text)
        # 503 (no leader yet), insufficient resources, stream full with discard new: transient
        return SendResult.retry(text)


def _subject_matches(pattern: str, subject: str) -> bool:
    """Whether a stream subject ``pattern`` (with * and >) captures ``subject``."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def build(name: str, config: Config, ctx: AdapterContext) -> NatsSink:
    return NatsSink(name, config, ctx)

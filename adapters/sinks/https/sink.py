"""The HTTPS sink: one POST per batch, exactly the contract's HTTPS binding.

It only classifies the answer into a SendResult; the forwarder decides what to do next.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import ssl
import time
import zlib

import httpx

from adapters.sinks.https.config import HttpsSinkConfig
from agent.config import read_secret
from agent.errors import SinkError
from agent.event import format_sequence
from agent.interfaces import Batch, ComponentState, SendResult, Sink
from agent.tls import TlsFileError

CONTENT_TYPE = "application/cloudevents-batch+json"


def gzip_bytes(data: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container
    return c.compress(data) + c.flush()


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


#: how much of a refusal's body is kept: a rejected event's reason is the gateway's whole
#: answer (the contract: "the response as reason", shown by dead-letter list and show);
#: a transient failure's is logged and shown in status, so a short snippet does
REJECTION_BODY_MAX = 8192
SNIPPET_MAX = 300

#: bodies made ready ahead of their send (the forwarder reads read_ahead batches ahead); a
#: few more than that, so batches re-formed after a failure do not grow the map
PREPARED_MAX = 8


def classify(status: int, body: str, retry_after: float | None) -> SendResult:
    limit = REJECTION_BODY_MAX if status in (400, 413, 422) else SNIPPET_MAX
    snippet = " ".join(body.split())[:limit]
    reason = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    if 200 <= status < 300:
        return SendResult.accepted(status)
    if status in (408, 425, 429) or status >= 500:
        return SendResult.retry(reason, status, retry_after)
    if status in (400, 422):
        return SendResult.rejected(reason, status)
    if status == 413:
        return SendResult.too_large(reason, status)
    if status in (401, 403):
        return SendResult.auth(reason, status)
    # 404, 405, 415...: the URL or the deployment is wrong, not the events. Keep them.
    return SendResult.auth(f"{reason} (check the sink's url and the gateway version)", status)


class HttpsSink(Sink):
    max_in_flight = 1  # concurrent POSTs could arrive out of order
    #: the next batch is read, joined and gzipped (in a thread: zlib lets go of the GIL)
    #: while the current POST is on the wire; it still leaves only after this one is
    #: accepted. Measured: docs/performance.md, "Issue 16: the drain paths".
    read_ahead = 3

    def __init__(self, name: str, config: HttpsSinkConfig) -> None:
        self.name = name
        self.config = config
        self._client: httpx.AsyncClient | None = None
        self._headers: dict[str, str] = {}
        self._state = ComponentState(state="starting", since=time.time())
        #: batch id -> the request body, made by prepare()
        self._prepared: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def _ssl_context(self) -> ssl.SSLContext | bool:
        try:
            return self.config.tls_context()
        except TlsFileError as exc:
            raise SinkError(f"sinks.{self.name}.{exc}") from exc
        except OSError as exc:  # no OS trust store
            raise SinkError(f"sinks.{self.name}: {exc}") from exc

    async def start(self) -> None:
        c = self.config
        token = read_secret(c.token, c.token_file, f"sinks.{self.name}.token")
        self._headers = {"Content-Type": CONTENT_TYPE}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        if c.gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._client = httpx.AsyncClient(
            verify=self._ssl_context(),
            timeout=httpx.Timeout(c.timeout, connect=c.connect_timeout),
            limits=httpx.Limits(max_keepalive_connections=4, max_connections=8),
            headers={"User-Agent": "edge-agent"},
        )

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._prepared.clear()
        self._set("stopped")

    def state(self) -> ComponentState:
        return self._state

    def _set(self, state: str, error: str | None = None) -> None:
        self._state.change(state, error)

    def _body(self, batch: Batch) -> bytes:
        body = batch.payload
        if self.config.gzip:
            body = gzip_bytes(body, self.config.gzip_level)
        return body

    async def prepare(self, batch: Batch) -> None:
        if batch.batch_id in self._prepared:
            return
        body = await asyncio.to_thread(self._body, batch)
        self._prepared[batch.batch_id] = body
        while len(self._prepared) > PREPARED_MAX:
            self._prepared.popitem(last=False)

    async def send(self, batch: Batch) -> SendResult:
        if self._client is None:
            return SendResult.retry("sink not started")
        body = self._prepared.pop(batch.batch_id, None)
        if body is None:
            body = self._body(batch)
        headers = dict(self._headers)
        headers["Idempotency-Key"] = batch.batch_id
        headers["X-Edge-Stream"] = batch.stream
        headers["X-Edge-First-Sequence"] = format_sequence(batch.first_sequence)
        headers["X-Edge-Last-Sequence"] = format_sequence(batch.last_sequence)
        headers["X-Edge-Stream-Epoch"] = batch.epoch
        try:
            resp = await self._client.post(self.config.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            reason = f"timeout talking to {self.config.url} ({type(exc).__name__})"
            self._set("disconnected", reason)
            return SendResult.retry(reason)
        except httpx.TransportError as exc:
            cause = exc.__cause__ or exc.__context__
            text = str(exc) or type(exc).__name__
            if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in text:
                reason = f"TLS verification of {self.config.url} failed: {text} (check ca_file)"
                self._set("error", reason)
            else:
                reason = f"cannot reach {self.config.url}: {text}"
                self._set("disconnected", reason)
            return SendResult.retry(reason)
        result = classify(
            resp.status_code, resp.text, parse_retry_after(resp.headers.get("Retry-After"))
        )
        if result.outcome.value == "accepted" or result.outcome.value == "rejected":
            self._set("connected")
        elif result.outcome.value == "auth":
            self._set("auth_failed", result.reason)
        else:
            self._set("error", result.reason)
        return result

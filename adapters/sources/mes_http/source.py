"""The MES HTTP push endpoint: ``POST /v1/events`` with one event object or a JSON array.

Why it is built this way:

* The aiohttp server lives inside ``run()``: bound when run starts, shut down in the
  ``finally`` when the task is cancelled (stop accepting, give in-flight requests
  ``shutdown_timeout`` to finish, then cancel them), so no socket outlives the source.
* A request is all or nothing: every event is mapped and validated before the single
  ``ingest.append``; one bad event means 422 and nothing stored. 202 is sent only after
  append returned, i.e. after the events are on disk. If the agent dies between commit and
  response, the MES retries with the same event ids and the buffer's de-duplication answers
  202 (``duplicate``) without storing them twice.
* The body is read incrementally against ``max_body_bytes`` (a declared Content-Length over
  the limit is refused before reading), so a client cannot make the agent buffer unbounded
  data. The token is compared in constant time over SHA-256 digests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import ssl
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

from adapters.sources.mes_common import parse_mes_batch
from adapters.sources.mes_http.config import Config, split_listen
from agent.config import read_secret
from agent.errors import BufferError_, BufferFull, ConfigError, SourceError
from agent.event import format_sequence
from agent.interfaces import ComponentState, Ingest, NewEvent, Source
from agent.registry import AdapterContext

log = logging.getLogger("edge_agent.sources.mes_http")

PATH = "/v1/events"
CONTENT_TYPES = frozenset(
    {"application/json", "application/cloudevents+json", "application/cloudevents-batch+json"}
)
#: At most this many field errors are listed in one 422 response (the total is given).
MAX_LISTED_ERRORS = 200


class MesHttpSource(Source):
    """Receives MES events over HTTP and commits them to one stream."""

    def __init__(self, name: str, config: Config, ctx: AdapterContext | None = None) -> None:
        self.name = name
        self.config = config
        self.stream = config.stream or name
        self._host, self._port = split_listen(config.listen)
        self._extra_uom = frozenset(config.extra_uom_codes)
        self._token_digest: bytes | None = None
        self._ingest: Ingest | None = None
        self._state = ComponentState(state="starting", since=time.time())
        self._bound: str | None = None
        self._requests = 0
        self._accepted = 0
        self._duplicates = 0
        self._rejected: Counter[str] = Counter()
        self._last_error: dict[str, Any] | None = None
        self._full = False

    # ------------------------------------------------------------------ lifecycle

    def _set_state(self, state: str, error: str | None = None) -> None:
        self._state.change(state, error)

    def _ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(
                f"sources.{self.name}.tls_cert: cannot load {cfg.tls_cert} / {cfg.tls_key}: "
                f"{exc} (check both are PEM files and the key matches the certificate)"
            ) from exc
        return ctx

    async def run(self, ingest: Ingest) -> None:
        cfg = self.config
        try:
            token = read_secret(cfg.token, cfg.token_file, "token")
        except ConfigError as exc:
            self._set_state("error", str(exc))
            raise SourceError(f"sources.{self.name}.{exc}") from exc
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        ssl_ctx = self._ssl_context()
        self._ingest = ingest
        app = web.Application(client_max_size=cfg.max_body_bytes)
        app.router.add_post(PATH, self._handle)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=cfg.shutdown_timeout
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=ssl_ctx)
            try:
                await site.start()
            except OSError as exc:
                msg = (
                    f"sources.{self.name}.listen: cannot listen on {cfg.listen}: "
                    f"{exc.strerror or exc} (pick a free port or stop the other process)"
                )
                self._set_state("error", msg)
                raise SourceError(msg) from exc
            addr = runner.addresses[0]
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            self._bound = f"{host}:{addr[1]}"
            scheme = "https" if ssl_ctx else "http"
            log.info("%s: listening on %s://%s%s", self.name, scheme, self._bound, PATH)
            self._set_state("connected")
            await asyncio.Future()  # serve until cancelled
        finally:
            if self._state.state != "error":
                self._set_state("stopped")
            await runner.cleanup()
            self._ingest = None

    def state(self) -> ComponentState:
        self._state.detail = {
            "listening": self._state.state == "connected",
            "listen": self._bound or self.config.listen,
            "tls": self.config.tls_cert is not None,
            "auth": self.config.token is not None or self.config.token_file is not None,
            "stream": self.stream,
            "requests": self._requests,
            "accepted": self._accepted,
            "duplicates": self._duplicates,
            "rejected": dict(self._rejected),
            "last_error": dict(self._last_error) if self._last_error else None,
        }
        return self._state

    @property
    def bound_address(self) -> str | None:
        """HOST:PORT actually bound (useful with port 0), once listening."""
        return self._bound

    # ------------------------------------------------------------------ request handling

    def _reject(
        self,
        request: web.Request,
        status: int,
        reason: str,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self._rejected[reason] += 1
        self._last_error = {
            "status": status,
            "reason": reason,
            "message": message,
            "peer": request.remote,
            "at": time.time(),
        }
        first = ""
        if errors:
            e = errors[0]
            first = f" [{e['index']}] {e['field'] or '(event)'}: {e['message']}"
        self._state.note_error(f"{status} {reason} from {request.remote}: {message}{first}")
        log.debug("%s: %s", self.name, self._state.last_error)
        body: dict[str, Any] = {"error": reason, "message": message, "stored": 0}
        if errors is not None:
            body["errors"] = errors[:MAX_LISTED_ERRORS]
            body["errors_total"] = len(errors)
        return web.Response(
            status=status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers=headers,
        )

    def _authorized(self, request: web.Request) -> bool:
        if self._token_digest is None:
            return True
        scheme, _, cred = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(cred.strip().encode("utf-8", "surrogateescape")).digest()
        # Always compare, so timing does not tell a missing header from a wrong token.
        same = hmac.compare_digest(digest, self._token_digest)
        return same and scheme.lower() == "bearer"

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or None as soon as it exceeds max_body_bytes (the rest is not read)."""
        limit = self.config.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _unavailable(self, request: web.Request, reason: str, message: str) -> web.Response:
        retry = str(max(1, math.ceil(self.config.retry_after)))
        if not self._full:
            self._full = True
            log.warning(
                "%s: refusing events (503, Retry-After %s s): %s", self.name, retry, message
            )
        return self._reject(request, 503, reason, message, headers={"Retry-After": retry})

    async def _handle(self, request: web.Request) -> web.Response:
        self._requests += 1
        ingest = self._ingest
        if ingest is None:  # stopping
            return self._unavailable(request, "stopping", "the agent is stopping")
        if not self._authorized(request):
            return self._reject(
                request,
                401,
                "unauthorized",
                "missing or invalid bearer token (send Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="edge-agent"'},
            )
        if request.content_type not in CONTENT_TYPES or (
            request.charset and request.charset.lower() not in ("utf-8", "utf8")
        ):
            got = request.headers.get("Content-Type", "(none)")
            return self._reject(
                request,
                415,
                "unsupported_media_type",
                f"Content-Type {got} is not accepted (send application/json, UTF-8)",
            )
        limit = self.config.max_body_bytes
        too_large = f"body larger than {limit} bytes (send smaller batches)"
        if request.content_length is not None and request.content_length > limit:
            return self._reject(request, 413, "too_large", too_large)
        # Even when the buffer has no room the (bounded) body is read and validated: the
        # buffer's refusal then counts every event refused, and status tells the truth.
        try:
            body = await self._read_body(request)
        except (asyncio.CancelledError, MemoryError):
            raise
        except Exception as exc:  # the client went away or sent a broken chunked body
            return self._reject(request, 400, "bad_body", f"cannot read the body: {exc}")
        if body is None:
            return self._reject(request, 413, "too_large", too_large)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self._reject(request, 400, "malformed_json", f"body is not valid JSON: {exc}")
        if isinstance(doc, dict):
            items: list[Any] = [doc]
        elif isinstance(doc, list):
            items = doc
        else:
            return self._reject(
                request,
                400,
                "malformed_json",
                "body must be one event object or a JSON array of events",
            )
        if len(items) > self.config.max_events:
            return self._reject(
                request,
                413,
                "too_large",
                f"{len(items)} events in one request (at most {self.config.max_events})",
            )
        events, problems = parse_mes_batch(
            items, self.config.mapping, extra_uom_codes=self._extra_uom
        )
        errors = [
            {"index": i, "field": p, "message": m} for i, exc in problems for p, m in exc.errors
        ]
        if errors:
            bad = len({e["index"] for e in errors})
            return self._reject(
                request,
                422,
                "invalid",
                f"{bad} of {len(items)} events invalid; nothing was stored",
                errors,
            )
        if not events:
            return self._accepted_response([], [])
        try:
            committed = await ingest.append(self.stream, events)
        except BufferFull as exc:
            return self._unavailable(request, "buffer_full", str(exc))
        except BufferError_ as exc:  # disk full, buffer closing: nothing was committed
            return self._unavailable(request, "buffer_error", str(exc))
        if self._full:
            self._full = False
            log.info("%s: accepting events again", self.name)
        return self._accepted_response(events, committed)

    def _accepted_response(self, events: list[NewEvent], committed: list[Any]) -> web.Response:
        dups = sum(1 for c in committed if c.duplicate)
        self._accepted += len(committed) - dups
        self._duplicates += dups
        # one comprehension, not a loop of appends: a 500-event response is built per request
        listed = [
            {
                "index": i,
                "id": c.id,
                "sequence": format_sequence(c.sequence),
                "duplicate": c.duplicate,
            }
            if ev.source_event_id is None
            else {
                "index": i,
                "id": c.id,
                "sequence": format_sequence(c.sequence),
                "duplicate": c.duplicate,
                "source_event_id": ev.source_event_id,
            }
            for i, (ev, c) in enumerate(zip(events, committed, strict=True))
        ]
        body = {
            "stream": self.stream,
            "accepted": len(committed) - dups,
            "duplicates": dups,
            "events": listed,
        }
        return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")


def build(name: str, config: Config, ctx: AdapterContext) -> MesHttpSource:
    return MesHttpSource(name, config, ctx)

"""The HTTPS binding of the wire contract, served by aiohttp, plus test and demo controls.

Routes:

    POST <path> (default /v1/batches)   a CloudEvents batch (the contract, section 3)
    GET  /healthz                       200 "ok" (no auth: for readiness probes)
    GET  /report                        the report as JSON (gateway.report)
    GET  /events?stream=S[&epoch=E]     accepted events in arrival order, a JSON array
    GET|POST /control                   read / change failure injection (only with --control)

Order of checks on a batch, so each answer means one thing: auth (401) -> injected latency
-> injected failure -> content type / encoding (415) -> headers and envelopes (400) ->
Idempotency-Key replay -> poison (422) -> commit, then 200.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import signal
import sqlite3
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.encoding import BodyTooLarge, BodyUndecodable, decode_body, kept_body
from gateway.report import build_report
from gateway.store import GatewayStore, read_events_json
from gateway.validate import BATCH_CONTENT_TYPE, BatchError, ParsedBatch, parse_batch

log = logging.getLogger("agent.gateway")

_JSON = "application/json"
_ENCODINGS = {"", "identity", "gzip", "x-gzip", "deflate"}
#: Fields whose refusal still leaves the event's place in its stream known, so the sequence
#: the agent dead-letters can be recorded as explained.
_UNPLACEABLE = {None, "sequence", "source", "streamepoch"}


@dataclass(slots=True)
class Faults:
    """Failure injection, set by flags at start and by POST /control at runtime."""

    fail_status: int | None = None
    #: How many batch requests still fail before recovering; -1 = forever.
    fail_count: int = 0
    retry_after: float | None = None
    latency_ms: float = 0.0
    poison: set[str] = field(default_factory=set)
    #: How many accepted batches are committed and then answered by cutting the connection
    #: (a lost acknowledgement: the agent must resend under the same Idempotency-Key).
    drop_acks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "fail_status": self.fail_status,
            "fail_count": self.fail_count,
            "retry_after": self.retry_after,
            "latency_ms": self.latency_ms,
            "poison": sorted(self.poison),
            "drop_acks": self.drop_acks,
        }

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a /control body; raise ValueError naming the bad key (nothing applied)."""
        unknown = set(changes) - set(self.as_dict())
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} (known: {sorted(self.as_dict())})")
        new = Faults(
            self.fail_status,
            self.fail_count,
            self.retry_after,
            self.latency_ms,
            set(self.poison),
            self.drop_acks,
        )
        if "fail_status" in changes:
            v = changes["fail_status"]
            if v is not None and (
                not isinstance(v, int) or isinstance(v, bool) or not 100 <= v <= 599
            ):
                raise ValueError("fail_status: must be an HTTP status 100..599 or null")
            new.fail_status = v
            if v is not None and "fail_count" not in changes:
                new.fail_count = -1
        if "fail_count" in changes:
            v = changes["fail_count"]
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                raise ValueError("fail_count: must be an integer >= 0, or -1 for forever")
            new.fail_count = v
        if "retry_after" in changes:
            v = changes["retry_after"]
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or v < 0):
                raise ValueError("retry_after: must be seconds >= 0 or null")
            new.retry_after = v
        if "latency_ms" in changes:
            v = changes["latency_ms"]
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
                raise ValueError("latency_ms: must be a number of milliseconds >= 0")
            new.latency_ms = float(v)
        if "poison" in changes:
            v = changes["poison"]
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValueError("poison: must be a list of event ids or subjects")
            new.poison = set(v)
        if "drop_acks" in changes:
            v = changes["drop_acks"]
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                raise ValueError("drop_acks: must be an integer >= 0, or -1 for forever")
            new.drop_acks = v
        for name in self.__slots__:  # type: ignore[attr-defined]
            setattr(self, name, getattr(new, name))

    def take_failure(self) -> int | None:
        """The status to fail this request with, consuming one from fail_count."""
        if self.fail_status is None or self.fail_count == 0:
            return None
        if self.fail_count > 0:
            self.fail_count -= 1
        return self.fail_status

    def take_drop(self) -> bool:
        """Whether to cut this accepted batch's answer, consuming one from drop_acks."""
        if self.drop_acks == 0:
            return False
        if self.drop_acks > 0:
            self.drop_acks -= 1
        return True


@dataclass(slots=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8443
    db: Path = Path("gateway.sqlite3")
    path: str = "/v1/batches"
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    token: str | None = None
    control: bool = False
    fsync: bool = False
    max_body: int = 64 * 1024 * 1024
    faults: Faults = field(default_factory=Faults)

    def ssl_context(self) -> ssl.SSLContext | None:
        """Server TLS context (None = plain HTTP); mTLS when client_ca is set."""
        if self.cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            ctx.load_verify_locations(cafile=str(self.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=_JSON, headers=headers
    )


def _retry_after_value(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class GatewayApp:
    """The request handlers, bound to one store and one Faults."""

    def __init__(self, settings: GatewaySettings, store: GatewayStore) -> None:
        self.settings = settings
        self.store = store
        self.faults = settings.faults
        self._auth = f"Bearer {settings.token}".encode() if settings.token else None

    def build(self) -> web.Application:
        # the limit applies to the decoded body (decode_body); on the wire a little more
        # is allowed, since a small body can grow when compressed
        app = web.Application(client_max_size=self.settings.max_body + 65536)
        app.router.add_post(self.settings.path, self.post_batch)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/report", self.report)
        app.router.add_get("/events", self.events)
        if self.settings.control:
            app.router.add_get("/control", self.get_control)
            app.router.add_post("/control", self.post_control)
        return app

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self._auth is None:
            return None
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, self._auth):
            return None
        self.store.bump("unauthorized")
        what = "missing" if not given else "wrong"
        return _json(
            401,
            {"error": f"Authorization bearer token {what} (send Authorization: Bearer <token>)"},
            {"WWW-Authenticate": 'Bearer realm="edge-gateway"'},
        )

    async def post_batch(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        faults = self.faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        status = faults.take_failure()
        if status is not None:
            self.store.bump("injected_failures")
            headers = {}
            if faults.retry_after is not None:
                headers["Retry-After"] = _retry_after_value(faults.retry_after)
            left = "forever" if faults.fail_count < 0 else f"{faults.fail_count} more to fail"
            return _json(status, {"error": f"injected failure ({left})"}, headers)
        if request.content_type != BATCH_CONTENT_TYPE:
            self.store.bump("rejected_415")
            return _json(
                415,
                {
                    "error": f"Content-Type must be {BATCH_CONTENT_TYPE}, "
                    f"got {request.headers.get('Content-Type')!r}"
                },
                {"Accept-Post": BATCH_CONTENT_TYPE},
            )
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in _ENCODINGS:
            self.store.bump("rejected_415")
            return _json(
                415,
                {"error": f"Content-Encoding {encoding!r} not supported (use gzip or none)"},
                {"Accept-Encoding": "gzip"},
            )
        try:
            # as on the wire (aiohttp's decompression is off): decoded here in one call,
            # and a gzip body is stored as received (gateway/encoding.py)
            raw = await request.read()
            body = decode_body(raw, encoding, self.settings.max_body)
        except BodyTooLarge as exc:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.settings.max_body, actual_size=exc.args[0]
            ) from None
        except (RequestPayloadError, BodyUndecodable) as exc:
            self.store.bump("rejected_400")
            encoding = request.headers.get("Content-Encoding", "none")
            cause = exc.__cause__ if isinstance(exc, RequestPayloadError) else exc
            log.warning("unreadable body (Content-Encoding %s): %s", encoding, cause)
            return _json(
                400,
                {
                    "error": f"body could not be decoded as Content-Encoding {encoding!r} says "
                    "(corrupt or truncated?)"
                },
            )
        try:
            batch = parse_batch(request.headers, body)
        except BatchError as exc:
            self._record_refused_event(request, exc)
            self.store.bump("rejected_400")
            return _json(400, exc.body())
        batch.body = kept_body(raw, encoding, body)
        stored = self.store.lookup_batch(batch.key)
        if stored is not None:
            return self._lose_ack(request, self._replay(batch, stored))
        if faults.poison and (rejected := self._poisoned(batch)):
            self.store.record_rejected(
                batch.source,
                batch.stream,
                batch.epoch,
                [(batch.first + r["index"], r["id"], r["reason"]) for r in rejected],
                422,
            )
            self.store.bump("rejected_422")
            return _json(
                422,
                {
                    "error": f"{len(rejected)} event(s) refused (poison); nothing of this batch "
                    "was stored",
                    "rejected": rejected,
                },
            )
        try:
            _, _, body = self.store.store_batch(
                batch,
                lambda accepted, dups: orjson.dumps({"accepted": accepted, "duplicates": dups}),
            )
        except sqlite3.Error as exc:
            log.error("storing batch %s failed: %s", batch.key, exc)
            return _json(
                503, {"error": f"gateway could not store the batch: {exc}"}, {"Retry-After": "1"}
            )
        return self._lose_ack(request, web.Response(status=200, body=body, content_type=_JSON))

    def _lose_ack(self, request: web.Request, response: web.Response) -> web.Response:
        """Injected lost acknowledgement: the batch is committed, the answer never arrives."""
        if response.status == 200 and self.faults.take_drop():
            self.store.bump("dropped_acks")
            if request.transport is not None:
                request.transport.close()
        return response

    def _poisoned(self, batch: ParsedBatch) -> list[dict[str, Any]]:
        poison = self.faults.poison
        out = []
        for i, ev in enumerate(batch.events):
            for attr in ("id", "subject"):
                value = ev.get(attr)
                if value in poison:
                    out.append({"index": i, "id": ev["id"], "reason": f"poison {attr} {value!r}"})
                    break
        return out

    def _replay(self, batch: ParsedBatch, stored: Any) -> web.Response:
        same = (stored.stream, stored.epoch, stored.first, stored.last) == (
            batch.stream,
            batch.epoch,
            batch.first,
            batch.last,
        )
        if not same:
            self.store.bump("idempotency_conflicts")
            return _json(
                422,
                {
                    "error": f"Idempotency-Key {batch.key!r} was used for stream {stored.stream} "
                    f"epoch {stored.epoch} sequences {stored.first}..{stored.last}, "
                    f"not {batch.stream} {batch.epoch} {batch.first}..{batch.last} "
                    "(a key names one batch forever)"
                },
            )
        self.store.bump("replayed_batches")
        return web.Response(
            status=stored.status,
            body=stored.response,
            content_type=_JSON,
            headers={"Idempotent-Replayed": "true"},
        )

    def _record_refused_event(self, request: web.Request, exc: BatchError) -> None:
        """A 400 for one event: the agent will dead-letter it, so explain its sequence."""
        ev = exc.event
        if ev is None or exc.field in _UNPLACEABLE:
            return
        seq, source = ev.get("sequence"), ev.get("source")
        stream = request.headers.get("X-Edge-Stream", "").strip()
        epoch = request.headers.get("X-Edge-Stream-Epoch", "").strip()
        if not (isinstance(seq, str) and len(seq) == 20 and seq.isdigit() and seq.isascii()):
            return
        if not (isinstance(source, str) and source and stream and epoch):
            return
        if ev.get("streamepoch") != epoch or int(seq) < 1:
            return
        eid = ev.get("id") if isinstance(ev.get("id"), str) else None
        self.store.record_rejected(source, stream, epoch, [(int(seq), eid, exc.message)], 400)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def report(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return _json(200, build_report(self.store.conn, db_path=self.store.path))

    async def events(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        q = request.query
        body = read_events_json(
            self.store.conn, q.get("stream"), epoch=q.get("epoch"), source=q.get("source")
        )
        return web.Response(body=body, content_type=_JSON)

    async def get_control(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return _json(200, self.faults.as_dict())

    async def post_control(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            encoding = request.headers.get("Content-Encoding", "").strip().lower()
            raw = await request.read()
            changes = orjson.loads(decode_body(raw, encoding, self.settings.max_body))
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            self.faults.update(changes)
        except (ValueError, orjson.JSONDecodeError, BodyUndecodable, BodyTooLarge) as exc:
            return _json(400, {"error": f"control: {exc}"})
        log.info("failure injection now %s", self.faults.as_dict())
        return _json(200, self.faults.as_dict())


def format_url(scheme: str, host: str, port: int, path: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{path}"


class GatewayServer:
    """One running gateway: ``await start()``, ``url``, ``await stop()`` (idempotent).

    Usable in-process (the demo) as well as by ``serve_forever`` (the CLI). Teardown mirrors
    startup: stop accepting, let in-flight requests finish (bounded), close the database.
    """

    def __init__(self, settings: GatewaySettings, *, shutdown_timeout: float = 5.0) -> None:
        self.settings = settings
        self._shutdown_timeout = shutdown_timeout
        self.store: GatewayStore | None = None
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        self.port: int | None = None

    @property
    def faults(self) -> Faults:
        return self.settings.faults

    async def start(self) -> str:
        s = self.settings
        ssl_ctx = s.ssl_context()
        self.store = GatewayStore.open(s.db, fsync=s.fsync)
        try:
            handlers = GatewayApp(s, self.store)
            self._runner = web.AppRunner(
                handlers.build(),
                access_log=None,
                auto_decompress=False,
                handle_signals=False,
                shutdown_timeout=self._shutdown_timeout,
            )
            await self._runner.setup()
            site = web.TCPSite(
                self._runner, s.host, s.port, ssl_context=ssl_ctx, reuse_address=True, backlog=512
            )
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self.port = int(self._runner.addresses[0][1])
        self.url = format_url("https" if ssl_ctx else "http", s.host, self.port, s.path)
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        store, self.store = self.store, None
        if store is not None:
            store.close()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


#: gen-0 threshold of the gateway process: a collection every 50,000 container allocations
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collector settings for the gateway's own process (as agent/gc_tuning.py does for the
    agent's): a 1000-event batch makes some 4,000 container objects (two dicts per event,
    the row tuples), all alive until the answer and freed by reference counting after it.
    With the default gen-0 threshold (700) the collector walked them several times per
    batch and promoted them to older generations, which were walked again. Start-up's
    objects are frozen (never scanned again); cycles are still collected, later."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def serve_forever(settings: GatewaySettings) -> None:
    """Serve until SIGTERM or SIGINT, printing the URL line tests and scripts parse."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    server = GatewayServer(settings)
    try:
        url = await server.start()
        tune_gc()
        auth = []
        if settings.client_ca:
            auth.append("mTLS")
        if settings.token:
            auth.append("bearer token")
        extra = f" ({', '.join(auth)} required)" if auth else ""
        print(f"gateway listening on {url}{extra}", flush=True)
        await stopping.wait()
        print("gateway stopping", flush=True)
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

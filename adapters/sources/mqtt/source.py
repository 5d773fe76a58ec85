"""The MQTT source: QoS 1 messages from the plant's broker, acknowledged after the commit.

paho-mqtt runs its network loop in its own thread (``loop_start``); every callback only
hands its arguments to the asyncio loop with ``call_soon_threadsafe``. The asyncio side
takes messages in the order they arrived, decodes them, commits the valid ones with one
``ingest.append`` per group of ready messages, and only then sends the PUBACKs
(``manual_ack=True``), in arrival order as MQTT requires.

What happens to a message:

* valid: committed, then acknowledged;
* invalid (not JSON, not an object/array, fails the canonical schema, too large, on a topic
  no subscription covers): counted as rejected with its reason, logged, and acknowledged,
  because a redelivery could never succeed and would block the session;
* buffer full: not acknowledged; the commit is retried every ``retry_interval`` until it
  succeeds, so the broker holds the rest back (Receive Maximum);
* connection lost before the PUBACK: not acknowledged. A persistent session (fixed client
  id, clean start off, session expiry) makes the broker send it again on the next
  connection, so it is never lost; it may be committed twice, which the buffer's
  de-duplication absorbs when the payload carries the MES's event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from adapters.sources.mes_common import MesInputError, parse_mes_payload
from adapters.sources.mqtt import uns
from agent.config import read_secret
from agent.errors import BufferFull, SourceError
from agent.interfaces import Committed, ComponentState, Ingest, NewEvent, Source, State
from agent.logs import register_secret
from agent.registry import AdapterContext
from agent.tls import TlsFileError

from .config import Config, Subscription

log = logging.getLogger("edge_agent.sources.mqtt")

#: messages committed together at most (one append, one fsync)
MAX_GROUP = 500
_AUTH_CODES = {"Not authorized", "Bad user name or password", "Banned"}


@dataclass(frozen=True, slots=True)
class _Message:
    generation: int  # which connection delivered it (1 = first)
    mid: int
    qos: int
    topic: str | None  # None: not UTF-8
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Connected:
    generation: int
    session_present: bool


@dataclass(frozen=True, slots=True)
class _Subscribed:
    refused: list[str]


@dataclass(frozen=True, slots=True)
class _Problem:
    state: str  # disconnected | auth_failed | error
    text: str


class _Rejected(Exception):
    def __init__(self, reason: str, text: str) -> None:
        self.reason = reason
        self.text = text
        super().__init__(text)


class MqttSource(Source):
    def __init__(self, name: str, config: Config, ctx: AdapterContext) -> None:
        self.name = name
        self.stream = config.stream or name
        self.config = config
        self.client_id = config.client_id or _client_id(ctx.agent_id, name)
        self._state = ComponentState(state=State.STARTING, since=time.time())
        self._accepted = 0
        self._duplicates = 0
        self._messages = 0
        self._rejected: Counter[str] = Counter()
        self._held_back = False
        self._subscribed = False
        self._stopping = False
        #: connection generation as the paho thread sees it (read by the ack decision)
        self._thread_generation = 0
        self._gen_lock = threading.Lock()
        #: the latest connection as the asyncio side knows it
        self._generation = 0
        self._session_present = False
        self._connected_event: asyncio.Event | None = None
        self._client: paho.Client | None = None

    # ------------------------------------------------------------------ status

    def state(self) -> ComponentState:
        self._state.detail = {
            "broker": f"{self.config.host}:{self.config.port}",
            "client_id": self.client_id,
            "subscribed": self._subscribed,
            "accepted": self._accepted,
            "duplicates": self._duplicates,
            "messages": self._messages,
            "rejected": dict(self._rejected),
            "held_back": self._held_back,
        }
        return self._state

    def _set(self, state: str, error: str | None = None) -> None:
        self._state.change(state, error)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, ingest: Ingest) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Message] = asyncio.Queue()
        self._connected_event = asyncio.Event()
        self._stopping = False
        client = await asyncio.to_thread(self._make_client)
        self._client = client
        self._wire(client, loop, queue)
        cfg = self.config
        log.info(
            "connecting to %s as %s (%s)",
            cfg.url,
            self.client_id,
            ", ".join(s.topic for s in cfg.subscriptions),
            extra={"source": self.name, "stream": self.stream},
        )
        if cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = min(int(cfg.session_expiry), 0xFFFFFFFF)
            props.ReceiveMaximum = cfg.receive_maximum
            client.connect_async(
                cfg.host, cfg.port, int(cfg.keepalive), clean_start=False, properties=props
            )
        else:
            client.connect_async(cfg.host, cfg.port, int(cfg.keepalive))
        client.loop_start()
        try:
            await self._consume(ingest, queue)
        finally:
            self._stopping = True
            self._set("stopped")
            # Unacknowledged messages stay in the broker's session for the next start.
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
            self._client = None

    def _make_client(self) -> paho.Client:
        """Build the paho client (reads TLS and password files: called in a thread)."""
        cfg = self.config
        if cfg.protocol == "5":
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
                manual_ack=True,
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                clean_session=False,
                protocol=MQTTProtocolVersion.MQTTv311,
                manual_ack=True,
            )
        client.reconnect_delay_set(max(1, int(cfg.reconnect_min)), max(1, int(cfg.reconnect_max)))
        if cfg.username:
            password = read_secret(cfg.password, cfg.password_file, "password")
            register_secret(password)
            client.username_pw_set(cfg.username, password)
        if cfg.tls:
            client.tls_set_context(self._ssl_context())
            if cfg.tls_verification_off:
                client.tls_insecure_set(True)  # paho checks the host name itself otherwise
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        try:
            return self.config.tls_context()
        except TlsFileError as exc:
            raise SourceError(f"sources.{self.name}.{exc}") from exc
        except OSError as exc:  # no OS trust store
            raise SourceError(f"sources.{self.name}: {exc}") from exc

    # ------------------------------------------------------------------ paho thread side

    def _wire(
        self, client: paho.Client, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_Message]
    ) -> None:
        """Install callbacks. They run in paho's thread and only post to the loop."""

        def post(item: Any) -> None:
            # The loop may be closing while paho still calls back: nothing to do then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_event, item, queue)

        def on_connect(c: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                state = "auth_failed" if str(reason) in _AUTH_CODES else "disconnected"
                post(_Problem(state, f"broker refused the connection: {reason}"))
                return
            with self._gen_lock:
                self._thread_generation += 1
                gen = self._thread_generation
            # Subscribing again is harmless with a kept session; with MQTT 5 the broker
            # resends retained messages only for a filter that is new to the session.
            topics = [(s.topic, self._sub_options()) for s in self.config.subscriptions]
            c.subscribe(topics)
            post(_Connected(gen, bool(flags.session_present)))

        def on_subscribe(_c: paho.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
            refused = [
                f"broker refused subscription {sub.topic!r}: {code}"
                for sub, code in zip(self.config.subscriptions, codes, strict=False)
                if code.is_failure
            ]
            post(_Subscribed(refused))

        def on_connect_fail(_c: paho.Client, _u: Any) -> None:
            post(
                _Problem(
                    "disconnected",
                    f"cannot connect to {self.config.url} (is the broker running and "
                    "reachable from here?); retrying",
                )
            )

        def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            post(_Problem("disconnected", f"disconnected from {self.config.url}: {reason}"))

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            try:
                topic: str | None = msg.topic
            except UnicodeDecodeError:
                topic = None
            post(_Message(self._thread_generation, msg.mid, msg.qos, topic, bytes(msg.payload)))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = on_message

    def _sub_options(self) -> Any:
        if self.config.protocol == "5":
            return SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        return 1

    # ------------------------------------------------------------------ asyncio side

    def _on_event(self, item: Any, queue: asyncio.Queue[_Message]) -> None:
        if self._stopping:
            return  # late callbacks of the connection being closed
        if isinstance(item, _Message):
            queue.put_nowait(item)
        elif isinstance(item, _Connected):
            self._subscribed = False
            self._generation = item.generation
            self._session_present = item.session_present
            self._set("connected")
            log.info(
                "connected to %s (session %s)",
                self.config.url,
                "resumed" if item.session_present else "new",
                extra={"source": self.name},
            )
            assert self._connected_event is not None
            self._connected_event.set()
        elif isinstance(item, _Subscribed):
            self._subscribed = not item.refused
            for text in item.refused:
                log.error(text, extra={"source": self.name})
                self._state.note_error(text)
        elif isinstance(item, _Problem):
            if item.state == "disconnected" and self._state.state == "auth_failed":
                return  # keep the more useful reason
            if self._state.last_error != item.text:
                log.warning(item.text, extra={"source": self.name})
            if item.state != "error":
                self._subscribed = False
                self._set(item.state, item.text)
                assert self._connected_event is not None
                self._connected_event.clear()
            else:
                self._state.note_error(item.text)

    async def _consume(self, ingest: Ingest, queue: asyncio.Queue[_Message]) -> None:
        while True:
            group = [await queue.get()]
            while len(group) < MAX_GROUP and not queue.empty():
                group.append(queue.get_nowait())
            await self._handle(ingest, group)

    async def _handle(self, ingest: Ingest, group: list[_Message]) -> None:
        """Commit what is valid in ``group`` in one append, then acknowledge all of it in
        order. Under BufferFull fall back to one message at a time (see _hold_back)."""
        group = await self._current(group)
        if not group:
            return
        decoded: list[tuple[_Message, list[tuple[str, NewEvent]]]] = []
        for msg in group:
            self._messages += 1
            try:
                decoded.append((msg, self._decode(msg)))
            except _Rejected as exc:
                self._rejected[exc.reason] += 1
                text = f"rejected message on {msg.topic!r}: {exc.text}"
                log.warning(text, extra={"source": self.name, "stream": self.stream})
                self._state.note_error(text)
                decoded.append((msg, []))
        events = [ev for _, evs in decoded for ev in evs]
        if events:
            try:
                await self._append(ingest, events)
            except BufferFull as exc:
                await self._hold_back(ingest, decoded, exc)
                return
        self._ack(group)

    async def _append(self, ingest: Ingest, events: list[tuple[str, NewEvent]]) -> None:
        """Commit events to their streams (one append per stream, in order of arrival)."""
        by_stream: dict[str, list[NewEvent]] = {}
        for stream, ev in events:
            by_stream.setdefault(stream, []).append(ev)
        for stream, evs in by_stream.items():
            self._count(await ingest.append(stream, evs))

    async def _hold_back(
        self,
        ingest: Ingest,
        decoded: list[tuple[_Message, list[tuple[str, NewEvent]]]],
        exc: BufferFull,
    ) -> None:
        """The buffer is full: commit message by message (a whole group may never fit, a
        single message will once the sink drains the backlog), retrying each until it goes
        in and acknowledging it only then. Unacknowledged, the broker stops sending more
        once Receive Maximum messages are outstanding: that is the back-pressure."""
        log.warning(
            "buffer full: holding back %d message(s) unacknowledged; retrying every %.1fs",
            len(decoded),
            self.config.retry_interval,
            extra={"source": self.name, "stream": self.stream},
        )
        self._held_back = True
        self._state.note_error(str(exc))
        for msg, events in decoded:
            while events:
                await asyncio.sleep(self.config.retry_interval)
                if not await self._current([msg]):
                    break  # the broker will send it again on the new connection
                try:
                    await self._append(ingest, events)
                    break
                except BufferFull as again:
                    self._state.note_error(str(again))
            if await self._current([msg]):
                self._ack([msg])
        self._held_back = False

    def _count(self, committed: list[Committed]) -> None:
        self._accepted += sum(not c.duplicate for c in committed)
        self._duplicates += sum(c.duplicate for c in committed)

    async def _current(self, group: list[_Message]) -> list[_Message]:
        """Drop messages the broker will send again: those of an earlier connection when
        the new connection resumed the session. While disconnected, wait for a connection
        to know which case it is (nothing new can arrive meanwhile anyway)."""
        if all(m.generation == self._thread_generation for m in group):
            return group
        assert self._connected_event is not None
        while self._generation != self._thread_generation or not self._connected_event.is_set():
            await self._connected_event.wait()
            await asyncio.sleep(0.01)
        if not self._session_present:
            return group  # the old session is gone: commit them, nobody can ack them
        return [m for m in group if m.generation == self._generation]

    def _ack(self, group: list[_Message]) -> None:
        client = self._client
        if client is None:
            return
        connected = client.is_connected()
        for msg in group:
            # A PUBACK only makes sense on the connection that delivered the message; on
            # another one its packet id may name a different message.
            if msg.qos > 0 and connected and msg.generation == self._thread_generation:
                client.ack(msg.mid, msg.qos)

    def _decode(self, msg: _Message) -> list[tuple[str, NewEvent]]:
        if msg.topic is None:
            raise _Rejected("bad_topic", "topic is not UTF-8")
        if len(msg.payload) > self.config.max_payload:
            raise _Rejected(
                "too_large",
                f"payload of {len(msg.payload)} bytes is over max_payload = "
                f"{self.config.max_payload}",
            )
        sub = self._subscription_for(msg.topic)
        if sub is None:
            raise _Rejected("no_subscription", "no configured topic filter matches")
        if sub.topic_template is not None:
            try:
                named = uns.levels(sub.topic_template, msg.topic) if sub.stream else {}
                stream = uns.stream_name(sub.stream, named) if sub.stream else self.stream
                event = uns.value_event(
                    sub.topic_template, msg.topic, msg.payload, datetime.now(UTC)
                )
            except uns.UnsError as exc:
                raise _Rejected(exc.reason, exc.text) from None
            return [(stream, event)]
        try:
            body = orjson.loads(msg.payload)
        except orjson.JSONDecodeError as exc:
            raise _Rejected("not_json", f"not valid JSON ({exc.msg})") from None
        items = body if isinstance(body, list) else [body]
        events = []
        for i, obj in enumerate(items):
            where = f"[{i}]" if isinstance(body, list) else ""
            if not isinstance(obj, dict):
                raise _Rejected(
                    "not_object", f"{where or 'payload'}: expected a JSON object or an array"
                )
            try:
                events.append(
                    (
                        self.stream,
                        parse_mes_payload(
                            obj, sub.mapping, extra_uom_codes=self.config.extra_uom_codes
                        ),
                    )
                )
            except MesInputError as exc:
                text = "; ".join(
                    f"{where}{'.' if where and p else ''}{p}: {m}" if (where or p) else m
                    for p, m in exc.errors
                )
                raise _Rejected("invalid", text) from None
        return events

    def _subscription_for(self, topic: str) -> Subscription | None:
        for sub in self.config.subscriptions:
            flt = sub.topic
            if flt.startswith("$share/"):
                flt = flt.split("/", 2)[2] if flt.count("/") >= 2 else flt
            if paho.topic_matches_sub(flt, topic):
                return sub
        return None


def _client_id(agent_id: str, name: str) -> str:
    raw = f"edge-agent-{agent_id}-{name}"
    return "".join(ch if ch.isalnum() or ch in "_.:-" else "-" for ch in raw)[:128]

"""The Sparkplug B primary host source: births, data and deaths into the buffer, STATE out.

paho runs its network loop in its own thread (reading ahead: client.py says why); its
callbacks only post to the asyncio loop, which decodes messages in arrival order
(tracker.py), commits their events with one ``ingest.append`` per group of ready
messages, and only then acknowledges those that came at QoS 1 (Sparkplug data is QoS 0 by the specification: see docs/sparkplug.md).

STATE (``spBv1.0/STATE/<host_id>``, retained, QoS 1, the 3.0 JSON payload):

* each CONNECT carries a Will ``{"online": false, "timestamp": T}``; once subscribed we
  publish ``{"online": true, "timestamp": T}`` with the same T, as the specification says;
* while the buffer refuses events (``on_full = "block"`` at ``max_bytes``, or the disk
  reserve), we publish ``{"online": false, "timestamp": now}``: edge nodes configured with
  this host then disconnect and keep their data in their own store-and-forward;
* when there is room again we reconnect (a new Will, a new T) and publish online, so the
  edge nodes come back, publish their births and send what they stored as historical;
* when the agent stops, we publish offline with the Will's T and disconnect cleanly;
* if we ever read an offline STATE for ourselves while we mean to be online (a late Will
  of an earlier session), we publish online again.

Messages that arrive while the buffer refuses (or faster than commits complete) are held
in memory and committed in order, up to ``max_held_messages``; data beyond that is dropped
and counted (``dropped_overflow``; births and deaths are always kept), and the gap it
leaves in seq is answered by a rebirth request like any other gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import read_secret
from agent.errors import BufferFull, SourceError
from agent.interfaces import Committed, ComponentState, Ingest, NewEvent, Source
from agent.logs import register_secret
from agent.registry import AdapterContext
from agent.tls import TlsFileError

from . import payload as sp
from .client import ReadAheadClient
from .config import Config
from .tracker import Tracker

log = logging.getLogger("edge_agent.sources.sparkplug")

#: messages committed together at most (one append, one fsync)
MAX_GROUP = 1000
#: messages decoded between two turns of the event loop (a few milliseconds' work)
DECODE_SLICE = 100
_AUTH_CODES = {"Not authorized", "Bad user name or password", "Banned"}
_KEPT = ("/NBIRTH/", "/NDEATH/", "/DBIRTH/", "/DDEATH/")


class _Message(NamedTuple):
    """One PUBLISH as paho's thread hands it over: a NamedTuple (immutable, and made per
    message on paho's thread, where a frozen dataclass's __init__ costs several times
    more)."""

    generation: int
    mid: int
    qos: int
    topic: str | None
    payload: bytes
    received_ms: int


@dataclass(frozen=True, slots=True)
class _Connected:
    generation: int


@dataclass(frozen=True, slots=True)
class _Problem:
    state: str
    text: str


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """The Sparkplug 3.0 STATE payload."""
    return orjson.dumps({"online": online, "timestamp": timestamp_ms})


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SparkplugSource(Source):
    def __init__(self, name: str, config: Config, ctx: AdapterContext) -> None:
        self.name = name
        self.stream = config.stream or name
        self.config = config
        self.client_id = config.client_id or _client_id(ctx.agent_id, name)
        self.state_topic = f"{sp.NAMESPACE}/STATE/{config.host_id}"
        self.tracker = Tracker(rebirth_interval_ms=int(config.rebirth_interval * 1000))
        self._state = ComponentState(state="starting", since=time.time())
        self._accepted = 0
        self._duplicates = 0
        self._dropped = 0
        self._refused_logged: Counter[str] = Counter()
        self._client: paho.Client | None = None
        self._queue: asyncio.Queue[_Message] | None = None
        self._gen_lock = threading.Lock()
        self._cycle_lock = threading.Lock()
        self._thread_generation = 0
        self._generation = 0
        self._connected = False
        self._stopping = False
        #: the timestamp of the Will the current (or next) CONNECT carries
        self._will_ts = 0
        #: what we last published on our STATE topic: None, "online" or "offline"
        self.host_state: str | None = None
        self._holding = False
        self._room_ok = True
        self._state_changes = 0
        self._kick = asyncio.Event()

    # ------------------------------------------------------------------ status

    def state(self) -> ComponentState:
        self._state.detail = {
            "broker": f"{self.config.host}:{self.config.port}",
            "client_id": self.client_id,
            "host_id": self.config.host_id,
            "host_state": self.host_state,
            "groups": list(self.config.groups),
            "accepted": self._accepted,
            "duplicates": self._duplicates,
            "held_back": self._holding,
            "held_messages": self._queue.qsize() if self._queue else 0,
            "dropped_overflow": self._dropped,
            **self.tracker.snapshot(),
        }
        return self._state

    # ------------------------------------------------------------------ lifecycle

    async def run(self, ingest: Ingest) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Message] = asyncio.Queue()
        self._queue = queue
        self._kick = asyncio.Event()
        self._stopping = False
        client = await asyncio.to_thread(self._make_client)
        self._client = client
        self._wire(client, loop, queue)
        log.info(
            "connecting to %s as %s, Sparkplug host %s for group(s) %s",
            self.config.url,
            self.client_id,
            self.config.host_id,
            ", ".join(self.config.groups),
            extra={"source": self.name, "stream": self.stream},
        )
        self._connect(client)
        try:
            # the STATE watcher lives exactly as long as the consumer: one task group
            async with asyncio.TaskGroup() as tg:
                room = tg.create_task(self._watch_room(ingest), name=f"{self.name}-state")
                try:
                    await self._consume(ingest, queue)
                finally:
                    self._stopping = True
                    room.cancel()
        except ExceptionGroup as group:
            # one error (a commit that failed, nested in the consumer's group): raise it
            # as itself, so the supervisor's line says what failed, not "a TaskGroup"
            one: BaseException = group
            while isinstance(one, BaseExceptionGroup) and len(one.exceptions) == 1:
                one = one.exceptions[0]
            if one is group:
                raise
            raise one from None
        finally:
            self._stopping = True
            self._set("stopped")
            await asyncio.shield(asyncio.to_thread(self._close, client))
            self._client = None

    def _connect(self, client: paho.Client) -> None:
        cfg = self.config
        if cfg.primary:
            self._will_ts = _now_ms()
            client.will_set(
                self.state_topic, state_payload(False, self._will_ts), qos=1, retain=True
            )
        if cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
            client.connect_async(
                cfg.host, cfg.port, int(cfg.keepalive), clean_start=True, properties=props
            )
        else:
            client.connect_async(cfg.host, cfg.port, int(cfg.keepalive))
        client.loop_start()

    def _close(self, client: paho.Client) -> None:
        """Stopping: STATE offline with the Will's timestamp, then a clean disconnect.
        Waits for a reconnect under way (_cycle) so the two never interleave."""
        with self._cycle_lock:
            self._close_now(client)

    def _close_now(self, client: paho.Client) -> None:
        if self.config.primary and client.is_connected():
            info = client.publish(
                self.state_topic, state_payload(False, self._will_ts), qos=1, retain=True
            )
            with contextlib.suppress(Exception):
                info.wait_for_publish(timeout=3.0)
            self.host_state = "offline"
        client.disconnect()
        client.loop_stop()

    def _cycle(self, client: paho.Client) -> None:
        """Reconnect with a new Will, so the STATE online that follows carries a newer
        timestamp than the offline before it (edge nodes ignore older STATE messages)."""
        with self._cycle_lock:
            if self._stopping:
                return
            client.disconnect()
            client.loop_stop()
            self._connect(client)

    def _make_client(self) -> paho.Client:
        cfg = self.config
        if cfg.protocol == "5":
            client = ReadAheadClient(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
                manual_ack=True,
            )
        else:
            client = ReadAheadClient(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                clean_session=True,
                protocol=MQTTProtocolVersion.MQTTv311,
                manual_ack=True,
            )
        client.reconnect_delay_set(max(1, int(cfg.reconnect_min)), max(1, int(cfg.reconnect_max)))
        client.max_queued_messages_set(0)
        if cfg.username:
            password = read_secret(cfg.password, cfg.password_file, "password")
            register_secret(password)
            client.username_pw_set(cfg.username, password)
        if cfg.tls:
            try:
                ctx = cfg.tls_context()
            except TlsFileError as exc:
                raise SourceError(f"sources.{self.name}.{exc}") from exc
            except OSError as exc:  # no OS trust store
                raise SourceError(f"sources.{self.name}: {exc}") from exc
            client.tls_set_context(ctx)
            if cfg.tls_verification_off:
                client.tls_insecure_set(True)  # paho checks the host name itself otherwise
        return client

    # ------------------------------------------------------------------ paho thread side

    def _wire(
        self, client: paho.Client, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_Message]
    ) -> None:
        # Everything from paho (messages, connects, problems) goes through one deque in
        # arrival order; the loop is woken once per burst, not once per message (a wakeup
        # is a syscall and a turn of the loop each: a third of the paho-side cost).
        inbox: deque[Any] = deque()
        wake = [False]

        def drain() -> None:
            wake[0] = False  # before reading: an append after this schedules a new drain
            while inbox:
                self._on_event(inbox.popleft(), queue)

        def post(item: Any) -> None:
            inbox.append(item)
            if not wake[0]:
                wake[0] = True
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(drain)

        def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                state = "auth_failed" if str(reason) in _AUTH_CODES else "disconnected"
                post(_Problem(state, f"broker refused the connection: {reason}"))
                return
            with self._gen_lock:
                self._thread_generation += 1
                gen = self._thread_generation
            # Our own STATE first, then the groups (tck-id-host-topic-phid-birth-sub-required)
            topics = [(self.state_topic, 1)] if self.config.primary else []
            topics += [(f"{sp.NAMESPACE}/{g}/#", 1) for g in self.config.groups]
            c.subscribe(topics)
            post(_Connected(gen))

        def on_connect_fail(_c: paho.Client, _u: Any) -> None:
            post(_Problem("disconnected", f"cannot connect to {self.config.url}; retrying"))

        def on_disconnect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if self.config.primary and not self._stopping:
                # paho reconnects with the Will set now: give it a new timestamp
                self._will_ts = _now_ms()
                c.will_set(
                    self.state_topic, state_payload(False, self._will_ts), qos=1, retain=True
                )
            post(_Problem("disconnected", f"disconnected from {self.config.url}: {reason}"))

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            try:
                topic: str | None = msg.topic
            except UnicodeDecodeError:
                topic = None
            post(
                _Message(
                    self._thread_generation,
                    msg.mid,
                    msg.qos,
                    topic,
                    bytes(msg.payload),
                    _now_ms(),
                )
            )

        client.on_connect = on_connect
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = on_message

    # ------------------------------------------------------------------ asyncio side

    def _set(self, state: str, error: str | None = None) -> None:
        self._state.change(state, error)

    def _on_event(self, item: Any, queue: asyncio.Queue[_Message]) -> None:
        if self._stopping:
            return
        if isinstance(item, _Message):
            if item.topic == self.state_topic:
                self._on_own_state(item.payload)
                return
            if (
                queue.qsize() >= self.config.max_held_messages
                and item.topic is not None
                and not any(k in item.topic for k in _KEPT)
            ):
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    why = (
                        "the buffer refuses events"
                        if self._holding
                        else "the commits do not keep up with the broker"
                    )
                    log.error(
                        "%s and %d messages are held in memory (max_held_messages): dropped "
                        "%d data message(s) so far; edge nodes will be asked to rebirth",
                        why,
                        queue.qsize(),
                        self._dropped,
                        extra={"source": self.name, "stream": self.stream},
                    )
                return
            queue.put_nowait(item)
        elif isinstance(item, _Connected):
            self._generation = item.generation
            self._connected = True
            self._set("connected")
            log.info("connected to %s", self.config.url, extra={"source": self.name})
            if self.config.primary:
                online = not self._holding and self._room_ok
                self._publish_state(online, self._will_ts if online else _now_ms())
        elif isinstance(item, _Problem):
            if item.state == "disconnected" and self._state.state == "auth_failed":
                return
            if self._state.last_error != item.text:
                log.warning(item.text, extra={"source": self.name})
            self._connected = False
            self._set(item.state, item.text)

    def _on_own_state(self, raw: bytes) -> None:
        """A STATE for our host id: if it says offline while we mean to be online (a late
        Will of an earlier session, another process), say online again, with the current
        time so that edge nodes do not take it for an older message."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if (
            isinstance(body, dict)
            and body.get("online") is False
            and self.host_state == "online"
            and body.get("timestamp") != self._will_ts
        ):
            log.warning(
                "read STATE offline for our host id %s; publishing online again",
                self.config.host_id,
                extra={"source": self.name},
            )
            self._publish_state(True, _now_ms())

    def _publish_state(self, online: bool, ts: int) -> None:
        client = self._client
        if client is None:
            return
        client.publish(self.state_topic, state_payload(online, ts), qos=1, retain=True)
        new = "online" if online else "offline"
        if new != self.host_state:
            self._state_changes += 1
            log.log(
                logging.INFO if online else logging.WARNING,
                "STATE %s %s%s",
                self.state_topic,
                new,
                "" if online else " (the buffer refuses events: edge nodes keep their data)",
                extra={"source": self.name},
            )
        self.host_state = new

    async def _watch_room(self, ingest: Ingest) -> None:
        """Keep STATE in step with the buffer: offline while it refuses, online after."""
        interval = self.config.room_check_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), interval)
            self._kick.clear()
            self._room_ok = ingest.has_room()
            if not self.config.primary or not self._connected:
                continue
            want = self._room_ok and not self._holding
            if not want and self.host_state == "online":
                self._publish_state(False, _now_ms())
            elif want and self.host_state == "offline":
                client = self._client
                if client is not None:
                    await asyncio.to_thread(self._cycle, client)

    async def _consume(self, ingest: Ingest, queue: asyncio.Queue[_Message]) -> None:
        """Decode the next group while the previous one commits (the commit spends most of
        its time in SQLite and fsync, outside the GIL). One commit at a time, in order:
        group N+1 is handed to the buffer, and acknowledged, only after group N is."""
        # The commit in flight is a task of the consumer's own group: cancelled with it.
        pending: asyncio.Task[None] | None = None
        linger = self.config.commit_linger
        async with asyncio.TaskGroup() as tg:
            while True:
                if pending is not None and (queue.empty() or pending.done()):
                    await pending  # nothing to decode ahead, or done: surface its errors
                    pending = None
                    continue
                group = [await queue.get()]
                if linger and pending is None and queue.qsize() < MAX_GROUP:
                    await asyncio.sleep(linger)  # let what follows join this commit
                while len(group) < MAX_GROUP and not queue.empty():
                    group.append(queue.get_nowait())
                events = await self._decode_turns(group)
                if pending is not None:
                    await pending
                pending = tg.create_task(self._commit(ingest, group, events))

    async def _decode_turns(self, group: list[_Message]) -> list[NewEvent]:
        """_decode in slices, giving the loop a turn before each. Without the turns the
        commit task made just before never started (a task runs at the loop's next turn,
        and decoding a 1,000-message group took none: 30-60 ms), so decode and commit ran
        one after the other, never side by side (timestamps of both, bench/sparkplug.py's
        source side); and no other task of the agent ran for as long."""
        events: list[NewEvent] = []
        for i in range(0, len(group), DECODE_SLICE):
            await asyncio.sleep(0)
            events.extend(self._decode(group[i : i + DECODE_SLICE]))
        return events

    def _decode(self, group: list[_Message]) -> list[NewEvent]:
        events: list[NewEvent] = []
        for msg in group:
            if msg.topic is None:
                self.tracker.refused["bad_topic"] += 1
                continue
            out = self.tracker.handle(msg.topic, msg.payload, msg.received_ms)
            events.extend(out.events)
            if out.fault:
                log.warning("%s: asking for a rebirth", out.fault, extra={"source": self.name})
                self._state.note_error(out.fault)
            for reason, text in out.refused:
                n = self._refused_logged[reason] = self._refused_logged[reason] + 1
                if n == 1 or n % 1000 == 0:
                    log.warning(
                        "refused (%s, %d so far): %s", reason, n, text, extra={"source": self.name}
                    )
            if out.rebirth:
                self._request_rebirth(*out.rebirth)
        return events

    async def _commit(self, ingest: Ingest, group: list[_Message], events: list[NewEvent]) -> None:
        """Commit a decoded group, retrying while the buffer is full; then ack its QoS 1."""
        if events:
            while True:
                try:
                    self._count(await ingest.append(self.stream, events))
                    break
                except BufferFull as exc:
                    if not self._holding:
                        log.warning(
                            "buffer full: holding %d event(s) and STATE offline; retrying every %.1fs",
                            len(events),
                            self.config.retry_interval,
                            extra={"source": self.name, "stream": self.stream},
                        )
                    self._holding = True
                    self._state.note_error(str(exc))
                    self._kick.set()
                    await asyncio.sleep(self.config.retry_interval)
            if self._holding:
                self._holding = False
                self._kick.set()
        self._ack(group)

    def _count(self, committed: list[Committed]) -> None:
        for c in committed:
            if c.duplicate:
                self._duplicates += 1
            else:
                self._accepted += 1

    def _request_rebirth(self, group: str, edge: str) -> None:
        client = self._client
        if client is None:
            return
        topic = f"{sp.NAMESPACE}/{group}/NCMD/{edge}"
        client.publish(topic, sp.rebirth_request(_now_ms()), qos=0, retain=False)
        log.info("sent rebirth request to %s/%s", group, edge, extra={"source": self.name})

    def _ack(self, group: list[_Message]) -> None:
        client = self._client
        if client is None:
            return
        for msg in group:
            if msg.qos > 0 and msg.generation == self._thread_generation:
                client.ack(msg.mid, msg.qos)


def _client_id(agent_id: str, name: str) -> str:
    raw = f"edge-agent-{agent_id}-{name}"
    return "".join(ch if ch.isalnum() or ch in "_.:-" else "-" for ch in raw)[:128]

"""The running agent: builds sources and sinks from config and owns their lifecycle.

Start order: buffer -> sinks -> forwarders -> sources; stop in reverse, so nothing is
collected that cannot be stored and nothing is stored after the buffer closed. Each start
pushes its stop onto an AsyncExitStack, so teardown is the start read backwards (and a start
that fails half-way undoes exactly what had started); every task lives in a TaskGroup.

    SIGTERM / SIGINT   stop: sources first (nothing new is acknowledged), then forwarders
                       (an in-flight batch is abandoned: it is persisted and resent with
                       the same batch id next start), sinks, buffer. Each phase within its
                       share of one stop budget (agent/lifecycle.py: 22 s in all, inside
                       the unit's TimeoutStopSec=30s).
    SIGHUP             reload: the new config is validated first; an invalid one is
                       refused with the one-line error and the running one kept. A valid
                       one replaces sources, sinks and forwarders; the buffer stays open,
                       so nothing buffered is lost or reordered (buffer.* changes need a
                       restart).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__, registry
from agent.buffer import Buffer
from agent.config import Config, load_config
from agent.errors import ConfigError, EdgeAgentError
from agent.forwarder import ForwarderSettings, PriorityGate, StreamForwarder
from agent.heartbeat import HeartbeatFile
from agent.interfaces import Sink, Source, State
from agent.lifecycle import STOP_BUDGET, deadline, share, stop_tasks
from agent.outage import SinkOutages
from agent.preflight import preflight
from agent.status import HEARTBEAT_INTERVAL, build_snapshot
from agent.status_model import StatusSnapshot
from agent.tasks import TaskCrashed

#: a buffer file this big gets a log line before its check at start-up
LARGE_BUFFER_FILE = 256 * 1024 * 1024

log = logging.getLogger("edge_agent.runtime")

#: errors opening the buffer that mean "this path", not "this machine"
_PATH_ERRORS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}

#: the whole stop, every phase (agent/lifecycle.py)
STOP_TIMEOUT = STOP_BUDGET
HOUSEKEEPING_INTERVAL = 1.0
RATE_WINDOW = 300.0
#: How often the heartbeat loop looks for a state change to report before its interval.
STATE_POLL_INTERVAL = 0.25


class _SinkStartFailed(Exception):
    """A sink of a new generation could not start; carries its error."""

    def __init__(self, error: EdgeAgentError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Generation:
    """Sources, sinks and forwarders built from one version of the config."""

    config: Config
    sinks: dict[str, Sink] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    source_types: dict[str, str] = field(default_factory=dict)
    forwarders: dict[str, StreamForwarder] = field(default_factory=dict)


class Agent:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.buffer: Buffer | None = None
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        #: set by either request: the one event the running generation waits on
        self._wake = asyncio.Event()
        #: loop time by which the service phase of the stop must be done
        self._service_deadline: float | None = None
        self._gen: _Generation | None = None
        self._gate = PriorityGate()
        self._outages = SinkOutages()
        self._samples: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self._snapshot: StatusSnapshot | None = None
        self._metrics: Any = None
        self._notifier: Any = None
        self._heartbeat: HeartbeatFile | None = None
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ public

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake.set()

    def snapshot(self) -> StatusSnapshot:
        """The latest status snapshot (refreshed with every heartbeat, and within
        STATE_POLL_INTERVAL of a state change)."""
        if self._snapshot is None:
            raise RuntimeError("no status snapshot yet: the agent is starting")
        return self._snapshot

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: read from the same snapshot as status and /metrics."""
        snap = self._snapshot
        if snap is None or self._gen is None:
            return False, {"reason": "starting"}
        r = snap.readiness()
        return r.ready, r.to_dict()

    async def run(self) -> None:
        """Run until request_stop() (or SIGTERM/SIGINT when install_signal_handlers ran)."""
        cfg = self.config
        from agent.sdnotify import SystemdNotifier

        notifier = self._notifier = SystemdNotifier()
        clean = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                # pushed first, so it runs last: the notify socket outlives everything else
                stack.callback(notifier.close)
                async with notifier.extending(self._opening_status()):
                    buffer = self.buffer = await self._open_buffer()
                stack.push_async_callback(self._close_buffer, buffer)
                log.info(
                    "edge-agent %s started: buffer %s (epoch %s, durability %s), "
                    "%d source(s), %d sink(s)",
                    __version__,
                    cfg.buffer.path,
                    buffer.epoch,
                    cfg.buffer.durability,
                    len(cfg.sources),
                    len(cfg.sinks),
                )
                heartbeat = self._heartbeat = HeartbeatFile(Path(cfg.buffer.path))
                stack.callback(heartbeat.close)
                stack.push_async_callback(self._last_heartbeat)
                await self._start_metrics()
                stack.push_async_callback(self._stop_metrics)
                async with asyncio.TaskGroup() as tg:
                    service = [
                        tg.create_task(self._heartbeat_loop(), name="heartbeat"),
                        tg.create_task(self._housekeeping_loop(), name="housekeeping"),
                        tg.create_task(self._checkpoint_loop(), name="checkpoints"),
                        tg.create_task(notifier.watchdog(), name="watchdog"),
                    ]
                    try:
                        await self._run_generations()
                    finally:
                        notifier.stopping()
                        # loops, metrics server and last heartbeat: one share between them
                        self._service_deadline = deadline("service")
                        await stop_tasks("service", service, self._service_deadline)
            clean = True
        finally:
            # after a failure the one line saying why comes next: "cleanly" would mislead
            log.info("edge-agent stopped cleanly" if clean else "edge-agent stopped")

    def _opening_status(self) -> str:
        """What systemctl status says while the buffer opens; a large file is checked
        first, which takes a while: the log says so too, so a slow start is not a mystery."""
        path = Path(self.config.buffer.path)
        try:
            size = path.stat().st_size
        except OSError:
            return f"creating the buffer {path}"
        mb = size / 1_000_000
        if size >= LARGE_BUFFER_FILE:
            log.info(
                "checking the buffer file %s (%.0f MB) before start; on a large backlog this "
                "takes a while (about 4 s per GB from a cold disk cache)",
                path,
                mb,
            )
        return f"opening the buffer {path} ({mb:.0f} MB): checking the file"

    async def _open_buffer(self) -> Buffer:
        cfg = self.config
        try:
            return await Buffer.open(
                cfg.buffer.path,
                plant=cfg.agent.plant,
                agent_id=cfg.agent.id,
                durability=cfg.buffer.durability,
                max_bytes=cfg.buffer.max_bytes,
                on_full=cfg.buffer.on_full,
                keep_forwarded=cfg.buffer.keep_forwarded,
                dedupe_window=cfg.buffer.dedupe_window,
            )
        except OSError as exc:
            if exc.errno not in _PATH_ERRORS:
                raise
            # the path the config names is at fault, not the machine: say which key
            raise ConfigError(
                "buffer.path",
                f"cannot open {exc.filename or cfg.buffer.path}: {exc.strerror} (create the "
                "directory for the agent's user, or set buffer.path elsewhere)",
            ) from exc

    @staticmethod
    async def _close_buffer(buffer: Buffer) -> None:
        """The buffer phase: Buffer.close bounds itself (its queue wait is the share)."""
        started = time.monotonic()
        await buffer.close()
        spent = time.monotonic() - started
        if spent > share("buffer"):
            log.warning(
                "stop: buffer closed in %.1f s, over its %.0f s share", spent, share("buffer")
            )

    async def _last_heartbeat(self) -> None:
        """Part of the service phase: the heartbeat that says "stopped"."""
        try:
            async with asyncio.timeout_at(self._service_deadline or deadline("service")):
                await self._write_heartbeat(stopped=True)
        except Exception as exc:  # noqa: BLE001 - status then reads an old heartbeat: stale
            log.warning("last heartbeat not written: %s", exc)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # ------------------------------------------------------------------ generations

    async def _run_generations(self) -> None:
        previous: Config | None = None  # the config that ran before a reload
        while not self._stop.is_set():
            gen = self._build(self.config)
            self._gen = gen
            try:
                reason = await self._run_generation(gen)
            except _SinkStartFailed as failed:
                if previous is None:  # at start: exit 1 with the sink's own message
                    raise failed.error from None
                # A reload whose file is valid but whose sink cannot start (a CA file that
                # is not PEM, say): refused like an invalid file, the previous config again.
                log.error("reload refused, the running config is kept: %s", failed.error)
                self.config, previous = previous, None
                continue
            if reason == "stop":
                return
            # reload: self.config was replaced by a validated new config
            previous = gen.config

    def _build(self, cfg: Config) -> _Generation:
        ctx = registry.AdapterContext(
            agent_id=cfg.agent.id,
            plant=cfg.agent.plant,
            state_dir=Path(cfg.buffer.path).parent,
            version=__version__,
            backoff_max=cfg.forwarder.backoff_max,
            auth_retry_interval=cfg.forwarder.auth_retry_interval,
        )
        gen = _Generation(cfg)
        for name, sc in cfg.sinks.items():
            gen.sinks[name] = registry.build("sinks", name, sc, ctx)
        for name, src in cfg.sources.items():
            if not src.enabled:
                continue
            gen.sources[name] = registry.build("sources", name, src, ctx)
            gen.source_types[name] = src.type
        return gen

    async def _run_generation(self, gen: _Generation) -> str:
        assert self.buffer is not None
        buffer = self.buffer
        cfg = gen.config
        f = cfg.forwarder
        settings = ForwarderSettings(
            max_events=f.max_events,
            max_bytes=f.max_bytes,
            linger_ms=f.linger_ms,
            backoff_initial=f.backoff_initial,
            backoff_max=f.backoff_max,
            auth_retry_interval=f.auth_retry_interval,
        )
        async with contextlib.AsyncExitStack() as stack:
            started: list[Sink] = []
            # pushed before the first start: whatever did start is stopped, even after a
            # failed start or a forwarder that crashed the task group
            stack.push_async_callback(self._stop_sinks, started)
            for sink in gen.sinks.values():
                try:
                    await sink.start()
                except EdgeAgentError as exc:
                    raise _SinkStartFailed(exc) from exc
                started.append(sink)
            async with asyncio.TaskGroup() as tg:
                fwd_tasks: list[asyncio.Task[None]] = []

                def add_forwarder(stream: str) -> None:
                    if stream in gen.forwarders:
                        return
                    sink = gen.sinks[cfg.sink_for(stream)]
                    fw = StreamForwarder(
                        buffer,
                        stream,
                        sink,
                        settings,
                        priority=cfg.priority_of(stream),
                        gate=self._gate,
                        observe=self._observe,
                        outages=self._outages,
                    )
                    gen.forwarders[stream] = fw
                    fwd_tasks.append(tg.create_task(fw.run(), name=f"forward:{stream}"))

                for stream in buffer.streams():
                    add_forwarder(stream)
                buffer.new_stream_listeners.append(add_forwarder)
                stack.callback(_discard, buffer.new_stream_listeners, add_forwarder)
                src_tasks = [
                    tg.create_task(self._supervise(name, src), name=f"source:{name}")
                    for name, src in gen.sources.items()
                ]
                self.ready.set()
                self._notifier.ready()
                self._notifier.status(f"collecting from {len(src_tasks)} source(s)")
                try:
                    reason = await self._wait_stop_or_reload()
                finally:
                    # in reverse: sources (nothing new is acknowledged), then forwarders
                    await stop_tasks("sources", src_tasks)
                    _discard(buffer.new_stream_listeners, add_forwarder)
                    await stop_tasks("forwarders", fwd_tasks)
        return reason

    @staticmethod
    async def _stop_sinks(sinks: list[Sink]) -> None:
        """The sinks phase: every started sink stops at once, all within one share."""
        if not sinks:
            return

        crashed: list[TaskCrashed] = []

        async def stop(sink: Sink) -> None:
            try:
                await sink.stop()
            except TaskCrashed as exc:  # a bug in the sink: the agent exits 1 with it
                crashed.append(exc)
            except Exception as exc:  # noqa: BLE001 - one sink's trouble must not stop the rest
                log.warning("sink %s did not stop cleanly: %s", sink.name, exc)

        try:
            async with asyncio.timeout(share("sinks")), asyncio.TaskGroup() as tg:
                for sink in reversed(sinks):
                    tg.create_task(stop(sink), name=f"stop:sink:{sink.name}")
        except TimeoutError:
            log.warning(
                "stop: sinks not stopped within their %.0f s share: %s",
                share("sinks"),
                ", ".join(s.name for s in sinks if s.state().state != State.STOPPED),
            )
        if crashed:
            raise crashed[0]

    async def _wait_stop_or_reload(self) -> str:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return "stop"
            if not self._reload.is_set():
                continue
            self._reload.clear()
            if self._try_reload():
                return "reload"

    def _try_reload(self) -> bool:
        if self.config_path is None:
            log.warning("reload requested but the agent was not started from a config file")
            return False
        self._notifier.reloading()
        try:
            new = load_config(self.config_path)
            self._build(new)  # adapters must construct from it, too (no I/O in constructors)
            problems = preflight(new, self.config_path, for_run=True, own_pid=os.getpid()).problems
        except EdgeAgentError as exc:
            log.error("reload refused, the running config is kept: %s", exc)
            self._notifier.ready()
            return False
        if problems:  # what config check would say; ports this agent holds are not problems
            for p in problems:
                log.error("reload refused, the running config is kept: %s", p)
            self._notifier.ready()
            return False
        if new.buffer != self.config.buffer or new.agent != self.config.agent:
            log.warning("reload: [buffer] and [agent] changes take effect only after a restart")
            new = new.model_copy(update={"buffer": self.config.buffer, "agent": self.config.agent})
        self.config = new
        log.info("reloading: restarting sources, sinks and forwarders with the new config")
        return True

    async def _supervise(self, name: str, source: Source) -> None:
        """Run a source; if it fails unexpectedly, log it and start it again (capped backoff)."""
        assert self.buffer is not None
        delay = 1.0
        while True:
            try:
                await source.run(self.buffer)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                source.state().change(State.ERROR, str(exc))
                log.error("source %s failed: %s; restarting in %.0f s", name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    # ------------------------------------------------------------------ service loops

    async def _housekeeping_loop(self) -> None:
        assert self.buffer is not None
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                await self.buffer.housekeeping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("buffer housekeeping failed (will retry): %s", exc)

    async def _checkpoint_loop(self) -> None:
        assert self.buffer is not None
        interval = self.config.buffer.checkpoint_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            for stream in self.buffer.streams():
                try:
                    await self.buffer.append_checkpoint(stream)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("checkpoint for stream %s not written: %s", stream, exc)

    async def _heartbeat_loop(self) -> None:
        """Write the heartbeat every HEARTBEAT_INTERVAL, and soon after any source, sink
        or forwarder changes state, so an operator running status right after a
        connect or an outage sees it now rather than up to an interval later."""
        while True:
            try:
                await self._write_heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat not written: %s", exc)
            seen = self._state_fingerprint()
            deadline = time.monotonic() + HEARTBEAT_INTERVAL
            while time.monotonic() < deadline:
                await asyncio.sleep(STATE_POLL_INTERVAL)
                if self._state_fingerprint() != seen:
                    break

    def _state_fingerprint(self) -> tuple[Any, ...]:
        gen = self._gen
        if gen is None:
            return ()
        return (
            id(gen),
            tuple(s.state().state for s in gen.sinks.values()),
            tuple(s.state().state for s in gen.sources.values()),
            # idle <-> sending flips with every batch; only trouble is news
            tuple(f.status.state.up for f in gen.forwarders.values()),
        )

    async def _write_heartbeat(self, stopped: bool = False) -> None:
        assert self.buffer is not None
        buffer = self.buffer
        rows = await buffer.stream_rows()
        now = time.time()
        ing_b = sum(r["ingested_bytes"] for r in rows)
        out_b = sum(
            r["forwarded_bytes"] + r["dropped_bytes"] + r["dead_lettered_bytes"] for r in rows
        )
        ing_n = sum(r["ingested_total"] for r in rows)
        self._samples.append((now, ing_n, ing_b, out_b))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        t0, n0, ib0, ob0 = self._samples[0]
        dt = now - t0
        rate_eps = (ing_n - n0) / dt if dt > 0 else 0.0
        net_fill = ((ing_b - ib0) - (out_b - ob0)) / dt if dt > 0 else 0.0
        gen = self._gen
        cfg = self.config
        sinks, sources, forwarders = [], [], {}
        stream_sinks: dict[str, tuple[str, str]] = {}
        if gen is not None:
            for name, s in gen.sinks.items():
                st = s.state()
                sinks.append(
                    {"name": name, "type": gen.config.sinks[name].type, "state": st.state,
                     "since": st.since, "last_error": st.last_error}
                )  # fmt: skip
            for name, src in gen.sources.items():
                st = src.state()
                sources.append(
                    {"name": name, "type": gen.source_types[name], "stream": src.stream,
                     "state": st.state, "since": st.since, "last_error": st.last_error,
                     "detail": st.detail}
                )  # fmt: skip
            for stream, fw in gen.forwarders.items():
                forwarders[stream] = {"state": fw.status.state, "last_error": fw.status.last_error}
            for r in rows:
                stream_sinks[r["name"]] = (cfg.sink_for(r["name"]), cfg.priority_of(r["name"]))
        hb = {
            "pid": os.getpid(),
            "at": now,
            "started_at": self.started_at,
            "version": __version__,
            "agent_id": cfg.agent.id,
            "plant": cfg.agent.plant,
            "sinks": sinks,
            "sources": sources,
            "forwarders": forwarders,
            "stream_sinks": stream_sinks,
            "ingest_rate_eps": rate_eps,
            "net_fill_bps": net_fill,
            "refused": dict(buffer.refused_by_stream),
            "last_write_error": buffer.last_write_error,
            "accepting": buffer.has_room(),
            "stopped": stopped,
        }
        assert self._heartbeat is not None
        self._heartbeat.write(hb)
        self._snapshot = build_snapshot(
            rows=rows,
            heartbeat=hb,
            meta={"epoch": buffer.epoch},
            path=Path(cfg.buffer.path),
            max_bytes=cfg.buffer.max_bytes,
            on_full=cfg.buffer.on_full,
            durability=cfg.buffer.durability,
            agent_id=cfg.agent.id,
            plant=cfg.agent.plant,
            version=__version__,
            stream_sinks=stream_sinks,
            now=now,
            running=not stopped,
        )
        if self._notifier is not None and not stopped:
            backlog = sum(s.backlog_events for s in self._snapshot.streams)
            self._notifier.status(f"backlog {backlog} events; {rate_eps:.0f} events/s in")

    # ------------------------------------------------------------------ metrics

    async def _start_metrics(self) -> None:
        m = self.config.metrics
        if not m.enabled:
            return
        from agent.metrics import MetricsServer

        server = MetricsServer(m.listen, self.snapshot, self.readiness)
        try:
            await server.start()
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s (%s); running without metrics "
                "(set metrics.listen to a free port)",
                m.listen,
                exc.strerror or exc,
            )
            return
        self._metrics = server

    async def _stop_metrics(self) -> None:
        """Part of the service phase (the server gives a scrape in progress 0.5 s)."""
        server, self._metrics = self._metrics, None
        if server is None:
            return
        try:
            async with asyncio.timeout_at(self._service_deadline or deadline("service")):
                await server.stop()
        except Exception as exc:  # noqa: BLE001 - the port is freed at exit in any case
            log.warning("metrics server did not stop cleanly: %s", exc)

    def _observe(self, stream: str, sink: str, seconds: float, events: int, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.observe_batch(stream, sink, seconds, events, outcome)


async def run_agent(config_path: Path) -> None:
    """Entry point of `edge-agent run`: load, run until signalled."""
    from agent.gc_tuning import tune_for_ingest

    cfg = load_config(config_path)
    agent = Agent(cfg, config_path)
    agent.install_signal_handlers()
    tune_for_ingest()  # after start-up's imports and config: see agent/gc_tuning.py
    await agent.run()


def _discard(listeners: list[Any], listener: Any) -> None:
    with contextlib.suppress(ValueError):
        listeners.remove(listener)


__all__ = ["STOP_TIMEOUT", "Agent", "ConfigError", "run_agent"]

"""A sink's outage in a few log lines, however long it lasts.

A retry every few seconds is the forwarder doing its job, not news: logged one by one, a
three-day WAN outage was 34k warnings per stream. So a sink's failures become:

* the first failure: one WARNING (ERROR when the central side refuses our credentials),
  with the batch's identity (stream, batch id, sequences) as fields;
* while it lasts: at most one summary line per interval (a minute), "sink central still
  failing for 3m02s: 41 retries, backlog 12,345, oldest 3m05s (last error: ...)";
  a change of kind (retrying -> credentials refused, or back) is said at once;
* on recovery: one INFO line with the outage's length.

So an outage of length T costs at most ``T / interval + 2`` lines (plus one per change of
kind), whatever the retry rate. One ``SinkOutage`` per sink, shared by the forwarders of
every stream that goes to it (the outage ends when none of them is failing any more).
``EDGE_AGENT_LOG_SUMMARY_INTERVAL`` (seconds) shortens the interval for tests.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent.status import human_duration

log = logging.getLogger("edge_agent.forwarder")

DEFAULT_SUMMARY_INTERVAL = 60.0

#: (streams) -> (backlog events, oldest unsent age in seconds or None), for the summaries
Figures = Callable[[set[str]], Awaitable[tuple[int, float | None]]]


def summary_interval() -> float:
    raw = os.environ.get("EDGE_AGENT_LOG_SUMMARY_INTERVAL")
    try:
        return max(0.01, float(raw)) if raw else DEFAULT_SUMMARY_INTERVAL
    except ValueError:
        return DEFAULT_SUMMARY_INTERVAL


def _age(seconds: float) -> str:
    return human_duration(seconds) if seconds >= 1 else f"{seconds:.1f}s"


class SinkOutage:
    def __init__(
        self,
        sink: str,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.interval = summary_interval() if interval is None else interval
        self.clock = clock
        self.started: float | None = None
        self.failing: set[str] = set()
        self.involved: set[str] = set()  # every stream that failed during this outage
        self.retries = 0
        self.auth = False
        self.last_reason: str | None = None
        self._last_line = 0.0
        self.lines = 0  # lines logged for this sink, all outages (for tests and status)

    @property
    def ongoing(self) -> bool:
        return self.started is not None

    async def failed(
        self,
        stream: str,
        reason: str | None,
        *,
        auth: bool = False,
        retry_in: float | None = None,
        extra: dict[str, Any] | None = None,
        figures: Figures | None = None,
    ) -> None:
        now = self.clock()
        self.failing.add(stream)
        self.involved.add(stream)
        self.last_reason = reason
        if self.started is None:
            self.started, self.retries, self.auth = now, 0, auth
            self._first(stream, reason, auth, retry_in, extra)
            return
        self.retries += 1
        if auth != self.auth:
            self.auth = auth
            self._first(stream, reason, auth, retry_in, extra, again=True)
            return
        if now - self._last_line < self.interval:
            return
        # Claim this summary before awaiting the figures: another stream's forwarder may
        # fail meanwhile, and must not write a second one.
        self._last_line = now
        started = self.started
        backlog, oldest = await figures(set(self.failing)) if figures else (None, None)
        parts = [f"{self.retries:,} retries"]
        if backlog is not None:
            parts.append(f"backlog {backlog:,}")
        if oldest is not None:
            parts.append(f"oldest {_age(oldest)}")
        what = "still refused its credentials" if auth else "still failing"
        self._log(
            logging.ERROR if auth else logging.WARNING,
            "sink %s %s for %s: %s (last error: %s)",
            self.sink,
            what,
            _age(now - started),
            ", ".join(parts),
            reason,
            extra={"sink": self.sink, "outcome": "auth" if auth else "retry"},
        )

    async def delivered(self, stream: str, figures: Figures | None = None) -> None:
        self.failing.discard(stream)
        if self.started is None or self.failing:
            return
        # End the outage before awaiting anything: the other streams' forwarders deliver
        # too, and exactly one of them may say so.
        length = self.clock() - self.started
        retries, involved = self.retries, self.involved
        self.started, self.retries, self.auth, self.involved = None, 0, False, set()
        backlog, _ = await figures(involved) if figures else (None, None)
        draining = f"; draining a backlog of {backlog:,}" if backlog else ""
        self._log(
            logging.INFO,
            "sink %s delivering again after an outage of %s (%s retries)%s",
            self.sink,
            _age(length),
            f"{retries:,}",
            draining,
            extra={"sink": self.sink, "stream": stream, "outage_s": round(length, 3)},
        )

    def _first(
        self,
        stream: str,
        reason: str | None,
        auth: bool,
        retry_in: float | None,
        extra: dict[str, Any] | None,
        again: bool = False,
    ) -> None:
        summary = f"a summary at most every {_age(self.interval)} until it recovers"
        if auth:
            self._log(
                logging.ERROR,
                "sink %s: THE CENTRAL SIDE REFUSES OUR CREDENTIALS (stream %s): %s. Nothing is "
                "dropped; retrying. Fix the token or certificate of sink %s (%s)",
                self.sink,
                stream,
                reason,
                self.sink,
                summary,
                extra=extra,
            )
            return
        when = f" in {retry_in:.1f} s" if retry_in is not None else ""
        self._log(
            logging.WARNING,
            "sink %s %s (stream %s): %s; retrying%s, nothing is dropped (%s)",
            self.sink,
            "failing again, no longer refusing credentials" if again else "failing",
            stream,
            reason,
            when,
            summary,
            extra=extra,
        )

    def _log(self, level: int, msg: str, *args: Any, extra: dict[str, Any] | None) -> None:
        self._last_line = self.clock()
        self.lines += 1
        log.log(level, msg, *args, extra=extra)


class SinkOutages:
    """The outage trackers of one agent, by sink name (kept across reloads: an outage
    that goes on while the config is reloaded stays one outage)."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval
        self._by_sink: dict[str, SinkOutage] = {}

    def get(self, sink: str) -> SinkOutage:
        tracker = self._by_sink.get(sink)
        if tracker is None:
            tracker = self._by_sink[sink] = SinkOutage(sink, interval=self.interval)
        return tracker

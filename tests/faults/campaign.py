"""Shared tools of the fault campaign: an MES client that remembers every 202, and the
delivery check every fault test ends with.

Knobs (environment):

    EDGE_AGENT_FAULTS_LONG=1   the long run: more kills, longer flapping (minutes, not seconds)
    EDGE_AGENT_FAULTS_SEED=N   replay a run's random moments (each test prints its seed)
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.adapters.test_mes_http import event

LONG = os.environ.get("EDGE_AGENT_FAULTS_LONG", "") not in ("", "0")
TOKEN = "faults-token-7"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STREAM = "mes"
BUSINESS = "mfg.production.completed"


def seeded(name: str) -> random.Random:
    seed = int(os.environ.get("EDGE_AGENT_FAULTS_SEED", str(time.time_ns() % 1_000_000)))
    print(f"{name}: EDGE_AGENT_FAULTS_SEED={seed}")
    return random.Random(seed)


def mes_source(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "mes_http",
        "stream": STREAM,
        "listen": f"127.0.0.1:{port}",
        "token": TOKEN,
        "retry_after": "1s",
        **extra,
    }


def number_of(e: dict[str, Any]) -> int:
    """The MES's own number of an event, from its payload (work order WO-<4700+n>)."""
    return int(e["data"]["work_order"].removeprefix("WO-")) - 4700


def wait_listening(agent: Any, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert agent.proc.poll() is None, f"agent exited:\n{agent.log()[-3000:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(
        f"mes_http not listening on {port} after {timeout}s\n{agent.log()[-3000:]}"
    )


@dataclass
class Ack:
    id: str
    sequence: int
    duplicate: bool


@dataclass
class MesClient:
    """An MES pushing numbered events in small requests, as a real one would: an unanswered
    request (agent killed, refused, timed out) is sent again, the same events, until it gets
    a 202. ``acked`` holds what each 202 promised: number -> (id, sequence)."""

    port: int
    batch: int = 5
    pause: float = 0.0
    give_up_on_503: bool = False
    acked: dict[int, Ack] = field(default_factory=dict)
    statuses: dict[int | str, int] = field(default_factory=dict)
    retry_after: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # numbers given up after a 503
    next_number: int = 1
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mes-client", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/events"

    def start(self) -> MesClient:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the request in flight is answered (so every sent number is acked)."""
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "MES client did not finish its last request"

    def _count(self, key: int | str) -> None:
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def push_once(self, client: httpx.Client, numbers: list[int]) -> int | str:
        try:
            r = client.post(self.url, json=[event(n) for n in numbers], headers=AUTH)
        except httpx.HTTPError as exc:
            self._count(type(exc).__name__)
            return type(exc).__name__
        self._count(r.status_code)
        if r.status_code == 202:
            for n, a in zip(numbers, r.json()["events"], strict=True):
                ack = Ack(a["id"], int(a["sequence"]), bool(a["duplicate"]))
                old = self.acked.get(n)
                if old is not None and (old.id, old.sequence) != (ack.id, ack.sequence):
                    self.problems.append(f"MES-{n} acked twice differently: {old} then {ack}")
                self.acked.setdefault(n, ack)
        elif r.status_code == 503:
            self.retry_after.append(r.headers.get("Retry-After", ""))
        else:
            self.problems.append(f"unexpected {r.status_code}: {r.text[:300]}")
        return r.status_code

    def _run(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(10, connect=1)) as client:
            pending: list[int] = []
            stopping_since = 0.0
            while True:
                if not pending:
                    if self._stop.is_set():
                        return
                    pending = list(range(self.next_number, self.next_number + self.batch))
                    self.next_number += self.batch
                res = self.push_once(client, pending)
                if self._stop.is_set() and res != 202:
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > 30:
                        self.problems.append(f"never acknowledged after stop: {pending} ({res})")
                        return
                if res == 202:
                    pending = []
                    if self.pause:
                        time.sleep(self.pause)
                elif res == 503 and self.give_up_on_503:
                    self.refused.extend(pending)
                    pending = []
                    time.sleep(0.01)
                else:
                    time.sleep(0.02)


def wait_drained(agent: Any, timeout: float = 90) -> dict[str, Any]:
    """Until the agent has forwarded everything it holds (status of the running agent)."""
    return agent.wait(
        lambda s: (
            s["streams"]
            and all(
                x["backlog_events"] == 0 and x["forwarded_sequence"] == x["last_sequence"]
                for x in s["streams"]
            )
        ),
        timeout=timeout,
        what="backlog drained",
    )


def check_delivery(
    gw: Any, acked: dict[int, Ack], *, contiguous: bool = True, stream: str = STREAM
) -> dict[str, Any]:
    """The campaign's verdict. Returns a summary for the test's output.

    - the gateway's report: no missing (unexplained) sequence, none out of order, no id
      conflict (one sequence arriving with two ids);
    - (stream, sequence) -> id and MES number -> id are functions: a duplicate is always the
      same event with the same id;
    - every acknowledged event arrived, with the id and sequence its 202 promised;
    - new sequences arrive in increasing order (contiguously unless events were dropped).
    """
    report = gw.report()
    rows = [s for s in report["streams"] if s["stream"] == stream]
    assert len(rows) == 1, f"expected one epoch of {stream}: {rows}"
    rep = rows[0]
    assert rep["missing_count"] == 0, f"unexplained gaps: {rep['missing']}"
    assert rep["out_of_order"] == 0, rep
    assert rep["id_conflicts"] == 0, rep
    events = gw.events(stream)
    by_seq: dict[int, str] = {}
    by_num: dict[int, set[str]] = {}
    highest = 0
    for e in events:
        seq = int(e["sequence"])
        if seq in by_seq:
            assert by_seq[seq] == e["id"], f"sequence {seq} arrived with two ids"
            continue
        by_seq[seq] = e["id"]
        if contiguous:
            assert seq == highest + 1, f"sequence {seq} arrived after {highest}"
        else:
            assert seq > highest, f"sequence {seq} arrived after {highest}"
        highest = seq
        if e["type"] == BUSINESS:
            by_num.setdefault(number_of(e), set()).add(e["id"])
    two = {n: ids for n, ids in by_num.items() if len(ids) > 1}
    assert not two, f"one MES event stored under several ids: {dict(list(two.items())[:5])}"
    seq_of = {v: k for k, v in by_seq.items()}
    lost = [n for n in acked if n not in by_num]
    assert not lost, f"{len(lost)} acknowledged events missing at the gateway: {lost[:20]}"
    for n, ack in acked.items():
        [gid] = by_num[n]
        assert gid == ack.id, f"MES-{n}: acked id {ack.id}, gateway has {gid}"
        assert seq_of[gid] == ack.sequence, f"MES-{n}: acked sequence {ack.sequence}"
    return {
        "acked": len(acked),
        "received": rep["received"],
        "duplicates": rep["duplicates"],
        "highest_sequence": rep["highest_sequence"],
        "explained": rep["explained_count"],
    }

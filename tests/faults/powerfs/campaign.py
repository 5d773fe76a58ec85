"""The power-cut campaign: the real agent on powerfs, cut at random moments, judged by the
reference gateway.

Layout (one run, in ``workdir``):

* ``disk/``: powerfs's backing directory (what the "disk" keeps), mounted at ``mnt/``;
* ``mnt/var/edge-agent/buffer.db`` (+ -wal, -shm, .heartbeat): the buffer, in a directory
  the agent creates itself, as on a first start;
* ``mnt/drop/``: the drop folder an exporter writes files into (each file written as
  ``.part``, fsynced, renamed, the folder fsynced: an exporter that made its file durable);
* ``agent/`` (config and log) and ``gateway/`` (the reference gateway's own database):
  NOT on powerfs, they are the other machines.

One cut: the agent runs for a random while (from "still importing Python" to "busy
forwarding") while an MES pushes over HTTP and the exporter drops files; then the agent is
SIGKILLed and the power is cut at once (powerfs keeps only what was durable), powerfs is
mounted again and the agent restarted. After the last cut the agent drains everything and
the verdict is taken:

* ``durability = "fsync"``: every acknowledged event (a 202; a file seen in processed/)
  reached the gateway, with the id and sequence its 202 promised, in order, duplicates only
  under the same id; the buffer opened every time (no quarantine, one stream epoch);
* ``durability = "os"``: the same, except that acknowledged events may be missing; each
  missing one must have been acknowledged shortly before a cut (the window is reported),
  and none may have reached the gateway (a sequence never arrives with two ids).
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.faults.campaign import (
    MesClient,
    check_delivery,
    mes_source,
    wait_drained,
    wait_listening,
)
from tests.faults.powerfs.mount import PowerMount, is_mounted
from tests.fixtures.common import AgentProcess, agent_config, free_port, https_sink
from tests.fixtures.gateway import GatewayProcess

DROP_STREAM = "drop"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_event(file_no: int, n: int) -> dict[str, Any]:
    """No MES id: only the drop folder's content-hash mark prevents a second import."""
    return {
        "type": "mfg.production.counted",
        "time": "2026-11-23T10:00:00Z",
        "data": {"work_order": f"WO-D{file_no}", "item": "P-1", "good": {"value": n, "uom": "EA"}},
    }


@dataclass
class Exporter:
    """Drops a numbered file of events every ``every`` seconds, durably (see module doc).
    ``lock`` is held while it writes, so a cut never lands with one of its files open."""

    inbox: Path
    per_file: int = 8
    every: float = 0.4
    lock: threading.Lock = field(default_factory=threading.Lock)
    written: int = 0
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exporter", daemon=True)

    def start(self) -> Exporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with self.lock:
                try:
                    self._drop(self.written + 1)
                    self.written += 1
                except OSError as exc:  # the mount is gone for a moment: try again
                    self.problems.append(repr(exc))

    def _drop(self, file_no: int) -> None:
        path = self.inbox / f"export-{file_no:05d}.jsonl"
        tmp = path.with_name(path.name + ".part")
        body = b"".join(orjson.dumps(drop_event(file_no, n)) + b"\n" for n in range(self.per_file))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(self.inbox)


def processed_files(inbox: Path) -> set[int]:
    """File numbers in processed/ now: each is acknowledged (moved after its commit)."""
    d = inbox / "processed"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return set()
    return {int(n.split("-")[1].split(".")[0]) for n in names if n.startswith("export-")}


@dataclass
class Result:
    durability: str
    cuts: int
    seed: int
    mes_acked: int = 0
    files_acked: int = 0
    drop_acked: int = 0
    arrived: int = 0
    lost: list[str] = field(default_factory=list)
    loss_window_s: float = 0.0  # the longest time from a lost event's 202 to its cut
    failures: list[str] = field(default_factory=list)
    restarts_opened: int = 0
    seconds: float = 0.0
    fs: dict[str, int] = field(default_factory=dict)

    @property
    def acknowledged(self) -> int:
        return self.mes_acked + self.drop_acked

    def summary(self) -> str:
        return (
            f"powerfs campaign ({self.durability}, seed {self.seed}): {self.cuts} cuts in "
            f"{self.seconds:.0f}s; acknowledged {self.acknowledged} (MES 202s {self.mes_acked}, "
            f"drop-folder events {self.drop_acked} in {self.files_acked} files); arrived "
            f"{self.arrived}; lost {len(self.lost)} (longest 202-to-cut of a lost one "
            f"{self.loss_window_s:.2f}s); failures {len(self.failures)}"
        )


class Campaign:
    def __init__(
        self,
        workdir: Path,
        *,
        durability: str = "fsync",
        cuts: int = 20,
        seed: int | None = None,
        names: str = "posix",
        crash: str = "lose",
        tear: bool = False,
        max_up: float = 2.5,
    ) -> None:
        self.workdir = Path(workdir)
        self.seed = seed if seed is not None else time.time_ns() % 1_000_000
        self.rng = random.Random(self.seed)
        self.result = Result(durability, cuts, self.seed)
        self.max_up = max_up
        self.fs = PowerMount(
            self.workdir / "disk", self.workdir / "mnt", names=names, crash=crash, tear=tear
        )
        self.mnt = self.workdir / "mnt"
        self.inbox = self.mnt / "drop"
        self.buffer = self.mnt / "var" / "edge-agent" / "buffer.db"
        self.gw = GatewayProcess(self.workdir / "gateway", latency_ms=20)
        self.port = free_port()
        self.durability = durability
        self.agent: AgentProcess
        self.mes = MesClient(self.port, batch=5, pause=0.005)
        self.exporter = Exporter(self.inbox)
        self.acked_files: set[int] = set()
        self.cut_times: list[float] = []
        self.ack_times: dict[int, float] = {}

    def _make_agent(self) -> AgentProcess:
        cfg = agent_config(
            self.workdir / "agent",
            sinks={"central": https_sink(self.gw)},
            sources={
                "mes": mes_source(self.port),
                DROP_STREAM: {
                    "type": "drop_folder",
                    "path": str(self.inbox),
                    "poll_interval": "100ms",
                },
            },
            buffer={"path": str(self.buffer), "durability": self.durability},
            forwarder={"max_events": 50, "linger_ms": 5},
        )
        return AgentProcess(self.workdir / "agent", cfg)

    # ------------------------------------------------------------------ pieces

    def _watch_acks(self) -> None:
        """When each 202 arrived (to measure how close to a cut a lost event was acked)."""
        while not self._stop_watch.wait(0.01):
            now = time.monotonic()
            for n in list(self.mes.acked):
                self.ack_times.setdefault(n, now)

    def _cut(self, i: int) -> None:
        self.agent.kill()
        with self.exporter.lock:
            self.acked_files |= processed_files(self.inbox)
            self.cut_times.append(time.monotonic())
            for key, value in self.fs.cut(self.seed * 1000 + i).items():
                self.result.fs[key] = self.result.fs.get(key, 0) + value
            self.fs.mount()
        self._check_log(i)

    def _check_log(self, i: int) -> None:
        text = self.agent.log()
        for word in ("quarantined", "unreadable", "Traceback"):
            count = text.count(word)
            if count > self._seen.get(word, 0):
                self._seen[word] = count
                tail = text[text.rfind(word) - 1500 : text.rfind(word) + 500]
                self.result.failures.append(f"after cut {i}: agent log says {word!r}:\n{tail}")
        if list(self.buffer.parent.glob("*.corrupt-*")) if self.buffer.parent.exists() else []:
            self.result.failures.append(f"after cut {i}: a quarantined buffer file exists")

    def run(self) -> Result:
        started = time.monotonic()
        self._seen: dict[str, int] = {}
        self._stop_watch = threading.Event()
        watcher = threading.Thread(target=self._watch_acks, daemon=True)
        self.gw.start()
        self.agent = self._make_agent()
        self.fs.mount()
        try:
            self.inbox.mkdir()
            fsync_dir(self.mnt)
            self.mes.start()
            self.exporter.start()
            watcher.start()
            for i in range(self.result.cuts):
                self.agent.start(wait_ready=False)
                # a quarter of the cuts land while the agent starts (opening, creating or
                # migrating the buffer), the rest while it is busy: ingesting and sending
                if self.rng.random() < 0.25:
                    deadline = time.monotonic() + self.rng.uniform(0.1, 3.0)
                else:
                    wait_listening(self.agent, self.port, timeout=60)
                    deadline = time.monotonic() + self.rng.uniform(0.05, self.max_up)
                while time.monotonic() < deadline:
                    if self.agent.proc is not None and self.agent.proc.poll() is not None:
                        self.result.failures.append(
                            f"cut {i}: the agent exited by itself ({self.agent.proc.returncode}):"
                            f"\n{self.agent.log()[-3000:]}"
                        )
                        break
                    time.sleep(0.02)
                self._cut(i)
                if len(self.result.failures) > 3:
                    break
            self.agent.start(wait_ready=False)
            wait_listening(self.agent, self.port, timeout=60)
            time.sleep(1)
            self.mes.stop()
            self.exporter.stop()
            self._wait_imported()
            wait_drained(self.agent, timeout=180)
            self.acked_files |= processed_files(self.inbox)
            self._stop_watch.set()
            self._verdict()
            self.agent.stop()
        finally:
            self._stop_watch.set()
            self.mes._stop.set()
            self.exporter.stop()
            if hasattr(self, "agent"):
                self.agent.kill()
            self.gw.stop()
            if is_mounted(self.mnt):
                self.fs.unmount()
            self.result.seconds = time.monotonic() - started
        return self.result

    def _wait_imported(self) -> None:
        """Until the inbox is empty; a failure only if the agent stops making progress
        (after a long run hundreds of files wait, and a loaded machine imports slowly)."""
        left: list[str] = []
        progress = time.monotonic()
        while True:
            now = [
                n
                for n in os.listdir(self.inbox)
                if n.startswith("export-") and not n.endswith(".part")
            ]
            if not now:
                return
            if len(now) != len(left):
                left, progress = now, time.monotonic()
            elif time.monotonic() - progress > 120:
                self.result.failures.append(
                    f"drop folder stuck: {len(now)} files left, none imported for 120 s: "
                    f"{sorted(now)[:5]}"
                )
                return
            time.sleep(0.2)

    # ------------------------------------------------------------------ verdict

    def _verdict(self) -> None:
        r = self.result
        r.mes_acked = len(self.mes.acked)
        r.files_acked = len(self.acked_files)
        r.drop_acked = r.files_acked * self.exporter.per_file
        r.failures += [f"MES client: {p}" for p in self.mes.problems]
        report = self.gw.report()
        r.arrived = sum(
            len({e["id"] for e in self.gw.events(s["stream"])}) for s in report["streams"]
        )
        for s in report["streams"]:
            if s["missing_count"] or s["out_of_order"] or s["id_conflicts"]:
                r.failures.append(f"gateway report for {s['stream']}: {s}")
        r.failures += self._rekeyed_batches()
        epochs = Counter(s["stream"] for s in report["streams"])
        if any(v > 1 for v in epochs.values()):
            r.failures.append(f"more than one stream epoch (a buffer was begun anew): {epochs}")
        if r.durability == "fsync":
            try:
                check_delivery(self.gw, self.mes.acked)
            except AssertionError as exc:
                r.failures.append(f"MES stream: {exc}")
        else:
            self._os_losses()
        self._drop_verdict()

    def _rekeyed_batches(self) -> list[str]:
        """A batch is persisted before its first send so that every resend carries the
        same Idempotency-Key (wire contract). Two accepted batches of one stream whose
        sequence ranges overlap under different keys mean a batch was resent under a new
        key: its batch row had not survived the cut. (No batch is split here: the gateway
        refuses nothing.)"""
        db = sqlite3.connect(f"file:{self.gw.db_path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT sk, first_sequence, last_sequence, key FROM batches ORDER BY sk, first_sequence"
            ).fetchall()
        finally:
            db.close()
        out: list[str] = []
        last: dict[int, tuple[int, int, str]] = {}
        for sk, first, lastseq, key in rows:
            prev = last.get(sk)
            if prev is not None and first <= prev[1] and key != prev[2]:
                out.append(
                    f"sequences {first}-{lastseq} resent under a new Idempotency-Key {key} "
                    f"(first sent as {prev[0]}-{prev[1]} under {prev[2]})"
                )
            if prev is None or lastseq > prev[1]:
                last[sk] = (first, lastseq, key)
        return out

    def _os_losses(self) -> None:
        """os mode: which acknowledged MES events are missing, and how close to a cut."""
        r = self.result
        arrived: dict[str, set[str]] = {}
        for e in self.gw.events("mes"):
            arrived.setdefault(e["data"]["work_order"], set()).add(e["id"])
        for n, ack in self.mes.acked.items():
            ids = arrived.get(f"WO-{4700 + n}")
            if not ids:
                r.lost.append(f"MES-{n}")
                acked_at = self.ack_times.get(n, 0.0)
                after = [t for t in self.cut_times if t >= acked_at - 0.02]
                r.loss_window_s = max(r.loss_window_s, (after[0] - acked_at) if after else 0.0)
            elif ids != {ack.id}:
                r.failures.append(f"MES-{n}: acked as {ack.id}, arrived as {sorted(ids)}")

    def _drop_verdict(self) -> None:
        r = self.result
        seen: dict[tuple[str, int], set[str]] = {}
        for e in self.gw.events(DROP_STREAM):
            key = (e["data"]["work_order"], int(e["data"]["good"]["value"]))
            seen.setdefault(key, set()).add(e["id"])
        twice = {k: v for k, v in seen.items() if len(v) > 1}
        if twice:
            r.failures.append(f"drop events imported twice (two ids): {list(twice.items())[:3]}")
        for f in sorted(self.acked_files):
            missing = [n for n in range(self.exporter.per_file) if (f"WO-D{f}", n) not in seen]
            if missing:
                if r.durability == "fsync":
                    r.failures.append(f"export-{f:05d}: moved to processed/, events {missing} lost")
                else:
                    r.lost += [f"export-{f:05d}#{n}" for n in missing]

"""The drop folder source: files in, whole files committed, then moved out of the way.

One file is one transaction. For each stable file the source

1. reads it and computes the SHA-256 of its content;
2. asks the buffer whether that hash was already committed (``has_mark``): if so, an earlier
   run committed it and died before the move, so the file only moves to processed/;
3. validates every line; any problem sends the file to rejected/ with NAME.errors.txt and
   nothing of it is stored;
4. appends all events in one ``ingest.append`` together with the mark
   ``("drop_folder:<name>", sha256)``, so "events stored" and "file done" are one commit;
5. moves the file to processed/.

A crash between 4 and 5 is healed by 2 on the next start: a file is never imported twice.
Under ``BufferFull`` the file stays where it is and is tried again at a later poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from agent.errors import BufferFull
from agent.interfaces import Committed, ComponentState, Ingest, Source, State
from agent.registry import AdapterContext

from . import files
from .config import Config
from .decode import Decoded, decode_file

log = logging.getLogger("edge_agent.sources.drop_folder")

#: seconds before a file that could not be read or moved is tried again (unless it changes)
FAILED_RETRY = 30.0


@dataclass(frozen=True, slots=True)
class _Read:
    content: bytes
    sha256: str


class DropFolderSource(Source):
    def __init__(self, name: str, config: Config, ctx: AdapterContext) -> None:
        self.name = name
        self.stream = config.stream or name
        self.config = config
        self.mark_namespace = f"drop_folder:{name}"
        self._tracker = files.StabilityTracker()
        self._state = ComponentState(state=State.STARTING, since=time.time())
        self._accepted_events = 0
        self._accepted_files = 0
        self._rejected: Counter[str] = Counter()
        self._already_imported = 0
        #: events whose MES id the buffer had already committed (a re-sent export)
        self._duplicates = 0
        self._held_back = 0
        #: files that failed for a reason an operator may fix (unreadable, cannot be moved):
        #: retried when they change or after FAILED_RETRY seconds, not at every poll
        self._failed: dict[Path, tuple[files.FileStat, float]] = {}

    # ------------------------------------------------------------------ status

    def state(self) -> ComponentState:
        self._state.detail = {
            "path": str(self.config.path),
            "accepted": self._accepted_events,
            "duplicates": self._duplicates,
            "files_imported": self._accepted_files,
            "files_already_imported": self._already_imported,
            "rejected": dict(self._rejected),
            "held_back": self._held_back,
        }
        return self._state

    def _set(self, state: str, error: str | None = None) -> None:
        self._state.change(state, error)

    # ------------------------------------------------------------------ loop

    async def run(self, ingest: Ingest) -> None:
        log.info(
            "watching %s for %s every %.1fs",
            self.config.path,
            ", ".join(self.config.patterns),
            self.config.poll_interval,
            extra={"source": self.name, "stream": self.stream},
        )
        try:
            while True:
                await self.poll_once(ingest)
                await asyncio.sleep(self.config.poll_interval)
        finally:
            self._set("stopped")

    async def poll_once(self, ingest: Ingest) -> None:
        """List the directory once and import every file that has become stable."""
        try:
            listing = await asyncio.to_thread(
                files.scan, self.config.path, tuple(self.config.patterns)
            )
        except OSError as exc:
            msg = f"cannot list {self.config.path}: {exc.strerror or exc} (create it or fix path)"
            if self._state.last_error != msg:
                log.error(msg, extra={"source": self.name})
            self._set("error", msg)
            return
        if self._state.state in ("starting", "error", "stopped"):
            self._set("connected")
        for path, stat in self._tracker.update(listing):
            failed = self._failed.get(path)
            if failed is not None and failed[0] == stat and time.monotonic() < failed[1]:
                continue
            self._failed.pop(path, None)
            if not await self._import(ingest, path, stat):
                return  # buffer full: keep the order, try again at the next poll

    # ------------------------------------------------------------------ one file

    async def _import(self, ingest: Ingest, path: Path, stat: files.FileStat) -> bool:
        """Import one file. Returns False only when the buffer is full (stop this poll)."""
        extra = {"source": self.name, "stream": self.stream, "file": path.name}
        if stat.size > self.config.max_file_size:
            await self._reject(
                path,
                "too_large",
                [
                    f"file is {stat.size} bytes, over max_file_size = {self.config.max_file_size}"
                    " (split it into smaller files or raise max_file_size)"
                ],
                0,
            )
            return True
        try:
            read = await asyncio.to_thread(self._read, path, stat)
        except OSError as exc:
            msg = f"cannot read {path}: {exc.strerror or exc} (check permissions)"
            log.error(msg, extra=extra)
            self._set("connected", msg)
            self._failed[path] = (stat, time.monotonic() + FAILED_RETRY)
            return True
        if read is None:  # still open for writing, or changed while we read it
            self._tracker.forget(path)
            return True

        if await ingest.has_mark(self.mark_namespace, read.sha256):
            # committed by an earlier run that stopped before the move
            log.info("%s was already imported; moving it to processed", path.name, extra=extra)
            self._already_imported += 1
            await self._move(path, self.config.dir("processed_dir"), read.sha256)
            return True

        decoded: Decoded = await asyncio.to_thread(
            decode_file, path.name, read.content, self.config
        )
        if decoded.problems:
            await self._reject(path, decoded.reason, decoded.problems, decoded.lines)
            return True

        committed: list[Committed] = []
        if decoded.events:
            try:
                committed = await ingest.append(
                    self.stream, decoded.events, marks=[(self.mark_namespace, read.sha256)]
                )
            except BufferFull as exc:
                self._held_back += 1
                self._set("connected", str(exc))
                log.warning("buffer full: %s stays until there is room", path.name, extra=extra)
                return False
        dups = sum(c.duplicate for c in committed)
        self._accepted_events += len(committed) - dups
        self._duplicates += dups
        self._accepted_files += 1
        await self._move(path, self.config.dir("processed_dir"), read.sha256)
        log.info("imported %s", path.name, extra={**extra, "events": len(decoded.events)})
        return True

    @staticmethod
    def _read(path: Path, stat: files.FileStat) -> _Read | None:
        """The file's bytes and hash, or None while it is still being written."""
        if files.open_for_writing(path):
            return None
        with open(path, "rb") as f:
            content = f.read()
            after = files.FileStat.of(os.fstat(f.fileno()))
        if after != stat or len(content) != stat.size:
            return None
        return _Read(content, hashlib.sha256(content).hexdigest())

    async def _reject(self, path: Path, reason: str, problems: list[str], lines: int) -> None:
        rejected_dir = self.config.dir("rejected_dir")
        self._rejected[reason] += 1
        first = problems[0] if problems else reason
        msg = f"rejected {path.name} ({len(problems)} problem(s), first: {first})"
        log.warning(msg, extra={"source": self.name, "stream": self.stream, "file": path.name})
        self._set("connected", msg)

        try:
            await asyncio.to_thread(files.reject_into, path, rejected_dir, problems, lines)
        except OSError as exc:
            self._note_move_error(path, exc)
        self._tracker.forget(path)

    async def _move(self, path: Path, directory: Path, sha256: str) -> None:
        try:
            await asyncio.to_thread(files.move_into, path, directory, sha256[:12])
        except OSError as exc:
            self._note_move_error(path, exc)
        self._tracker.forget(path)

    def _note_move_error(self, path: Path, exc: OSError) -> None:
        with contextlib.suppress(OSError):
            self._failed[path] = (files.FileStat.of(os.stat(path)), time.monotonic() + FAILED_RETRY)
        msg = f"cannot move {path}: {exc.strerror or exc} (check permissions of the folders)"
        log.error(msg, extra={"source": self.name, "file": path.name})
        self._set("error", msg)

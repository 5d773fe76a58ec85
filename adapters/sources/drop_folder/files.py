"""The file mechanics of the drop folder, kept apart from asyncio so they are easy to test.

Everything here is blocking I/O: the source calls it through ``asyncio.to_thread``.

* :func:`scan` lists candidate files (pattern match, rename convention, no directories).
* :class:`StabilityTracker` says when a file has stopped changing: the same size, mtime
  and inode on two consecutive polls, so a file still being copied in is never read.
* :func:`open_for_writing` asks the kernel whether any process still has the file open
  for writing (a Linux read lease is refused then), which catches a writer that pauses.
* :func:`move_into` moves a file into processed/ or rejected/ without overwriting an
  earlier file of the same name, and fsyncs the directories so the move survives a crash.
* :func:`write_report` writes the NAME.errors.txt report atomically.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

#: names that say "not finished yet" (copy tools, editors, our own temporary files)
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


@dataclass(frozen=True, slots=True)
class FileStat:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def is_ignored(name: str) -> bool:
    """Hidden files and the usual in-progress suffixes are never read."""
    lower = name.lower()
    return name.startswith(".") or lower.endswith(IGNORED_SUFFIXES)


def scan(directory: Path, patterns: tuple[str, ...]) -> list[tuple[Path, FileStat]]:
    """Regular files in ``directory`` (not below it) matching one of ``patterns``, oldest
    first (then by name), so files are imported in the order they were dropped."""
    found: list[tuple[Path, FileStat, float]] = []
    with os.scandir(directory) as it:
        for entry in it:
            if is_ignored(entry.name):
                continue
            if not any(fnmatch.fnmatch(entry.name.lower(), p.lower()) for p in patterns):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # moved away between listing and stat
                continue
            found.append((Path(entry.path), FileStat.of(st), st.st_mtime))
    found.sort(key=lambda t: (t[2], t[0].name))
    return [(p, s) for p, s, _ in found]


class StabilityTracker:
    """Remembers what each file looked like at the previous poll.

    A file is *stable* when its size, mtime and inode are unchanged since the previous
    poll. A writer appending to it (or a copy tool replacing it) changes one of them, so the
    file waits for another poll.
    """

    def __init__(self) -> None:
        self._seen: dict[Path, FileStat] = {}

    def update(self, current: list[tuple[Path, FileStat]]) -> list[tuple[Path, FileStat]]:
        """Record this poll; return the files that are stable, in the given order."""
        stable = [(p, s) for p, s in current if self._seen.get(p) == s]
        self._seen = dict(current)
        return stable

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)


def open_for_writing(path: Path) -> bool | None:
    """True when some process on this host has ``path`` open for writing; None when the
    kernel cannot tell (not Linux, a network filesystem, another owner): then only the
    stability rule and the rename convention protect a file still being written."""
    try:
        import fcntl

        set_lease = fcntl.F_SETLEASE
        rdlck, unlck = fcntl.F_RDLCK, fcntl.F_UNLCK
    except (ImportError, AttributeError):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.fcntl(fd, set_lease, rdlck)
        except OSError as exc:
            return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
        fcntl.fcntl(fd, set_lease, unlck)
        return False
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_name(directory: Path, name: str, tag: str) -> Path:
    """``directory/name``, or a variant with ``tag`` (and a counter) if that is taken."""
    target = directory / name
    if not target.exists():
        return target
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    base = f"{stem}.{tag}"
    for n in range(1000):
        candidate = f"{base}{'' if n == 0 else f'.{n}'}{'.' + ext if ext else ''}"
        target = directory / candidate
        if not target.exists():
            return target
    raise FileExistsError(f"no free name for {name} in {directory}")


def move_into(path: Path, directory: Path, tag: str) -> Path:
    """Move ``path`` into ``directory`` (same filesystem: an atomic rename) and make the
    rename durable. Returns the new path."""
    directory.mkdir(parents=True, exist_ok=True)
    target = free_name(directory, path.name, tag)
    _rename(path, target)
    _fsync_dir(directory)
    _fsync_dir(path.parent)
    return target


def _rename(src: Path, dst: Path) -> None:
    """An atomic rename; across filesystems a copy (fsynced) then a delete. A crash in
    between leaves the file in the inbox, and the next run moves it again (its content
    hash says it was imported), so the worst case is a second copy, never a re-import."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copy2(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        os.unlink(src)


def reject_into(path: Path, directory: Path, problems: list[str], total_lines: int) -> Path:
    """Write NAME.errors.txt into ``directory``, then move the file beside it. Returns the
    new path. The report comes first: a crash in between leaves the file in place, to be
    rejected again (with a fresh report) at the next start."""
    directory.mkdir(parents=True, exist_ok=True)
    target = free_name(directory, path.name, _stamp())
    write_report(target.with_name(target.name + ".errors.txt"), path.name, problems, total_lines)
    _rename(path, target)
    _fsync_dir(directory)
    _fsync_dir(path.parent)
    return target


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def write_report(path: Path, source_file: str, problems: list[str], total_lines: int) -> None:
    """Write the rejection report (atomically: tmp + rename)."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    head = [
        f"# {source_file} was rejected at {stamp}: nothing of it was imported.",
        f"# {len(problems)} problem(s) in {total_lines} line(s). Fix them and drop the file again.",
        "",
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(head + problems) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

"""The running agent's heartbeat, in a small file beside the buffer.

Status must keep telling the truth exactly when things go wrong, and the worst case is a
full disk: then every SQLite write fails, the heartbeat included, and status would call
a running agent dead and never say why. So the heartbeat lives in its own file, allocated
once at start (posix_fallocate) and overwritten in place: rewriting blocks a file already
owns needs no free space. A reader retries on a torn read (a write in progress).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import orjson

from agent.durable_files import FILE_MODE, fsync_dir

SIZE = 256 * 1024


def heartbeat_path(buffer_path: Path) -> Path:
    return buffer_path.with_name(buffer_path.name + ".heartbeat")


class HeartbeatFile:
    def __init__(self, buffer_path: Path) -> None:
        self.path = heartbeat_path(buffer_path)
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        with contextlib.suppress(OSError):  # the buffer's mode, whatever the umask
            os.fchmod(self._fd, FILE_MODE)
        if not existed:  # its name survives a power cut only with its directory fsynced
            with contextlib.suppress(OSError):
                fsync_dir(self.path.parent)
        try:
            os.posix_fallocate(self._fd, 0, SIZE)
        except OSError:  # filesystems without fallocate: write the zeros ourselves
            if os.fstat(self._fd).st_size < SIZE:
                os.pwrite(self._fd, b"\0" * SIZE, 0)

    def write(self, hb: dict[str, Any]) -> None:
        data = orjson.dumps(hb)
        if len(data) >= SIZE:  # never expected: drop the bulky parts rather than the beat
            slim = {**hb, "sources": [{**s, "detail": {}} for s in hb.get("sources", [])]}
            data = orjson.dumps(slim)[: SIZE - 1]
        os.pwrite(self._fd, data + b"\0" * (SIZE - len(data)), 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def read_heartbeat(buffer_path: Path) -> dict[str, Any] | None:
    path = heartbeat_path(buffer_path)
    for _ in range(5):
        try:
            raw = path.read_bytes().rstrip(b"\0")
        except OSError:
            return None
        if not raw:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            time.sleep(0.02)  # caught a write half done
            continue
        return value if isinstance(value, dict) else None
    return None

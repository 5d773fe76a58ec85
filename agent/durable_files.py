"""Files and directories that survive a power cut: the buffer, the heartbeat, the state
directory. Kept apart from the buffer because the heartbeat (and anything else beside the
buffer) needs the same rules."""

from __future__ import annotations

import os
from pathlib import Path

#: The buffer's mode (and so its -wal and -shm): the agent's user writes, members of its
#: group (``edge-agent`` on a .deb install) may read, for `edge-agent status`; others nothing.
FILE_MODE = 0o640


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (POSIX: a new, renamed or removed name
    survives a power cut only once its directory is fsynced)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(directory: Path) -> None:
    """``mkdir -p`` whose every new directory survives a power cut: each one created is
    fsynced in its parent (found by the power-cut campaign: a buffer in a directory the
    agent had created came back, after a cut, as no directory and no buffer at all)."""
    if directory.is_dir():
        return
    try:
        directory.mkdir()
    except FileNotFoundError:  # as pathlib's mkdir(parents=True): the parents first
        if directory.parent == directory:
            raise
        make_dirs_durably(directory.parent)
        make_dirs_durably(directory)
        return
    except FileExistsError:
        if directory.is_dir():
            return
        raise
    fsync_dir(directory.parent)

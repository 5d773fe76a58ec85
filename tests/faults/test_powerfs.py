"""powerfs's own tests: what was made durable survives a power cut, what was not is gone.

Each test mounts a real powerfs process (FUSE) in its tmp_path, writes through the mount
with ordinary system calls, cuts the power, mounts again and looks.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.powerfs.mount import PowerMount


@pytest.fixture
def powerfs(tmp_path: Path) -> Iterator[Callable[..., PowerMount]]:
    made: list[PowerMount] = []

    def make(**options: object) -> PowerMount:
        m = PowerMount(tmp_path / f"backing{len(made)}", tmp_path / f"mnt{len(made)}", **options)  # type: ignore[arg-type]
        made.append(m)
        return m.mount()

    yield make
    for m in made:
        m.unmount()


def write(path: Path, data: bytes, *, sync: bool = False, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reboot(m: PowerMount, seed: int = 0) -> Path:
    m.cut(seed)
    m.mount()
    return m.mountpoint


def test_synced_data_survives_and_unsynced_writes_are_gone(powerfs):
    m = powerfs()
    d = m.mountpoint
    write(d / "f", b"durable", sync=True)
    sync_dir(d)
    write(d / "f", b"+lost", flags=os.O_APPEND)
    assert (d / "f").read_bytes() == b"durable+lost"  # before the cut everything is visible
    d = reboot(m)
    assert (d / "f").read_bytes() == b"durable"


def test_fdatasync_makes_data_durable_too(powerfs):
    m = powerfs()
    d = m.mountpoint
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 10000)
    os.fdatasync(fd)
    os.close(fd)
    sync_dir(d)
    d = reboot(m)
    assert (d / "f").read_bytes() == b"x" * 10000


def test_a_name_needs_an_fsync_of_its_directory(powerfs):
    m = powerfs()
    d = m.mountpoint
    (d / "sub").mkdir()
    sync_dir(d)
    write(d / "sub" / "synced-file-only", b"data", sync=True)  # file fsynced, dir not
    write(d / "sub" / "named", b"never synced")
    write(d / "sub" / "both", b"kept", sync=True)
    sync_dir(d / "sub")
    write(d / "sub" / "after", b"x", sync=True)
    d = reboot(m)
    assert sorted(os.listdir(d / "sub")) == ["both", "named", "synced-file-only"]
    assert (d / "sub" / "both").read_bytes() == b"kept"
    # the name was durable (the directory was synced after it), its data never was
    assert (d / "sub" / "named").read_bytes() == b""


def test_unsynced_create_is_gone_even_if_its_data_was_synced(powerfs):
    m = powerfs()
    d = m.mountpoint
    write(d / "f", b"data", sync=True)
    d = reboot(m)
    assert os.listdir(d) == []


def test_unlink_and_rename_are_undone_without_a_directory_fsync(powerfs):
    m = powerfs()
    d = m.mountpoint
    (d / "a").mkdir()
    (d / "b").mkdir()
    write(d / "a" / "gone", b"1", sync=True)
    write(d / "a" / "moved", b"2", sync=True)
    write(d / "a" / "moved-synced-dst", b"3", sync=True)
    for p in (d, d / "a", d / "b"):
        sync_dir(p)
    (d / "a" / "gone").unlink()
    (d / "a" / "moved").rename(d / "b" / "moved")
    (d / "a" / "moved-synced-dst").rename(d / "b" / "moved-synced-dst")
    sync_dir(d / "b")  # the destination side of both renames is durable, the source is not
    d = reboot(m)
    assert sorted(os.listdir(d / "a")) == ["gone", "moved", "moved-synced-dst"]
    # POSIX's rule lets a cut keep a file under both names
    assert sorted(os.listdir(d / "b")) == ["moved", "moved-synced-dst"]
    assert (d / "b" / "moved").read_bytes() == b"2"


def test_truncate_is_undone_unless_synced(powerfs):
    m = powerfs()
    d = m.mountpoint
    write(d / "f", b"0123456789", sync=True)
    write(d / "g", b"0123456789", sync=True)
    sync_dir(d)
    os.truncate(d / "f", 3)
    fd = os.open(d / "g", os.O_WRONLY)
    os.ftruncate(fd, 4)
    os.fsync(fd)
    os.close(fd)
    d = reboot(m)
    assert (d / "f").read_bytes() == b"0123456789"
    assert (d / "g").read_bytes() == b"0123"


def test_ordered_names_any_fsync_commits_every_name_so_far(powerfs):
    m = powerfs(names="ordered")
    d = m.mountpoint
    (d / "x").mkdir()
    write(d / "x" / "other", b"unsynced data")
    write(d / "f", b"data", sync=True)  # the journal commit takes every name with it
    write(d / "late", b"z")
    d = reboot(m)
    assert sorted(os.listdir(d)) == ["f", "x"]
    assert os.listdir(d / "x") == ["other"]
    assert (d / "x" / "other").read_bytes() == b""  # names, not data
    assert (d / "f").read_bytes() == b"data"


def test_tear_keeps_a_sector_aligned_part_of_the_last_unsynced_write(powerfs):
    old, new = b"o" * 8192, b"n" * 8192
    outcomes: set[tuple[bool, ...]] = set()
    m = powerfs(tear=True)
    for seed in range(6):
        d = m.mountpoint
        write(d / "f", old, sync=True)
        sync_dir(d)
        write(d / "f", b"e" * 100)  # an earlier unsynced write: lost all the same
        write(d / "f", new)
        d = reboot(m, seed)
        got = (d / "f").read_bytes()
        assert len(got) == 8192
        sectors = [got[i : i + 512] for i in range(0, 8192, 512)]
        assert all(s in (old[:512], new[:512]) for s in sectors), "a sector was split"
        outcomes.add(tuple(s == new[:512] for s in sectors))
    assert len(outcomes) > 1, "tearing never varied with the seed"


def test_reorder_keeps_a_seeded_subset_of_unsynced_writes(powerfs):
    m = powerfs(crash="reorder")
    d = m.mountpoint
    write(d / "f", b"." * 64, sync=True)
    sync_dir(d)
    fd = os.open(d / "f", os.O_WRONLY)
    for i in range(64):
        os.pwrite(fd, b"#", i)
    os.close(fd)
    d = reboot(m, 7)
    got = (d / "f").read_bytes()
    assert 0 < got.count(b"#") < 64, got


def test_shared_mmap_works_and_is_not_durable_by_itself(powerfs):
    m = powerfs()
    d = m.mountpoint
    write(d / "shm", b"\0" * 4096, sync=True)
    sync_dir(d)
    with open(d / "shm", "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
        mm[:5] = b"hello"  # no msync: MS_SYNC is an fsync (and so would be durable)
    assert (d / "shm").read_bytes()[:5] == b"hello"
    d = reboot(m)
    assert (d / "shm").read_bytes()[:5] == b"\0" * 5


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_sqlite_wal_commits_survive_only_when_synced(powerfs, synchronous):
    m = powerfs()
    path = m.mountpoint / "t.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.execute("CREATE TABLE t (x)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the table is durable in both modes
    for i in range(50):
        db.execute("INSERT INTO t VALUES (?)", (i,))
    db.close()  # a clean close: checkpointed, durable in both modes
    # the commits under test come from a process that dies with its connection open
    program = Path(__file__).parents[1] / "fixtures" / "programs" / "sqlite_commit_and_die.py"
    assert subprocess.run([sys.executable, str(program), str(path), synchronous]).returncode == -9
    reboot(m)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
    count = db.execute("SELECT count(*) FROM t").fetchone()[0]
    db.close()
    assert count == (80 if synchronous == "FULL" else 50)

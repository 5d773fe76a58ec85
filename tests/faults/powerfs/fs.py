"""powerfs: a FUSE filesystem that forgets, at a power cut, whatever was not made durable.

Run as its own process (``python -m tests.faults.powerfs.fs BACKING MOUNTPOINT``); the test
talks to it through tests/faults/powerfs/mount.py. Everything written through the mount
lives in this process's memory. The backing directory holds only the *durable* state, the
one a disk would still have after the power went: file contents as of their last
fsync/fdatasync, and directory entries as of their directory's last fsync.

The rules (``--names posix``, the default; POSIX's, and what LazyFS and ALICE assume):

* a file's data and size become durable by an fsync or fdatasync *of that file* (the two
  are the same here: fdatasync also keeps the size, which is all SQLite needs);
* a name (create, rename's two sides, unlink, mkdir, rmdir) becomes durable by an fsync
  *of the directory that holds it*; an fsync of a file does not make its name durable.
  A rename between two directories is durable on each side by that side's fsync, so a cut
  can leave the file under both names, or neither;
* closing a file, and a process dying, make nothing durable.

``--names ordered`` models ext4 with ``data=ordered`` (and any journaling filesystem that
commits all metadata in one journal): *any* fsync or fdatasync, of any file or directory,
commits every name operation made so far, on the whole filesystem, in order. File data is
still durable only by an fsync of its own file. (ext4's five-second background journal
commit is not modelled: between fsyncs nothing becomes durable on its own, the worst case.)

A power cut (a write of ``cut SEED`` to the hidden control file ``/.powerfs``) then drops
what is not durable. ``--crash`` says how much of the not-durable state the "disk" kept:

* ``lose`` (default): nothing of it (LazyFS's default; the disk kept only what was synced);
* ``reorder``: a random subset (seeded) of each file's unsynced writes and truncates, and of
  each directory's unsynced name operations, applied in their order with the others left
  out: the kernel writes dirty pages back whenever and in whatever order it likes.

(Only the last 1024 unsynced operations of a file are candidates; older ones are lost.)

``--tear`` additionally lets the last unsynced write of every file half-happen: a random
subset of its 512-byte sectors reaches the disk, the rest does not.

After the cut the filesystem answers EIO to everything; the controller unmounts it and
starts a new process over the same backing directory, which sees only the durable state.

Not modelled: extended attributes, hard links, symlinks, the page cache's own durability of
mmap'd pages (written back to us as writes, and treated as such), a disk that lies about
flushes. ``direct_io`` is not used, so shared writable mmap works (SQLite's -shm file).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mfusepy as fuse

CONTROL = "/.powerfs"
SECTOR = 512
#: --crash reorder / --tear consider at most this many of a file's latest unsynced writes
MAX_PENDING = 1024


@dataclass
class Node:
    ino: int
    is_dir: bool
    mode: int
    mtime_ns: int = field(default_factory=time.time_ns)
    # files
    data: bytearray = field(default_factory=bytearray)
    dirty: list[tuple[int, int]] = field(default_factory=list)  # ranges to write at fsync
    pending: list[tuple[str, int, bytes]] = field(default_factory=list)  # for reorder/tear
    # directories
    entries: dict[str, int] = field(default_factory=dict)
    durable_entries: dict[str, int] = field(default_factory=dict)
    name_log: list[tuple[str, int | None]] = field(default_factory=list)  # since last fsync


def _err(code: int) -> fuse.FuseOSError:
    return fuse.FuseOSError(code)


class PowerFS(fuse.Operations):
    use_ns = True

    def __init__(
        self, backing: Path, *, names: str = "posix", crash: str = "lose", tear: bool = False
    ) -> None:
        self.backing = backing
        self.data_dir = backing / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.crash = crash
        self.tear = tear
        self.dead = False
        self.meta_dirty = False
        self.nodes: dict[int, Node] = {}
        self.handles: dict[int, int] = {}  # fh -> ino
        self.next_fh = 1
        self.stats = {"fsync": 0, "fsyncdir": 0, "writes": 0}
        self._load()

    # ------------------------------------------------------------------ durable state

    def _meta_path(self) -> Path:
        return self.backing / "meta.json"

    def _load(self) -> None:
        meta_path = self._meta_path()
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
        else:
            meta = {"next_ino": 2, "nodes": {"1": {"dir": True, "mode": 0o40755, "entries": {}}}}
        self.next_ino = int(meta["next_ino"])
        raw = {int(k): v for k, v in meta["nodes"].items()}
        # only what the durable directory tree reaches exists after a cut
        reach: set[int] = set()
        todo = [1]
        while todo:
            ino = todo.pop()
            if ino in reach or ino not in raw:
                continue
            reach.add(ino)
            if raw[ino]["dir"]:
                todo.extend(raw[ino]["entries"].values())
        for ino in reach:
            r = raw[ino]
            node = Node(ino, r["dir"], r["mode"])
            if node.is_dir:
                node.entries = {k: v for k, v in r["entries"].items() if v in reach}
                node.durable_entries = dict(node.entries)
            else:
                p = self.data_dir / str(ino)
                node.data = bytearray(p.read_bytes()) if p.exists() else bytearray()
            self.nodes[ino] = node
        for p in self.data_dir.iterdir():
            if not p.name.isdigit() or int(p.name) not in reach:
                p.unlink()
        self._write_meta()

    def _write_meta(self) -> None:
        """The durable directory tree (and the inodes it names) to meta.json, atomically."""
        nodes: dict[str, Any] = {}
        for ino, n in self.nodes.items():
            if n.is_dir:
                nodes[str(ino)] = {"dir": True, "mode": n.mode, "entries": n.durable_entries}
            else:
                nodes[str(ino)] = {"dir": False, "mode": n.mode}
        self.meta_dirty = False
        tmp = self.backing / "meta.json.tmp"
        tmp.write_text(json.dumps({"next_ino": self.next_ino, "nodes": nodes}))
        os.replace(tmp, self._meta_path())

    def _persist_data(self, node: Node) -> None:
        """Write the node's dirty ranges and size to its durable file."""
        p = self.data_dir / str(node.ino)
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = len(node.data)
            for start, end in node.dirty:
                end = min(end, size)
                if start < end:
                    os.pwrite(fd, bytes(node.data[start:end]), start)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        node.dirty.clear()
        node.pending.clear()

    def _commit_dir(self, node: Node) -> None:
        if node.durable_entries != node.entries:
            node.durable_entries = dict(node.entries)
            self.meta_dirty = True
        node.name_log.clear()

    def _commit_all_names(self) -> None:
        for n in self.nodes.values():
            if n.is_dir:
                self._commit_dir(n)

    # ------------------------------------------------------------------ the power cut

    def power_cut(self, seed: int) -> dict[str, Any]:
        """Keep on the "disk" only what the rules (and --crash/--tear) let survive."""
        rng = random.Random(seed)
        kept_writes = torn = kept_names = 0
        for node in list(self.nodes.values()):
            if node.is_dir or not node.pending:
                continue
            ops = node.pending
            chosen: list[tuple[str, int, bytes]] = []
            if self.crash == "reorder":
                chosen = [op for op in ops if rng.random() < 0.5]
                kept_writes += len(chosen)
            last_write = next((op for op in reversed(ops) if op[0] == "w"), None)
            if self.tear and last_write is not None and last_write not in chosen:
                _, off, buf = last_write
                first = off // SECTOR
                last = (off + len(buf) - 1) // SECTOR
                for s in range(first, last + 1):
                    if rng.random() < 0.5:
                        a, b = max(off, s * SECTOR), min(off + len(buf), (s + 1) * SECTOR)
                        chosen.append(("w", a, buf[a - off : b - off]))
                        torn += 1
            if chosen:
                p = self.data_dir / str(node.ino)
                fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    for kind, off, buf in chosen:
                        if kind == "w":
                            os.pwrite(fd, buf, off)
                        else:
                            os.ftruncate(fd, off)
                finally:
                    os.close(fd)
        if self.crash == "reorder":
            for node in self.nodes.values():
                if not node.is_dir:
                    continue
                for name, ino in node.name_log:
                    if rng.random() < 0.5:
                        kept_names += 1
                        if ino is None:
                            node.durable_entries.pop(name, None)
                        else:
                            node.durable_entries[name] = ino
        self._write_meta()
        self.dead = True
        return {"kept_writes": kept_writes, "torn_sectors": torn, "kept_names": kept_names}

    # ------------------------------------------------------------------ helpers

    def _check(self) -> None:
        if self.dead:
            raise _err(errno.EIO)

    def _lookup(self, path: str) -> Node:
        node = self.nodes[1]
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not node.is_dir:
                raise _err(errno.ENOTDIR)
            ino = node.entries.get(part)
            if ino is None:
                raise _err(errno.ENOENT)
            node = self.nodes[ino]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head or "/")
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        return parent, name

    def _link(self, parent: Node, name: str, ino: int | None) -> None:
        if ino is None:
            parent.entries.pop(name, None)
        else:
            parent.entries[name] = ino
        parent.name_log.append((name, ino))
        parent.mtime_ns = time.time_ns()

    def _node_of(self, path: str | None, fh: int | None) -> Node:
        if fh is not None and fh in self.handles:
            return self.nodes[self.handles[fh]]
        if path is None:
            raise _err(errno.EBADF)
        return self._lookup(path)

    def _new_fh(self, ino: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = ino
        return fh

    def _durable(self, node: Node, is_dir: bool) -> None:
        if is_dir:
            self.stats["fsyncdir"] += 1
            self._commit_dir(node)
        else:
            self.stats["fsync"] += 1
            self._persist_data(node)
        if self.names == "ordered":
            self._commit_all_names()
        if self.meta_dirty:
            self._write_meta()

    # ------------------------------------------------------------------ FUSE operations

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == CONTROL:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
        self._check()
        node = self._node_of(path, fh)
        refs = 2 if node.is_dir else 1
        return {
            "st_ino": node.ino,
            "st_mode": node.mode,
            "st_nlink": refs,
            "st_size": 4096 if node.is_dir else len(node.data),
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
            "st_atime": node.mtime_ns,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.mtime_ns,
            "st_blksize": 4096,
            "st_blocks": (len(node.data) + 511) // 512,
        }

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        self._check()
        node = self._lookup(path)
        # a dirent with inode 0 is skipped by readdir(3): give each its real number
        out = [(".", {"st_ino": node.ino, "st_mode": node.mode}, 0)]
        out.append(("..", {"st_ino": 1, "st_mode": stat.S_IFDIR | 0o755}, 0))
        for name, ino in node.entries.items():
            out.append((name, {"st_ino": ino, "st_mode": self.nodes[ino].mode}, 0))
        return out

    def statfs(self, path: str) -> dict[str, int]:
        used = sum(len(n.data) for n in self.nodes.values()) // 4096
        total = 1 << 20  # 4 GiB of 4 KiB blocks
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": total,
            "f_bfree": total - used,
            "f_bavail": total - used,
            "f_files": 1 << 20,
            "f_ffree": (1 << 20) - len(self.nodes),
            "f_namemax": 255,
        }

    def access(self, path: str, amode: int) -> int:
        if path != CONTROL:
            self._check()
            self._lookup(path)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._check()
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        node = Node(self.next_ino, True, stat.S_IFDIR | (mode & 0o7777))
        self.next_ino += 1
        self.nodes[node.ino] = node
        self._link(parent, name, node.ino)
        return 0

    def rmdir(self, path: str) -> int:
        self._check()
        parent, name = self._parent(path)
        node = self._lookup(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if node.entries:
            raise _err(errno.ENOTEMPTY)
        self._link(parent, name, None)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._check()
        parent, name = self._parent(path)
        ino = parent.entries.get(name)
        if ino is None:
            node = Node(self.next_ino, False, stat.S_IFREG | (mode & 0o7777))
            self.next_ino += 1
            self.nodes[node.ino] = node
            self._link(parent, name, node.ino)
            ino = node.ino
        return self._new_fh(ino)

    def open(self, path: str, flags: int) -> int:
        if path == CONTROL:
            return 0
        self._check()
        node = self._lookup(path)
        if flags & os.O_TRUNC and not node.is_dir:
            self._truncate(node, 0)
        return self._new_fh(node.ino)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._check()
        node = self._node_of(path, fh)
        return bytes(node.data[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if path == CONTROL:
            return self._control(data)
        self._check()
        node = self._node_of(path, fh)
        end = offset + len(data)
        if len(node.data) < offset:
            node.data.extend(b"\0" * (offset - len(node.data)))
        node.data[offset:end] = data
        node.dirty.append((offset, end))
        if self.crash == "reorder" or self.tear:
            node.pending.append(("w", offset, bytes(data)))
            if len(node.pending) > MAX_PENDING:  # older ones count as lost (bounded memory)
                del node.pending[: len(node.pending) - MAX_PENDING]
        node.mtime_ns = time.time_ns()
        self.stats["writes"] += 1
        if len(node.dirty) > 4096:
            node.dirty = _merge(node.dirty)
        return len(data)

    def _truncate(self, node: Node, length: int) -> None:
        old = len(node.data)
        if length < old:
            del node.data[length:]
            node.dirty.append((length, old))
        else:
            node.data.extend(b"\0" * (length - old))
            node.dirty.append((old, length))
        if self.crash == "reorder" or self.tear:
            node.pending.append(("t", length, b""))
        node.mtime_ns = time.time_ns()

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if path == CONTROL:
            return 0
        self._check()
        node = self._node_of(path, fh)
        if node.is_dir:
            raise _err(errno.EISDIR)
        self._truncate(node, length)
        return 0

    def unlink(self, path: str) -> int:
        self._check()
        parent, name = self._parent(path)
        node = self._lookup(path)
        if node.is_dir:
            raise _err(errno.EISDIR)
        self._link(parent, name, None)
        return 0

    def rename(self, old: str, new: str) -> int:
        self._check()
        src_parent, src_name = self._parent(old)
        node = self._lookup(old)
        dst_parent, dst_name = self._parent(new)
        target = dst_parent.entries.get(dst_name)
        if target is not None and self.nodes[target].is_dir:
            if not node.is_dir:
                raise _err(errno.EISDIR)
            if self.nodes[target].entries:
                raise _err(errno.ENOTEMPTY)
        self._link(src_parent, src_name, None)
        self._link(dst_parent, dst_name, node.ino)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self._check()
        node = self._lookup(path)
        node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        self.meta_dirty = True
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._check()
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._check()
        node = self._lookup(path)
        node.mtime_ns = times[1] if times else time.time_ns()
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close(2) makes nothing durable

    def release(self, path: str, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._check()
        node = self._node_of(path, fh)
        self._durable(node, node.is_dir)
        return 0

    def opendir(self, path: str) -> int:
        self._check()
        node = self._lookup(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        return self._new_fh(node.ino)

    def releasedir(self, path: str, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self._check()
        node = self._node_of(path, fh)
        self._durable(node, True)
        return 0

    # ------------------------------------------------------------------ control

    def _control(self, data: bytes) -> int:
        words = data.decode().split()
        if words[:1] == ["cut"]:
            seed = int(words[1]) if len(words) > 1 else 0
            result = self.power_cut(seed)
            (self.backing / "last_cut.json").write_text(json.dumps({**result, **self.stats}))
        elif words[:1] == ["stats"]:
            (self.backing / "stats.json").write_text(json.dumps(self.stats))
        else:
            raise _err(errno.EINVAL)
        return len(data)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="powerfs", description=__doc__.split("\n\n")[0])
    ap.add_argument("backing", type=Path)
    ap.add_argument("mountpoint", type=Path)
    ap.add_argument("--names", choices=["posix", "ordered"], default="posix")
    ap.add_argument("--crash", choices=["lose", "reorder"], default="lose")
    ap.add_argument("--tear", action="store_true")
    args = ap.parse_args(argv)
    ops = PowerFS(args.backing, names=args.names, crash=args.crash, tear=args.tear)
    print(f"powerfs: serving {args.mountpoint} over {args.backing}", file=sys.stderr, flush=True)
    fuse.FUSE(
        ops,
        str(args.mountpoint),
        foreground=True,
        nothreads=True,
        use_ino=True,
        fsname="powerfs",
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )


if __name__ == "__main__":
    main()

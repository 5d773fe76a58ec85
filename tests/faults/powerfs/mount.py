"""Driving a powerfs process from a test: mount, power cut, remount, unmount.

``PowerMount(backing, mountpoint).mount()`` starts ``python -m tests.faults.powerfs.fs`` as
its own process and waits until the mount answers. ``cut(seed)`` is the power cut: the
filesystem keeps only its durable state (see fs.py) and answers EIO from then on; the
mount is detached and the process ended. ``mount()`` again starts a fresh process over the
same backing directory, as a machine booting after the power came back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
CONTROL = ".powerfs"


def require_fuse() -> None:
    """Fail (never skip) when FUSE cannot work here, saying how to fix it."""
    if not Path("/dev/fuse").exists():
        raise RuntimeError("powerfs needs /dev/fuse (load the fuse module: modprobe fuse)")
    if shutil.which("fusermount3") is None:
        raise RuntimeError("powerfs needs fuse3: apt-get install -y fuse3 (dev.py test does it)")


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class PowerMount:
    def __init__(
        self,
        backing: Path,
        mountpoint: Path,
        *,
        names: str = "posix",
        crash: str = "lose",
        tear: bool = False,
    ) -> None:
        require_fuse()
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.options = ["--names", names, "--crash", crash] + (["--tear"] if tear else [])
        self.log_path = self.backing.parent / f"{self.backing.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts: list[dict[str, Any]] = []

    def mount(self, timeout: float = 20) -> PowerMount:
        assert self.proc is None, "already mounted"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.powerfs.fs", str(self.backing),
                 str(self.mountpoint), *self.options],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._end()
                raise RuntimeError(f"powerfs did not mount:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.02)
        return self

    def cut(self, seed: int = 0) -> dict[str, Any]:
        """The power cut. Whoever used the mount must be dead already (SIGKILLed): a
        process with files open here would keep the mount busy."""
        assert self.proc is not None, "not mounted"
        fd = os.open(self.mountpoint / CONTROL, os.O_WRONLY)
        try:
            os.write(fd, f"cut {seed}".encode())
        finally:
            os.close(fd)
        self._end()
        result = json.loads((self.backing / "last_cut.json").read_text())
        self.cuts.append(result)
        return result

    def unmount(self) -> None:
        """A clean unmount (no cut): what was not durable is dropped all the same, since
        only the backing directory survives the process."""
        if self.proc is not None:
            self._end()

    def _end(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        assert self.proc is not None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> PowerMount:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()

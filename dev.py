#!/usr/bin/env python3
"""The two commands of the README, for a fresh machine with only python3 (3.11+).

    python3 dev.py demo    set up .venv if needed, then run `edge-agent demo`
    python3 dev.py test    set up .venv with test extras, install the real peers the
                           tests talk to (mosquitto, nats-server, node-opcua), lint (ruff check,
                           ruff format --check, mypy --strict), run the whole suite

Extra arguments go to the command (`python3 dev.py test -k buffer`, `python3 dev.py demo
--rate 100`). `python3 dev.py bench` runs the benchmarks. Nothing here is skipped
silently: a peer that cannot be installed stops the run with how to install it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"


def say(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[dev] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd: list[str], **kw: object) -> None:
    res = subprocess.run(cmd, cwd=ROOT, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        fail(f"command failed ({res.returncode}): {' '.join(map(str, cmd))}")


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py runs on whatever python3 is)
        fail(f"python {sys.version.split()[0]} is too old: edge-agent needs 3.11 or newer")
    if not PY.exists():
        say(f"creating virtual environment {VENV}")
        run([sys.executable, "-m", "venv", str(VENV)])
    stamp = VENV / f".installed-{extras or 'base'}"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    say(f"installing edge-agent and its dependencies into .venv ({extras or 'base'})")
    run([str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--upgrade", "pip"])
    target = f".[{extras}]" if extras else "."
    run([str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", target])
    stamp.write_text(want)


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (
            str(p)
            for d in ("/usr/sbin", "/sbin", "/usr/local/sbin")
            if (p := Path(d) / name).exists()
        ),
        None,
    )


def apt_install(packages: list[str], why: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        fail(
            f"{why} needs {' '.join(packages)}: install it with\n"
            f"    sudo apt-get install -y {' '.join(packages)}\nthen run this command again"
        )
    say(f"installing {' '.join(packages)} from Debian's packages ({why})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env,
        stdout=subprocess.DEVNULL)  # fmt: skip


def ensure_peers() -> None:
    if not which("mosquitto") or not which("mosquitto_passwd"):
        apt_install(["mosquitto", "mosquitto-clients"], "the MQTT tests (a real broker)")
    if not which("nats-server"):
        apt_install(["nats-server"], "the NATS JetStream tests (a real 3-node cluster)")
    missing = [
        pkg
        for tool, pkg in [
            ("systemd-analyze", "systemd"),  # the unit check (systemd-analyze verify)
            ("dpkg-deb", "dpkg"),  # the .deb build
            ("dpkg-buildflags", "dpkg-dev"),
            ("fakeroot", "fakeroot"),
            ("lintian", "lintian"),  # the .deb content check
            ("patchelf", "patchelf"),  # the .deb drops the build host's RUNPATHs
            ("man", "man-db"),  # edge-agent(1) is checked with man --warnings
            ("promtool", "prometheus"),  # the sample alert rules are checked and tested
            ("faketime", "faketime"),  # the fault campaign's clock jump
            ("fusermount3", "fuse3"),  # the power-cut filesystem (tests/fixtures/powerfs)
        ]
        if not which(tool)
    ]
    if missing:
        apt_install(missing, "the packaging tests and the fault campaign")
    interop = ROOT / "tests" / "interop" / "ensure_node_opcua.py"
    if interop.exists():
        if not shutil.which("npm") or not shutil.which("node"):
            apt_install(["nodejs", "npm"], "the OPC UA interop test (node-opcua sample server)")
        run([str(PY), str(interop)])
    sparkplug = ROOT / "tests" / "interop" / "ensure_sparkplug_client.py"
    if sparkplug.exists():
        if not shutil.which("npm") or not shutil.which("node"):
            apt_install(["nodejs", "npm"], "the Sparkplug interop tests (Eclipse Tahu edge node)")
        run([str(PY), str(sparkplug)])


#: What mypy --strict checks: the core (agent/, whole) and the programs the tests run
#: (tests/fixtures/programs). Imports are followed, so the adapters these programs use are
#: checked too; adapters keep documented ignores where a library is untyped (paho).
MYPY_TARGETS = ["agent/", "tests/fixtures/programs"]


def lint() -> None:
    """ruff and mypy at the versions pinned in pyproject's dev extra, so a format check does
    not change its mind when a new ruff comes out. Every step runs; any failure fails."""
    bin_dir = VENV / "bin"
    steps = [
        ("ruff check", [str(bin_dir / "ruff"), "check", "."]),
        ("ruff format --check", [str(bin_dir / "ruff"), "format", "--check", "."]),
        ("mypy --strict", [str(bin_dir / "mypy"), "--strict", *MYPY_TARGETS]),
    ]
    failed = []
    for name, cmd in steps:
        say(f"lint: {name}")
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
    if failed:
        fail(
            f"lint failed ({', '.join(failed)}): see the lines above. "
            "`.venv/bin/ruff format .` and `.venv/bin/ruff check --fix .` fix most ruff "
            "findings; mypy's need a code change. The tests did not run."
        )


def cmd_demo(args: list[str]) -> None:
    ensure_venv("")
    os.execv(str(VENV / "bin" / "edge-agent"), ["edge-agent", "demo", *args])


def cmd_test(args: list[str]) -> None:
    ensure_venv("test,package,dev")
    ensure_peers()
    lint()
    say("running the test suite")
    res = subprocess.run([str(PY), "-m", "pytest", *(args or ["tests"])], cwd=ROOT)
    if res.returncode == 5:
        fail("pytest collected no tests: that is a failure, not a pass")
    sys.exit(res.returncode)


def cmd_bench(args: list[str]) -> None:
    ensure_venv("test,package,bench")
    ensure_peers()
    res = subprocess.run([str(PY), "-m", "bench", *args], cwd=ROOT)
    sys.exit(res.returncode)


def main() -> None:
    commands = {"demo": cmd_demo, "test": cmd_test, "bench": cmd_bench}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

"""`edge-agent status --check` and the status exit codes (issue 10, items 4 and 9), as a
monitoring system and an operator run them: the real CLI in a subprocess, against a real
agent process and the real reference gateway, which is really stopped for an outage.

- ``--check``: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; one line ``EDGE-AGENT STATE -
  text | perfdata`` in the Monitoring Plugins guidelines' syntax; CRITICAL when the agent is
  not running, credentials are refused, or the buffer refuses events.
- plain ``status``: 0 running, 3 not running, 1 unreadable; ``--json`` 0 when printed.
- as a non-root user (``setpriv`` to ``nobody``) against 0640 files: one line saying what to
  do, and a member of the owning group reads a running agent's status.
- the demo's printed status command runs as printed; ``--watch`` piped stays 100 columns.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.common import (
    ROOT,
    AgentProcess,
    agent_config,
    free_port,
    https_sink,
    run_cli,
    to_toml,
)

pytestmark = pytest.mark.timeout(240)

# 'label'=value[UOM];[warn];[crit];[min];[max] (Monitoring Plugins Development Guidelines)
RANGE = r"@?(?:-?[\d.]+|~)?:?(?:-?[\d.]+)?"
PERF = re.compile(
    rf"^(?P<label>[a-z_]+)=(?P<value>-?[\d.]+|U)(?P<uom>s|B|%|c)?"
    rf"(?:;(?P<warn>{RANGE})(?:;(?P<crit>{RANGE})(?:;(?P<min>-?[\d.]*)(?:;(?P<max>-?[\d.]*))?)?)?)?$"
)
LINE = re.compile(r"^EDGE-AGENT (OK|WARNING|CRITICAL|UNKNOWN) - (.+?)(?: \| (.+))?$")
CODES = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}


class Check:
    def __init__(self, res: subprocess.CompletedProcess[str]) -> None:
        out = res.stdout + res.stderr
        assert "Traceback" not in out, out
        assert res.stdout.count("\n") == 1 and res.stderr == "", out  # exactly one line
        m = LINE.match(res.stdout.rstrip("\n"))
        assert m, res.stdout
        self.state, self.text, self.code = m.group(1), m.group(2), res.returncode
        assert CODES[self.state] == self.code, (self.code, res.stdout)
        self.perf: dict[str, dict[str, str]] = {}
        for item in (m.group(3) or "").split():
            p = PERF.match(item)
            assert p, f"perfdata {item!r} does not follow the plugin guidelines"
            self.perf[p.group("label")] = p.groupdict()
        self.line = res.stdout.rstrip("\n")

    def value(self, label: str) -> float:
        return float(self.perf[label]["value"])

    def __repr__(self) -> str:
        return f"exit {self.code}: {self.line}"


def check(cfg: Path, *flags: str, env: dict[str, str] | None = None) -> Check:
    return Check(run_cli("status", "--check", "-c", str(cfg), *flags, env=env))


def wait_check(
    cfg: Path, pred: Callable[[Check], bool], *flags: str, timeout: float = 60, what: str = ""
) -> Check:
    deadline = time.monotonic() + timeout
    while True:
        c = check(cfg, *flags)
        if pred(c):
            return c
        assert time.monotonic() < deadline, f"never {what}: last {c}"
        time.sleep(0.5)


def assert_perfdata(c: Check, warn_age: str = "900", crit_age: str = "14400") -> None:
    assert set(c.perf) == {"backlog", "oldest_age", "dead_letters", "runway", "buffer_used"}
    assert c.perf["backlog"]["uom"] is None and c.perf["backlog"]["min"] == "0"
    assert c.perf["oldest_age"]["uom"] == "s"
    assert (c.perf["oldest_age"]["warn"], c.perf["oldest_age"]["crit"]) == (warn_age, crit_age)
    assert c.perf["dead_letters"]["warn"] == "0"  # warn above 0
    # runway alerts *below* its thresholds: "43200:" in range syntax
    assert (c.perf["runway"]["warn"], c.perf["runway"]["crit"]) == ("43200:", "7200:")
    assert c.perf["runway"]["value"] == "U" or c.perf["runway"]["uom"] == "s"
    assert c.perf["buffer_used"]["uom"] == "B" and float(c.perf["buffer_used"]["max"]) > 0


def test_check_ok_warning_critical_recovery_and_not_running(gateway: Any, tmp_path: Path) -> None:
    gw = gateway()
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)},
                       sources={"line1": {"type": "simulator", "rate": 20, "seed": 3}})  # fmt: skip
    agent = AgentProcess(tmp_path, cfg)
    c = agent.config_path
    try:
        agent.start()
        gw.wait_received(20, stream="line1", timeout=60)
        ok = wait_check(c, lambda x: x.code == 0, what="OK")
        assert ok.text.startswith(f"running (pid {agent.proc.pid}), 1 stream(s), "), ok  # type: ignore[union-attr]
        assert_perfdata(ok)
        assert ok.value("dead_letters") == 0 and ok.value("oldest_age") < 60

        # the gateway really stops: the backlog ages past the thresholds given as flags
        gw.stop()
        warn = wait_check(c, lambda x: x.code == 1 and "oldest unsent" in x.text,
                          "--warn-age", "3s", "--crit-age", "1h", what="WARNING")  # fmt: skip
        assert "stream line1: oldest unsent" in warn.text and "(warn 3s)" in warn.text, warn
        assert warn.value("oldest_age") > 3 and warn.value("backlog") > 0
        assert_perfdata(warn, "3", "3600")
        crit = wait_check(c, lambda x: x.code == 2, "--warn-age", "2s", "--crit-age", "6s",
                          what="CRITICAL")  # fmt: skip
        assert "stream line1: oldest unsent" in crit.text and "(crit 6s)" in crit.text, crit
        assert crit.value("oldest_age") > 6
        # the defaults (15 min) are not reached: the sink being down is a warning
        dflt = check(c)
        assert dflt.code == 1 and "sink central disconnected" in dflt.text, dflt

        gw.start()
        back = wait_check(c, lambda x: x.code == 0 and x.value("backlog") < 40, what="OK again")
        assert back.state == "OK"

        assert agent.stop() == 0
    finally:
        agent.kill()
    down = check(c)
    assert down.code == 2 and down.text.startswith("agent not running (last heartbeat "), down
    assert_perfdata(down)  # the buffer's figures, even with the agent down

    # plain status: 3 when not running (LSB, like `systemctl status`); --json prints: 0
    res = run_cli("status", "-c", str(c))
    assert res.returncode == 3 and "NOT RUNNING" in res.stdout, res
    assert run_cli("status", "--json", "-c", str(c)).returncode == 0


def test_check_credentials_refused_is_critical(gateway: Any, tmp_path: Path) -> None:
    gw = gateway(token="the-right-token-42")
    token = tmp_path / "gateway.token"
    token.write_text("a-wrong-token-99\n")
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw, token_file=str(token))},
                       sources={"line1": {"type": "simulator", "rate": 20, "seed": 3}})  # fmt: skip
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start()
        crit = wait_check(agent.config_path, lambda x: "credentials refused" in x.text,
                          what="credentials refused")  # fmt: skip
        assert crit.code == 2 and crit.state == "CRITICAL", crit
        assert "sink central: credentials refused (" in crit.text and "HTTP 401" in crit.text
        assert "a-wrong-token-99" not in crit.line
        res = run_cli("status", "-c", str(agent.config_path))  # for people: running, exit 0
        assert res.returncode == 0 and "auth_failed" in res.stdout, res
        assert agent.stop() == 0
    finally:
        agent.kill()


def test_check_buffer_refusing_events_is_critical(gateway: Any, tmp_path: Path) -> None:
    gw = gateway()
    gw.stop()  # nothing drains: the small buffer fills
    port = free_port()
    mes = {"type": "mes_http", "stream": "mes", "listen": f"127.0.0.1:{port}", "retry_after": "2s"}
    cfg = agent_config(tmp_path, sinks={"central": https_sink(gw)}, sources={"mes": mes},
                       buffer={"max_bytes": "24KiB", "on_full": "block"})  # fmt: skip
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start()
        refused = None
        with httpx.Client(timeout=5) as client:
            for i in range(2000):
                ev = {"type": "mfg.production.completed", "id": f"MES-{i}", "subject": "WO-1",
                      "time": "2026-11-23T10:15:02.123Z",
                      "data": {"work_order": "WO-1", "item": "PN-100",
                               "good": {"value": i, "uom": "EA"}}}  # fmt: skip
                r = client.post(f"http://127.0.0.1:{port}/v1/events", json=[ev])
                if r.status_code == 503:
                    refused = i
                    break
                assert r.status_code == 202, r.text
        assert refused is not None, "the buffer never filled"
        flags = ("--warn-runway", "off", "--crit-runway", "off", "--warn-age", "off")
        crit = wait_check(agent.config_path, lambda x: "buffer refuses events" in x.text, *flags,
                          what="buffer refuses events")  # fmt: skip
        assert crit.code == 2, crit
        assert "buffer full, on_full = block" in crit.text, crit
        assert agent.stop() == 0
    finally:
        agent.kill()


def test_check_unknown_and_never_another_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[buffer]\nmax_bytes = "lots"\n[sinks.central]\ntype = "https"\n'
                   'url = "https://gw.example.com/v1/batches"\n')  # fmt: skip
    c = check(bad)
    assert c.code == 3 and c.text.startswith("config error: buffer.max_bytes: "), c
    missing = tmp_path / "missing.toml"
    c = check(missing)
    assert c.code == 3 and "no such file" in c.text, c
    # a config whose agent never ran: no buffer, so certainly not running
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(to_toml(agent_config(tmp_path / "x", sinks={"central": {
        "type": "https", "url": "https://gw.example.com/v1/batches"}})))  # fmt: skip
    c = check(fresh)
    assert c.code == 2 and c.text.startswith("agent not running: no buffer at "), c
    # a bad threshold is the plugin's UNKNOWN too (2 would page someone as CRITICAL)
    res = run_cli("status", "--check", "--warn-age", "soon", "-c", str(fresh))
    assert res.returncode == 3 and "Traceback" not in res.stderr, res
    assert "'soon' is not a duration" in res.stderr, res


# ------------------------------------------------------------------ non-root operators

NOBODY = 65534
GROUP = "daemon"  # stands in for the .deb's edge-agent group: nobody is not a member


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path is under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="edge-agent-perm-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def checkout_reachable_by_nobody() -> Iterator[None]:
    """Let nobody search (x, not read) the directories above the checkout while the test
    runs, and put their modes back after. nobody runs this checkout's .venv and agent/,
    as an operator runs the installed /usr/lib/edge-agent; a clone under `mktemp -d`
    (0700) left nobody unable to import it ("No module named agent"), which said nothing
    about the permissions under test."""
    changed: list[tuple[Path, int]] = []
    try:
        for d in [ROOT, *ROOT.parents]:
            mode = stat.S_IMODE(d.stat().st_mode)
            if not mode & stat.S_IXOTH:
                d.chmod(mode | stat.S_IXOTH)
                changed.append((d, mode))
        yield
    finally:
        for d, mode in reversed(changed):
            d.chmod(mode)


def as_nobody(*args: str, groups: str | None = None) -> subprocess.CompletedProcess[str]:
    who = ["--groups", groups] if groups else ["--clear-groups"]
    return subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), *who,
         sys.executable, "-m", "agent", *args],
        capture_output=True, text=True, cwd=str(ROOT), timeout=60,
    )  # fmt: skip


@pytest.mark.usefixtures("checkout_reachable_by_nobody")
def test_non_root_operator_gets_one_line_and_group_members_read_status(
    gateway: Any, shared_dir: Path
) -> None:
    import grp

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        raise AssertionError("this test needs root and setpriv (util-linux) to act as nobody")
    gid = grp.getgrnam(GROUP).gr_gid
    state = shared_dir / "state"
    state.mkdir()
    os.chown(state, 0, gid)
    state.chmod(0o2750)  # setgid: what the agent creates belongs to the group, like /var/lib
    gw = gateway()
    ca = shared_dir / "ca.pem"  # like /etc/edge-agent/ca.pem: readable by the operator
    shutil.copy(gw.ca_file, ca)
    ca.chmod(0o644)
    cfg = agent_config(state, sinks={"central": https_sink(gw, ca_file=str(ca))},
                       sources={"line1": {"type": "simulator", "rate": 20, "seed": 3}})  # fmt: skip
    conf = shared_dir / "agent.toml"
    agent = AgentProcess(shared_dir / "run", cfg)
    shutil.copy(agent.config_path, conf)
    conf.chmod(0o644)
    c = str(conf)
    try:
        agent.start()
        gw.wait_received(10, stream="line1", timeout=60)
        # the agent made its buffer and heartbeat 0640 (the umask is no longer in charge)
        for name in ("buffer.db", "buffer.db.heartbeat"):
            st = os.stat(state / name)
            assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == gid, (name, oct(st.st_mode))

        # not in the group: one line that says what to do, for people and for monitoring
        res = as_nobody("status", "-c", c)
        assert res.returncode == 1 and res.stdout == "", res
        (line,) = res.stderr.splitlines()
        assert line == (
            f"Error: permission denied: nobody may not read {state} (drwxr-s--- root:{GROUP}): "
            f"add nobody to the {GROUP} group (sudo usermod -aG {GROUP} nobody, then log in "
            "again) or run it as root"
        ), line
        res = as_nobody("status", "--check", "-c", c)
        assert res.returncode == 3, res
        assert res.stdout.startswith("EDGE-AGENT UNKNOWN - permission denied: nobody may not")
        assert f"usermod -aG {GROUP} nobody" in res.stdout and res.stdout.count("\n") == 1

        # a member of the group reads the running agent's status (WAL, read-only)
        deadline = time.monotonic() + 30
        while True:
            res = as_nobody("status", "--check", "-c", c, groups=str(gid))
            if res.returncode == 0:
                break
            assert time.monotonic() < deadline, res
            time.sleep(0.5)
        assert res.stdout.startswith(f"EDGE-AGENT OK - running (pid {agent.proc.pid})"), res  # type: ignore[union-attr]
        res = as_nobody("status", "-c", c, groups=str(gid))
        assert res.returncode == 0 and "RUNNING (pid" in res.stdout, res
        res = as_nobody("status", "--json", "-c", c, groups=str(gid))
        assert res.returncode == 0 and '"running": true' in res.stdout, res

        # the config itself unreadable (like /etc/edge-agent 0640 root:edge-agent)
        os.chown(conf, 0, gid)
        conf.chmod(0o640)
        res = as_nobody("status", "-c", c)
        assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res
        assert f"add nobody to the {GROUP} group" in res.stderr, res
        # ... or a file it names (a CA bundle in a directory the operator cannot enter)
        conf.chmod(0o644)
        private = shared_dir / "private"
        private.mkdir(mode=0o700)
        shutil.copy(ca, private / "ca.pem")
        conf.write_text(conf.read_text().replace(str(ca), str(private / "ca.pem")))
        res = as_nobody("status", "-c", c)
        assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res
        assert res.stderr.startswith(f"Error: permission denied: nobody may not read {private}")
        assert "Errno" not in res.stderr, res
        conf.write_text(conf.read_text().replace(str(private / "ca.pem"), str(ca)))
        assert agent.stop() == 0
    finally:
        agent.kill()
    # stopped: the member still reads it, and learns it is not running (3)
    res = as_nobody("status", "-c", c, groups=str(gid))
    assert res.returncode == 3 and "NOT RUNNING" in res.stdout, res
    # and root's status left no file the agent's group cannot read
    for p in state.iterdir():
        assert p.stat().st_gid == gid, p


# ------------------------------------------------------------------ demo, watch


def test_demo_prints_a_status_command_that_works_as_printed(tmp_path: Path) -> None:
    """The console script need not be on PATH: the printed command names what to run."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # no venv on PATH, like `python3 dev.py demo`
    env["PYTHONUNBUFFERED"] = "1"
    demo = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--duration", "60", "--outage-at", "0",
         "--dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path), env=env,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        seen: list[str] = []
        command = None
        for line in demo.stdout:
            seen.append(line)
            if seen[-2:-1] and "In another shell, while it runs:" in seen[-2]:
                command = line.strip()
                break
            assert len(seen) < 20, seen
        assert command is not None, seen
        argv = shlex.split(command)
        assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK), command
        assert argv[-3:] == ["status", "-c", str(tmp_path / "demo" / "demo.toml")], command
        deadline = time.monotonic() + 60
        while True:
            res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/",
                                 timeout=60)  # fmt: skip
            if res.returncode == 0 and "RUNNING (pid" in res.stdout:
                break
            assert time.monotonic() < deadline, (command, res)
            time.sleep(0.5)
        assert "line1" in res.stdout and "Traceback" not in res.stderr
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def test_watch_piped_keeps_100_columns(gateway: Any, tmp_path: Path) -> None:
    gw = gateway()
    dead = f"https://127.0.0.1:{free_port()}/v1/batches-that-nobody-serves/with/a/long/path"
    long_stream = "quality-inspection-station-07-final-assembly-east"
    cfg = agent_config(
        tmp_path,
        sinks={"central": https_sink(gw), "backup": https_sink(gw, url=dead)},
        sources={"qa": {"type": "simulator", "rate": 50, "limit": 20, "seed": 2,
                        "stream": long_stream}},
        streams={long_stream: {"sink": "backup"}},
    )  # fmt: skip
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start()
        agent.wait(lambda s: any(x["last_error"] for x in s["sinks"]), what="the sink's error")
        env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
        env |= {"TERM": "xterm-256color", "COLUMNS": "240", "PYTHONUNBUFFERED": "1"}
        piped = tmp_path / "watch.out"
        with open(piped, "w") as sink:  # a file: what `status --watch > file` or `| tee` get
            watch = subprocess.Popen(
                [sys.executable, "-m", "agent", "status", "--watch", "--interval", "0.5",
                 "-c", str(agent.config_path)],
                stdout=sink, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
            )  # fmt: skip
        deadline = time.monotonic() + 40
        while piped.read_text().count("\n--- ") < 2:
            assert watch.poll() is None, watch.communicate()
            assert time.monotonic() < deadline, piped.read_text()
            time.sleep(0.2)
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=20)
        out = piped.read_text()
        assert watch.returncode == 0 and "Traceback" not in err, err
        assert agent.stop() == 0
    finally:
        agent.kill()
    lines = out.splitlines()
    assert "\x1b" not in out, "colour codes in piped output"
    assert sum(1 for x in lines if x.startswith("--- ")) >= 3  # a frame per interval
    assert max(len(x) for x in lines) <= 100, [x for x in lines if len(x) > 100]
    # wider than a pipe's default 80: the 100 columns are used, not wrapped at 80
    assert max(len(x) for x in lines) > 80, out
    assert sum("RUNNING (pid" in x for x in lines) >= 3

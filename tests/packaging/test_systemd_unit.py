"""systemd/edge-agent.service: `systemd-analyze verify` is clean and the contract holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures.packaging import REPO, require_tool

UNIT = REPO / "systemd" / "edge-agent.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value (systemd allows a key more than once)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit_text: str, tmp_path: Path, exe: str) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze verify on ``unit_text`` with ExecStart's binary replaced by ``exe``
    (verify insists that the executable exists; the test must not install into /usr/bin)."""
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    unit = tmp_path / "edge-agent.service"
    unit.write_text(unit_text.replace("/usr/bin/edge-agent", exe), encoding="utf-8")
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def _exe() -> str:
    return str(Path(sys.executable).with_name("edge-agent"))


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    res = verify(UNIT.read_text(encoding="utf-8"), tmp_path, _exe())
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    broken = UNIT.read_text(encoding="utf-8").replace("LockPersonality=", "LockPersonalty=")
    res = verify(broken, tmp_path, _exe())
    assert "Unknown key" in res.stdout + res.stderr


def test_unit_contract() -> None:
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))
    svc = unit["Service"]

    def one(key: str) -> str:
        assert key in svc, f"{key}= missing from [Service]"
        return svc[key][-1]

    assert one("Type") == "notify"
    # the PyInstaller bootloader is MAINPID; the agent (its child) sends the notifications
    assert one("NotifyAccess") == "all"
    assert one("WatchdogSec") and one("WatchdogSec") != "0"
    assert one("Restart") == "on-failure"
    assert one("User") == one("Group") == "edge-agent"
    assert one("ExecStart") == "/usr/bin/edge-agent run -c /etc/edge-agent/edge-agent.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("StateDirectory") == "edge-agent" and one("StateDirectoryMode") == "0750"
    assert one("ConfigurationDirectory") == "edge-agent"
    assert one("LogsDirectory") == "edge-agent"
    assert one("UMask") == "0027"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert one(key) == value, f"{key}={one(key)!r}, expected {value!r}"
    assert "@system-service" in svc["SystemCallFilter"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]

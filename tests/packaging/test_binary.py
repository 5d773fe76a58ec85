"""The single-file binary: built once per session (conftest.py), then really run."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from PyInstaller.archive.readers import CArchiveReader

import agent
from tests.fixtures.packaging import REPO
from tests.fixtures.sdnotify import (
    NotifySocket,
    _free_port,
    run_agent_with_notify,
    write_agent_config,
)


def run(cmd: list[str], tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_version(edge_agent_binary: Path, tmp_path: Path) -> None:
    res = run([str(edge_agent_binary), "--version"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert agent.__version__ in res.stdout


def test_the_binary_finds_the_commands_beside_the_adapters(
    edge_agent_binary: Path, tmp_path: Path
) -> None:
    """They are found by entry point (agent/registry.py): the spec ships the metadata."""
    for command in ("gateway", "opcua", "sparkplug"):
        res = run([str(edge_agent_binary), command, "--help"], tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"edge-agent {command}" in res.stdout, res.stdout


def test_config_check_example(edge_agent_binary: Path, tmp_path: Path) -> None:
    res = run(
        [str(edge_agent_binary), "config", "check", str(REPO / "config/example.toml")], tmp_path
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout


def test_config_check_refuses_a_bad_config(edge_agent_binary: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[sinks.central]\ntype = "https"\nurl = "ftp://x"\n', encoding="utf-8")
    res = run([str(edge_agent_binary), "config", "check", str(bad)], tmp_path)
    assert res.returncode != 0
    assert "sinks.central.url" in res.stdout + res.stderr


def all_samples_config(path: Path) -> Path:
    """Every adapter's sample.toml in one config (sink names made unique)."""
    parts = []
    for sample in sorted(REPO.glob("adapters/*/*/sample.toml")):
        text = sample.read_text(encoding="utf-8")
        kind, type_ = sample.parts[-3], sample.parts[-2]
        if kind == "sinks":
            text = re.sub(r"(?m)^(\[+)sinks\.", rf"\1sinks.{type_}_", text)
        parts.append(f"# ---- {sample.relative_to(REPO)}\n{text}")
    text = "\n".join(parts)
    # config check opens what the samples name: their /etc and /var/lib paths move below the
    # test's directory, and the directories a source reads from are made
    for system_dir in ("/etc/edge-agent", "/var/lib/edge-agent"):
        text = text.replace(f'"{system_dir}/', f'"{path.parent}{system_dir}/')
    for body in tomllib.loads(text).get("sources", {}).values():
        for key in ("path", "trusted_certs_dir"):
            if key in body:
                Path(body[key]).mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_every_adapter_sample_checks_with_the_binary(
    edge_agent_binary: Path, tmp_path: Path
) -> None:
    """Each adapter package imports and validates inside the frozen binary."""
    cfg = all_samples_config(tmp_path / "all.toml")
    res = run([str(edge_agent_binary), "config", "check", str(cfg)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    samples = list(REPO.glob("adapters/*/*/sample.toml"))
    assert samples and "ok" in res.stdout


def test_demo_runs_from_the_binary(edge_agent_binary: Path, tmp_path: Path) -> None:
    res = run(
        [str(edge_agent_binary), "demo", "--duration", "8", "--dir", str(tmp_path / "demo")],
        tmp_path,
        timeout=90,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    final = [line for line in out.splitlines() if line.startswith("final:")]
    assert final, out[-4000:]
    assert "missing 0" in final[0] and "out-of-order 0" in final[0] and "dup 0" in final[0]
    gateway_has = int(final[0].split("gateway has")[1].split()[0])
    assert gateway_has > 0, final[0]


def test_every_agent_and_adapter_module_is_bundled(binary_build: tuple[Path, Path | None]) -> None:
    """The registry imports adapters (and the gateway) lazily: the hidden imports cover all."""
    archive = CArchiveReader(str(binary_build[0]))
    (pyz_name,) = [n for n in archive.toc if n.endswith(".pyz")]
    bundled = set(archive.open_embedded_archive(pyz_name).toc)
    expected = set()
    for pkg in ("agent", "adapters", "gateway"):
        expected.add(pkg)
        for info in pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}."):
            expected.add(info.name)
    missing = sorted(expected - bundled)
    assert not missing, f"modules missing from the binary (edge-agent.spec): {missing}"
    for lib in ("asyncua", "paho.mqtt.client", "sqlite3", "aiohttp.web", "prometheus_client"):
        assert lib in bundled, f"{lib} missing from the binary"
    data = set(archive.toc)
    for sample in REPO.glob("adapters/*/*/sample.toml"):
        rel = sample.relative_to(REPO).as_posix()
        assert rel in data, f"{rel} missing from the binary"
    assert "config/example.toml" in data


def test_binary_sends_ready_and_watchdog_under_mdwe(built_exe: Path, tmp_path: Path) -> None:
    """The real binary (each form) as systemd runs it: NOTIFY_SOCKET + WATCHDOG_USEC, and
    the started PID as WATCHDOG_PID (the one-file bootloader: the agent is its child), with
    W^X memory enforced."""
    ns = NotifySocket(str(tmp_path / "notify.sock"), str(tmp_path / "notify.sock"))
    try:
        cfg = write_agent_config(tmp_path, _free_port(), _free_port())
        command = [
            sys.executable,
            str(REPO / "tests/fixtures/programs/mdwe_exec.py"),
            str(built_exe),
        ]
        run_agent_with_notify(command, cfg, ns, tmp_path, watchdog_usec=2_000_000)
    finally:
        ns.close()

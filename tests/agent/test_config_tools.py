"""`config sample`, `config show`, pattern errors in words, and how `run` reports a failure
(issue 10, items 3 and 8)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agent import cli, registry
from agent.config import PATTERN_WORDS, Config, load_config, parse_config
from agent.errors import ConfigError, SinkError

ROOT = Path(__file__).resolve().parents[2]


def edge_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def into(tmp: Path, text: str) -> str:
    """The sample's system paths moved below tmp, and the directories it reads made."""
    for system_dir in ("/etc/edge-agent", "/var/lib/edge-agent"):
        text = text.replace(f'"{system_dir}/', f'"{tmp}{system_dir}/')
    for body in tomllib.loads(text).get("sources", {}).values():
        for key in ("path", "trusted_certs_dir"):
            if key in body:
                Path(body[key]).mkdir(parents=True, exist_ok=True)
    return text


ALL_TYPES = [f"sink:{t}" for t in registry.known("sinks")] + [
    f"source:{t}" for t in registry.known("sources")
]


@pytest.mark.parametrize(
    "types",
    [[], ["opcua"], ["sink:mqtt", "source:mqtt"], ["drop_folder", "simulator"], ALL_TYPES],
    ids=lambda t: "+".join(t) or "default",
)
def test_sample_is_a_complete_config_that_config_check_accepts(
    types: list[str], tmp_path: Path
) -> None:
    res = edge_agent("config", "sample", *types)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert text.startswith("## edge-agent configuration."), text[:200]
    raw = tomllib.loads(text)
    want = types or ["sink:https", "source:mes_http"]
    kinds = {("sinks" if t.startswith("sink:") or t in registry.known("sinks") else "sources",
              t.split(":")[-1]) for t in want}  # fmt: skip
    got = {(k, body["type"]) for k in ("sinks", "sources") for body in raw.get(k, {}).values()}
    assert kinds <= got, (kinds, got)
    for section in ("agent", "buffer", "forwarder", "metrics", "log"):
        assert section in raw, section
    # commented: every adapter's documentation comes along
    assert text.count("\n## ") > 20
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(into(tmp_path, text))
    checked = edge_agent("config", "check", str(cfg))
    assert checked.returncode == 0, checked.stderr
    assert "ok" in checked.stdout


def test_sample_with_both_sinks_names_them_apart() -> None:
    raw = tomllib.loads(edge_agent("config", "sample", "sink:https", "sink:mqtt").stdout)
    assert {n: b["type"] for n, b in raw["sinks"].items()} == {
        "central": "https",
        "central_mqtt": "mqtt",
    }


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        ("mqtt", "config error: 'mqtt' is a sink and a source: say sink:mqtt or source:mqtt"),
        ("ftp", "config error: no adapter type 'ftp' (one of: drop_folder, https, mes_http, "
                "mqtt, nats, opcua, simulator, sparkplug)"),
        ("sink:opcua", "config error: no sink type 'opcua' (one of: https, mqtt, nats)"),
    ],
)  # fmt: skip
def test_sample_of_an_unknown_type_is_one_line(arg: str, line: str) -> None:
    res = edge_agent("config", "sample", arg)
    assert res.returncode == 2 and res.stderr.strip() == line, res


def test_show_prints_every_default_and_redacts_secrets(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-secret-1\n")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[agent]
plant = "p1"
id = "a1"
[buffer]
path = "{tmp_path}/buffer.db"
[sinks.central]
type = "https"
url = "https://gw.example/v1/batches"
token = "${{SHOW_TEST_TOKEN}}"
[sinks.broker]
type = "mqtt"
url = "mqtts://broker.example"
username = "agent"
password_file = "{token_file}"
[sources.line1]
type = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"
username = "op"
password = "inline-secret-2"
[[sources.line1.nodes]]
node_id = "ns=2;s=State"
event = "mfg.machine.state_changed"
machine = "M1"
states = {{ "0" = "idle", "1" = "running" }}
"""
    )
    env = {"SHOW_TEST_TOKEN": "env-secret-3"}
    res = edge_agent("config", "show", "-c", str(cfg), env=env)
    assert res.returncode == 0, res.stderr
    for secret in ("file-secret-1", "inline-secret-2", "env-secret-3"):
        assert secret not in res.stdout
    assert 'token = "**********"' in res.stdout and 'password = "**********"' in res.stdout
    shown = tomllib.loads(res.stdout)
    # every default is there, as the running agent sees it
    assert shown["forwarder"]["max_events"] == 1000
    assert shown["buffer"]["durability"] == "fsync"
    assert shown["sinks"]["broker"]["max_in_flight"] == 20
    assert shown["sources"]["line1"]["nodes"][0]["queue_size"] == 10
    assert "# ca_file is not set" in res.stdout
    # and it is a config again: the same one, but for the secrets
    os.environ["SHOW_TEST_TOKEN"] = "env-secret-3"
    try:
        original = load_config(cfg)
    finally:
        del os.environ["SHOW_TEST_TOKEN"]
    again = parse_config(shown)

    def plain(c: Config) -> dict[str, Any]:
        doc = c.model_dump(mode="json")
        doc["sinks"] = {n: s.model_dump(mode="json") for n, s in c.sinks.items()}
        doc["sources"] = {n: s.model_dump(mode="json") for n, s in c.sources.items()}
        return doc

    assert plain(again) == plain(original)
    as_json = edge_agent("config", "show", "--json", "-c", str(cfg), env=env)
    assert as_json.returncode == 0 and "env-secret-3" not in as_json.stdout


# ---------------------------------------------------------------------------- patterns


def _models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo: list[Any] = [Config]
    todo += [registry.config_model("sinks", t) for t in registry.known("sinks")]
    todo += [registry.config_model("sources", t) for t in registry.known("sources")]
    while todo:
        m = todo.pop()
        if not (isinstance(m, type) and issubclass(m, BaseModel)) or m in seen:
            continue
        seen.append(m)
        for f in m.model_fields.values():
            todo += _types_in(f.annotation)
    return seen


def _types_in(ann: Any) -> list[Any]:
    out = [ann]
    for arg in getattr(ann, "__args__", ()):
        out += _types_in(arg)
    return out


def test_every_pattern_the_config_uses_has_words() -> None:
    patterns = []
    for model in _models():
        for name, f in model.model_fields.items():
            for meta in f.metadata:
                if getattr(meta, "pattern", None):
                    patterns.append((model.__name__, name, meta.pattern))
    assert patterns, "the walk found the agent.plant pattern at least"
    for model, name, pattern in patterns:
        assert pattern in PATTERN_WORDS, f"{model}.{name}: pattern {pattern!r} has no words"


def test_pattern_error_is_in_words() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"agent": {"plant": "plant berlin/1"}, "sinks": {"https": {"url": "https://x"}}}
        )
    assert str(err.value) == (
        "agent.plant: letters, digits, '.', '-' and '_' only, starting with a letter or digit "
        '(got "plant berlin/1")'
    )


# ---------------------------------------------------------------------------- run's failures


@pytest.fixture(autouse=True)
def _no_leftover_log_handler() -> Any:
    """`run` in-process installs the agent's log handler on the root logger: take it off."""
    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == "edge_agent"]:
        root.removeHandler(h)


def test_an_error_inside_a_task_group_is_reported_as_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent's task groups wrap what fails in them; the operator sees the cause."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[buffer]\npath = "{tmp_path}/b.db"\n[metrics]\nenabled = false\n'
        '[sinks.central]\ntype = "https"\nurl = "https://gw.example/v1/batches"\n'
    )
    import agent.runtime

    async def fails(path: Path) -> None:
        try:
            raise ConfigError("sinks.central.ca_file", "a problem found only at start")
        except ConfigError as exc:
            raise ExceptionGroup("unhandled errors in a TaskGroup", [exc]) from None

    monkeypatch.setattr(agent.runtime, "run_agent", fails)
    with pytest.raises(SystemExit) as out:
        cli.main(["run", "-c", str(cfg), "--log-format", "text"])
    assert out.value.code == 2
    err = capsys.readouterr().err
    assert err == "config error: sinks.central.ca_file: a problem found only at start\n"

    async def sink_fails(path: Path) -> None:
        inner = ExceptionGroup("inner", [SinkError("sinks.central: cannot connect")])
        raise ExceptionGroup("unhandled errors in a TaskGroup", [inner])

    monkeypatch.setattr(agent.runtime, "run_agent", sink_fails)
    with pytest.raises(SystemExit) as out:
        cli.main(["run", "-c", str(cfg), "--log-format", "text"])
    assert out.value.code == 1
    assert capsys.readouterr().err == "error: sinks.central: cannot connect\n"


def test_a_real_bug_is_logged_as_a_bug_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[buffer]\npath = "{tmp_path}/b.db"\n[metrics]\nenabled = false\n'
        '[sinks.central]\ntype = "https"\nurl = "https://gw.example/v1/batches"\n'
    )
    import agent.runtime

    async def divide(n: int) -> float:
        return 1 / n

    async def buggy(path: Path) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(divide(0))

    monkeypatch.setattr(agent.runtime, "run_agent", buggy)
    with pytest.raises(SystemExit) as out:
        cli.main(["run", "-c", str(cfg), "--log-format", "text"])
    assert out.value.code == 1
    err = capsys.readouterr().err
    assert "unexpected ZeroDivisionError: division by zero; this is a bug in edge-agent" in err
    assert "report it to the edge-agent maintainers" in err
    assert "Traceback" in err and "in divide" in err, err  # where the bug is
    assert "ExceptionGroup" not in err, err  # the cause, not the group


def test_the_unit_does_not_restart_on_a_config_error() -> None:
    unit = (ROOT / "systemd" / "edge-agent.service").read_text()
    assert "\nRestartPreventExitStatus=2\n" in unit
    assert "\nRestart=on-failure\n" in unit


async def test_a_buffer_path_that_cannot_be_opened_names_its_key(tmp_path: Path) -> None:
    """Even past the checks (a directory removed between check and start), the failure
    names buffer.path, never a bare [Errno 2]."""
    from agent.runtime import Agent

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = parse_config(
        {
            "buffer": {"path": str(blocker / "sub" / "buffer.db")},
            "metrics": {"enabled": False},
            "sinks": {"central": {"type": "https", "url": "https://gw.example/v1/batches"}},
        }
    )
    with pytest.raises(ConfigError) as err:
        await Agent(cfg).run()
    assert err.value.path == "buffer.path"
    assert str(err.value).startswith(f"buffer.path: cannot open {blocker / 'sub'}: Not a directory")

"""Config (issue 2, item 2): one TOML file, checked by `edge-agent config check`, errors in
one line naming the key path and the fix, secrets from ``${ENV}`` or ``*_file`` that are
never printed, logged or shown in status.

Every config here is a real file in tmp_path and every check runs the real CLI
(``python -m agent config check FILE``) as a subprocess, except where the loader itself is
the subject (a secret's resolved value). The secret tests run a real agent against the real
reference gateway that requires the token, so "resolves" means "the gateway accepted it".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config, load_config, read_secret
from tests.fixtures.common import AgentProcess, agent_config, https_sink, run_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "example.toml"
SAMPLES = sorted(ROOT.glob("adapters/*/*/sample.toml"))

#: a valid sink, appended to configs whose subject is elsewhere
SINK = '[sinks.central]\ntype = "https"\nurl = "https://gw.example.com/v1/batches"\n'


def edge_agent(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """The real CLI, as an operator runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_TEST_")}
    full_env.update(env or {})
    return run_cli(*args, env=full_env, cwd=cwd)


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single stderr line of an expected error (no traceback, nothing on stdout)."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == code, (res.returncode, out)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    assert res.stdout == "", res.stdout
    return lines[0]


# ------------------------------------------------------------------ shipped examples pass


def test_example_config_checks_ok() -> None:
    res = edge_agent("config", "check", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{EXAMPLE}: ok"), res.stdout
    assert "1 sink(s): central" in res.stdout and "mes" in res.stdout
    assert res.stderr == ""


def test_there_are_adapter_samples() -> None:
    kinds = {p.parts[-3] for p in SAMPLES}
    assert kinds == {"sources", "sinks"}, SAMPLES
    assert len(SAMPLES) >= 7, SAMPLES


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: f"{p.parts[-3]}/{p.parts[-2]}")
def test_every_adapter_sample_checks_ok(sample: Path, tmp_path: Path) -> None:
    """A sink sample is a whole config; a source sample is the [sources.NAME] table an
    operator pastes into one that has a sink, so it is checked next to a sink."""
    text = sample.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    kind, type_ = sample.parts[-3], sample.parts[-2]
    assert raw[kind], f"{sample} has no [{kind}.NAME] table"
    assert {body["type"] for body in raw[kind].values()} == {type_}, raw[kind]
    if "sinks" not in raw:
        text = SINK + "\n" + text
    # config check opens what the sample names: the directories must exist here, so the
    # sample's /etc and /var/lib paths are moved below tmp_path and its directories made
    for system_dir in ("/etc/edge-agent", "/var/lib/edge-agent"):
        text = text.replace(f'"{system_dir}/', f'"{tmp_path}{system_dir}/')
    for body in tomllib.loads(text)[kind].values():
        for key in ("path", "trusted_certs_dir"):  # the directories a source reads from
            if key in body:
                Path(body[key]).mkdir(parents=True)
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(text, encoding="utf-8")
    res = edge_agent("config", "check", str(cfg))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{cfg}: ok"), res.stdout
    for name in raw[kind]:
        assert name in res.stdout, res.stdout
    assert not (tmp_path / "edge-agent.db").exists(), "config check must not create the buffer"


def _documented_keys(model: type[Any], prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _documented_keys(ann, f"{prefix}{name}.")
        elif name not in ("sinks", "sources", "streams"):
            keys.append(f"{prefix}{name}")
    return keys


def test_example_documents_every_core_key() -> None:
    """config/example.toml shows every key of [agent] [buffer] [forwarder] [metrics] [log]
    (set, or commented out with its default) under its own table header."""
    text = EXAMPLE.read_text(encoding="utf-8")
    sections = {}
    for m in re.finditer(r"(?ms)^\[(\w+)\]\n(.*?)(?=^#* ?\[)", text):
        sections[m.group(1)] = m.group(2)
    keys = _documented_keys(Config)
    assert len(keys) > 15, keys
    for key in keys:
        section, leaf = key.split(".")
        assert section in sections, f"[{section}] missing from {EXAMPLE}"
        assert re.search(rf"(?m)^#? ?{leaf} = ", sections[section]), f"{key} not in {EXAMPLE}"


def _model_keys(model: Any) -> set[str]:
    """Every key a config model (and the models nested in it) accepts."""
    from pydantic import BaseModel

    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(field.alias or name)
        ann = field.annotation
        for t in (ann, *getattr(ann, "__args__", ())):
            for inner in (t, *getattr(t, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    keys |= _model_keys(inner)
    return keys


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: "/".join(p.parts[-3:-1]))
def test_adapter_sample_documents_every_key(sample: Path) -> None:
    """Each adapter's sample.toml shows every key its Config accepts: as ``key = ``
    (set or commented out), as a dotted key, or as a [table] of its own."""
    import importlib

    config = importlib.import_module(".".join(sample.parent.relative_to(ROOT).parts)).Config
    text = sample.read_text(encoding="utf-8")
    keys = _model_keys(config)
    assert {"type", "enabled"} & keys, keys
    missing = sorted(
        k for k in keys if not re.search(rf"(?m)(?<![\w-]){re.escape(k)}(\s*=|\.\w|\]\]?)", text)
    )
    assert not missing, f"{sample}: keys not documented: {missing}"


# ------------------------------------------------------------------ bad configs: one line

BAD = [
    pytest.param(
        '[sinks.central]\ntype = "https"\nurl = "http://gw.example.com/v1/batches"\n',
        "sinks.central.url",
        ["https://", "allow_insecure = true"],
        id="http-url-without-allow_insecure",
    ),
    pytest.param(
        '[buffer]\npathh = "x.db"\n' + SINK,
        "buffer.pathh",
        ["unknown key", "spelling", "example.toml"],
        id="unknown-core-key",
    ),
    pytest.param(
        SINK + "gzipp = true\n",
        "sinks.central.gzipp",
        ["unknown key", "spelling"],
        id="unknown-sink-key",
    ),
    pytest.param(
        '[forwarder]\nmax_events = "many"\n' + SINK,
        "forwarder.max_events",
        ["integer"],
        id="string-for-int",
    ),
    pytest.param(
        SINK + 'gzip_level = "fast"\n',
        "sinks.central.gzip_level",
        ["integer"],
        id="string-for-int-in-sink",
    ),
    pytest.param(
        '[buffer]\nmax_bytes = "lots"\n' + SINK,
        "buffer.max_bytes",
        ["'lots'", "not a size", "512MiB"],
        id="bad-size",
    ),
    pytest.param(
        '[buffer]\ncheckpoint_interval = "soon"\n' + SINK,
        "buffer.checkpoint_interval",
        ["not a duration", "5m"],
        id="bad-duration",
    ),
    pytest.param(
        '[buffer]\non_full = "explode"\n' + SINK,
        "buffer.on_full",
        ["'block'", "'drop_oldest'"],
        id="bad-choice",
    ),
    pytest.param(
        '[sinks.central]\ntype = "https"\n',
        "sinks.central.url",
        ["required key is missing"],
        id="missing-sink-url",
    ),
    pytest.param(
        SINK + '[sources.line1]\ntype = "opcua"\n',
        "sources.line1.endpoint",
        ["required key is missing"],
        id="missing-source-key",
    ),
    pytest.param(
        SINK + "[sources.line1]\nrate = 5\n",
        "sources.line1.type",
        ["required key is missing", "simulator", "opcua"],
        id="missing-source-type",
    ),
    pytest.param(
        '[sinks.central]\ntype = "kafka"\nurl = "https://gw.example.com/v1/batches"\n',
        "sinks.central.type",
        ["unknown sink type 'kafka'", "https", "mqtt"],
        id="unknown-sink-type",
    ),
    pytest.param(
        SINK + '[sources.plc]\ntype = "modbus"\n',
        "sources.plc.type",
        ["unknown source type 'modbus'", "opcua", "mes_http"],
        id="unknown-source-type",
    ),
    pytest.param(
        '[agent]\nplant = "berlin"\n',
        "sinks",
        ["no sink configured", "[sinks."],
        id="no-sink",
    ),
    pytest.param(
        '[streams.quality]\nsink = "nope"\n' + SINK,
        "streams.quality.sink",
        ["no sink named 'nope'", "central"],
        id="stream-to-unknown-sink",
    ),
    pytest.param(
        '[forwarder]\nbackoff_initial = "10s"\nbackoff_max = "1s"\n' + SINK,
        "forwarder.backoff_max",
        [">= forwarder.backoff_initial"],
        id="cross-check",
    ),
]


@pytest.mark.parametrize(("toml", "key", "words"), BAD)
def test_bad_config_is_one_line_naming_the_key_and_the_fix(
    toml: str, key: str, words: list[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(toml, encoding="utf-8")
    line = one_line_error(edge_agent("config", "check", str(cfg)))
    assert line.startswith(f"config error: {key}: "), line
    for word in words:
        assert word in line, (word, line)


def test_run_refuses_a_bad_config_the_same_way_before_starting(tmp_path: Path) -> None:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text('[sinks.central]\ntype = "https"\nurl = "http://gw.example.com/v1"\n')
    line = one_line_error(edge_agent("run", "-c", str(cfg)))
    assert line == (
        "config error: sinks.central.url: must start with https:// "
        "(set allow_insecure = true to override)"
    )
    assert not (tmp_path / "edge-agent.db").exists(), "nothing may start on a bad config"


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(
        '[sinks.central]\ntype = "https"\nurl = "https://gw.example.com/v1/batches\n',
        encoding="utf-8",
    )
    line = one_line_error(edge_agent("config", "check", str(cfg)))
    assert line.startswith(f"config error: {cfg}: not valid TOML"), line
    assert "line 3" in line, line


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "edge-agent.toml"
    line = one_line_error(edge_agent("config", "check", str(missing)))
    assert line == f"config error: {missing}: no such file (pass -c PATH to a config file)"


def test_config_error_with_debug_shows_the_traceback(tmp_path: Path) -> None:
    """The hidden --debug flag is the one way to see the traceback (for a developer); the
    tests above prove the normal path never shows one."""
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(SINK + "gzipp = true\n", encoding="utf-8")
    res = edge_agent("--debug", "config", "check", str(cfg))
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "sinks.central.gzipp" in res.stderr


# ------------------------------------------------------------------ secrets

SECRET = "s3cret-Token-7f1d2c9a"


def test_env_reference_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(SINK + 'token = "${EDGE_TEST_TOKEN}"\n', encoding="utf-8")
    monkeypatch.setenv("EDGE_TEST_TOKEN", SECRET)
    sink = load_config(cfg).sinks["central"]
    assert sink.token.get_secret_value() == SECRET
    assert SECRET not in repr(sink) and SECRET not in str(load_config(cfg))
    res = edge_agent("config", "check", str(cfg), env={"EDGE_TEST_TOKEN": SECRET})
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr


def test_file_secret_resolves(tmp_path: Path) -> None:
    token_file = tmp_path / "gateway.token"
    token_file.write_text(SECRET + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(SINK + f'token_file = "{token_file}"\n', encoding="utf-8")
    sink = load_config(cfg).sinks["central"]
    assert sink.token is None and sink.token_file == token_file
    assert read_secret(sink.token, sink.token_file, "sinks.central.token") == SECRET
    res = edge_agent("config", "check", str(cfg))
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr


def test_missing_env_variable_is_one_line_naming_key_and_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(SINK + 'token = "${EDGE_TEST_UNSET_TOKEN}"\n', encoding="utf-8")
    line = one_line_error(edge_agent("config", "check", str(cfg)))
    assert line.startswith("config error: sinks.central.token: "), line
    assert "EDGE_TEST_UNSET_TOKEN" in line and "not set" in line and "_file" in line


def test_missing_secret_file_is_one_line_naming_key_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "gateway.token"
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(SINK + f'token_file = "{missing}"\n', encoding="utf-8")
    line = one_line_error(edge_agent("config", "check", str(cfg)))
    assert line == f"config error: sinks.central.token_file: no such file: {missing}", line


def test_secret_never_in_an_error_about_another_key(tmp_path: Path) -> None:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(SINK + 'token = "${EDGE_TEST_TOKEN}"\ngzip_level = 42\n', encoding="utf-8")
    res = edge_agent("config", "check", str(cfg), env={"EDGE_TEST_TOKEN": SECRET})
    line = one_line_error(res)
    assert line.startswith("config error: sinks.central.gzip_level: "), line
    assert SECRET not in res.stdout + res.stderr


@pytest.mark.parametrize("how", ["env", "file"])
def test_secret_reaches_the_gateway_and_is_never_shown(
    how: str, gateway: Any, tmp_path: Path
) -> None:
    """The gateway requires the bearer token: events arriving prove the secret resolved.
    Neither `config check`, `status --json` (agent running and stopped) nor the agent's
    log (at debug level) ever contains it."""
    gw = gateway(token=SECRET)
    env: dict[str, str] = {}
    if how == "env":
        sink = https_sink(gw, token="${EDGE_TEST_TOKEN}")
        env["EDGE_TEST_TOKEN"] = SECRET
    else:
        token_file = tmp_path / "gateway.token"
        token_file.write_text(SECRET + "\n", encoding="utf-8")
        token_file.chmod(0o600)
        sink = https_sink(gw, token_file=str(token_file))
    cfg = agent_config(
        tmp_path,
        sinks={"central": sink},
        sources={"line1": {"type": "simulator", "rate": 200, "limit": 60, "seed": 3}},
        log={"level": "debug"},
    )
    agent = AgentProcess(tmp_path, cfg, env=env)
    try:
        checked = edge_agent("config", "check", str(agent.config_path), env=env)
        assert checked.returncode == 0, checked.stderr
        assert SECRET not in checked.stdout + checked.stderr

        agent.start(wait_ready=False)
        gw.wait_received(60, stream="line1", timeout=60)
        deadline = time.monotonic() + 30
        while True:  # the heartbeat (every 2 s) catches up with the delivery
            running = edge_agent("status", "--json", "-c", str(agent.config_path), env=env)
            assert running.returncode == 0, running.stderr
            snap = json.loads(running.stdout)
            if snap["agent"]["running"] and [s["state"] for s in snap["sinks"]] == ["connected"]:
                break
            assert time.monotonic() < deadline, snap
            time.sleep(0.5)
        table = edge_agent("status", "-c", str(agent.config_path), env=env)
        assert table.returncode == 0, table.stderr
        assert agent.stop() == 0
        stopped = edge_agent("status", "--json", "-c", str(agent.config_path), env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["agent"]["running"] is False
    finally:
        agent.kill()

    assert gw.report()["requests"]["unauthorized"] == 0, gw.report()["requests"]
    log = agent.log()
    assert "line1" in log and len(log.splitlines()) > 5, log[-2000:]
    for name, text in [
        ("status --json (running)", running.stdout + running.stderr),
        ("status (running)", table.stdout + table.stderr),
        ("status --json (stopped)", stopped.stdout + stopped.stderr),
        ("agent log", log),
    ]:
        assert SECRET not in text, f"secret shown in {name}"
    # nor is it written to the buffer, its WAL or the heartbeat file status reads
    written = [p for p in tmp_path.iterdir() if p.is_file() and p.name != "gateway.token"]
    assert Path(cfg["buffer"]["path"]) in written, written
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), f"secret written to {path}"

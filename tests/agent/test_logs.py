"""Log formats and secret redaction."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import clear_secrets, register_secret, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    clear_secrets()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line]


def test_json_lines_carry_batch_fields() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("edge_agent.forwarder").info(
        "batch accepted",
        extra={
            "stream": "line1",
            "batch_id": "01J0BATCH",
            "first_sequence": 41,
            "last_sequence": 80,
            "sink": "central",
        },
    )
    (line,) = _lines(out)
    doc = json.loads(line)
    assert doc["msg"] == "batch accepted"
    assert doc["level"] == "info"
    assert doc["logger"] == "edge_agent.forwarder"
    assert (doc["stream"], doc["batch_id"], doc["first_sequence"], doc["last_sequence"]) == (
        "line1",
        "01J0BATCH",
        41,
        80,
    )
    assert doc["sink"] == "central"
    assert doc["ts"].endswith("+00:00")


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    tty = Tty()
    setup_logging("info", "auto", stream=tty)
    logging.getLogger("edge_agent.source").warning("lost %s", "plc", extra={"source": "line1"})
    (line,) = _lines(tty)
    assert "WARNING" in line and "source: lost plc" in line and "source=line1" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)

    pipe = io.StringIO()
    setup_logging("info", "auto", stream=pipe)
    logging.getLogger("edge_agent.source").warning("lost %s", "plc")
    assert json.loads(_lines(pipe)[0])["msg"] == "lost plc"
    assert len([h for h in logging.getLogger().handlers if h.get_name() == "edge_agent"]) == 1


def test_level_filters_agent_lines() -> None:
    out = io.StringIO()
    setup_logging("warning", "json", stream=out)
    logging.getLogger("edge_agent.x").info("quiet")
    logging.getLogger("edge_agent.x").error("loud")
    assert [json.loads(line)["msg"] for line in _lines(out)] == ["loud"]


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("chatty", "json")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_never_appear(fmt: str) -> None:
    token = "s3cr3t-T0ken-value"
    password = "hunter2-password"
    register_secret(token)
    register_secret(password)
    register_secret("ab")  # too short to redact: ignored
    out = io.StringIO()
    setup_logging("debug", fmt, stream=out)
    log = logging.getLogger("edge_agent.sinks.https")
    log.info("auth with %s", token)
    log.info(f"url https://user:{password}@gw.example/v1", extra={"source": f"x{token}y"})
    log.debug("headers %r", {"Authorization": f"Bearer {token}"})
    try:
        raise RuntimeError(f"login failed for password {password}")
    except RuntimeError:
        log.exception("sink error")
    logging.getLogger("asyncua").error("library said %s", token)  # other loggers too
    text = out.getvalue()
    assert token not in text and password not in text, text
    assert text.count("***") >= 6
    assert "login failed for password ***" in text


def test_secret_in_a_real_process_stderr() -> None:
    """End to end in a fresh interpreter: what reaches stderr (journald) is redacted."""
    res = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.programs.log_a_secret", "tok-123456"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    doc = json.loads(res.stderr.strip().splitlines()[-1])  # stderr is a pipe: JSON
    assert doc["msg"] == "token=***" and doc["sink"] == "s"


# --------------------------------------------------------------------------- real agent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "process exited before listening"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def test_real_agent_json_logs_carry_batches_and_no_secrets(tmp_path: Path) -> None:
    """The real agent + reference gateway: JSON lines, batch fields, the token never shown."""
    exe = Path(sys.executable).with_name("edge-agent")
    assert exe.exists(), "edge-agent console script missing: `.venv/bin/pip install -e .`"
    token = "tok-" + "Zq8" * 8
    (tmp_path / "token").write_text(token + "\n")
    gw_port = _free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[agent]
id = "logs-test"
plant = "p1"
[buffer]
path = "{tmp_path / "buffer.db"}"
[metrics]
enabled = false
[sinks.central]
type = "https"
url = "http://127.0.0.1:{gw_port}/v1/batches"
token = "${{EDGE_TEST_TOKEN}}"
[sources.sim]
type = "simulator"
""",
        encoding="utf-8",
    )
    gw_log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [str(exe), "gateway", "--listen", f"127.0.0.1:{gw_port}", "--db",
         str(tmp_path / "gw.sqlite3"), "--token-file", str(tmp_path / "token")],
        stdout=gw_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    agent_proc = None
    err_path = tmp_path / "agent.err"
    try:
        _wait_port(gw_port, gateway)
        env = dict(os.environ, EDGE_TEST_TOKEN=token)
        with (tmp_path / "agent.out").open("wb") as out_f, err_path.open("wb") as err_f:
            agent_proc = subprocess.Popen(
                [str(exe), "run", "-c", str(cfg), "--log-level", "debug"],
                env=env,
                stdout=out_f,
                stderr=err_f,
            )
        # run until a batch was delivered (a slow machine may need more than a few seconds)
        deadline = time.monotonic() + 60
        while b'"batch_id"' not in err_path.read_bytes():
            assert agent_proc.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no batch delivered in 60 s"
            time.sleep(0.1)
        agent_proc.send_signal(signal.SIGTERM)
        agent_proc.wait(timeout=20)
        out, err = (tmp_path / "agent.out").read_bytes(), err_path.read_bytes()
    finally:
        for p in (agent_proc, gateway):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        gw_log.close()
    text = (out + err).decode()
    assert token not in text
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert lines, "the agent logged nothing"
    batch_lines = [d for d in lines if "batch_id" in d]
    assert batch_lines, f"no log line about a batch: {[d['msg'] for d in lines][:20]}"
    for d in batch_lines:
        assert {"stream", "first_sequence", "last_sequence", "sink"} <= d.keys(), d
        assert d["first_sequence"] <= d["last_sequence"]
    about_a_batch = [d for d in lines if "batch" in d["msg"].lower() and "batch_id" not in d]
    assert not about_a_batch, f"lines about a batch without batch_id: {about_a_batch}"

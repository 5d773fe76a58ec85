"""Drop folder: a SIGKILL in the middle of an import never imports a file twice.

1. A process running the source against the real Buffer is SIGKILLed at the exact point
   between the commit and the move (the ingest it uses kills the process as soon as
   ``append`` returned); the next run only moves the file.
2. The real agent (``python -m agent run -c FILE``) forwarding to the reference gateway: the
   move is made to fail (processed/ is a plain file), the agent is SIGKILLed with the
   events committed and the file still in the inbox, then restarted; and the agent is
   SIGKILLed at random points while importing many files. Every event reaches the gateway
   exactly once.

The events carry no MES id on purpose: the buffer's de-duplication by source event id
cannot hide a second import, only the content-hash mark prevents it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.fixtures.common import AgentProcess, agent_config, https_sink

REPO = Path(__file__).resolve().parents[2]


def counted(file_no: int, n: int) -> dict[str, Any]:
    """An event without an MES id, so only the content-hash mark prevents a re-import."""
    return {
        "type": "mfg.production.counted",
        "time": "2026-11-23T10:00:00Z",
        "data": {"work_order": f"WO-{file_no}", "item": "P-1", "good": {"value": n, "uom": "EA"}},
    }


def write_file(inbox: Path, file_no: int, events: int) -> Path:
    path = inbox / f"export-{file_no:03d}.jsonl"
    tmp = path.with_suffix(".jsonl.part")
    tmp.write_bytes(b"".join(orjson.dumps(counted(file_no, n)) + b"\n" for n in range(events)))
    os.rename(tmp, path)  # the rename convention: never seen half written
    return path


def run_runner(tmp_path: Path, inbox: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    program = "tests.fixtures.programs.drop_folder_crash"
    return subprocess.run(
        [sys.executable, "-m", program, str(tmp_path / "buffer.db"), str(inbox), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_sigkill_between_commit_and_move_imports_exactly_once(tmp_path: Path) -> None:
    inbox = tmp_path / "drop"
    inbox.mkdir()
    write_file(inbox, 1, 7)

    killed = run_runner(tmp_path, inbox, "kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "committed" in killed.stdout
    assert (inbox / "export-001.jsonl").exists(), "the kill came before the move"
    assert not (inbox / "processed").exists()

    again = run_runner(tmp_path, inbox, "normal")
    assert again.returncode == 0, again.stderr
    result = orjson.loads(again.stdout.strip().splitlines()[-1])
    assert result["values"] == list(range(7)), "each event exactly once"
    assert result["detail"]["files_already_imported"] == 1
    assert result["detail"]["files_imported"] == 0
    assert (inbox / "processed" / "export-001.jsonl").exists()
    assert not (inbox / "export-001.jsonl").exists()


# ----------------------------------------------------------------------------- real agent


def agent_config_for(tmp_path: Path, gw: Any, inbox: Path) -> dict[str, Any]:
    return agent_config(
        tmp_path,
        sinks={"https": https_sink(gw)},
        sources={"mes_drop": {"type": "drop_folder", "path": str(inbox), "poll_interval": "50ms"}},
        forwarder={"linger_ms": 5},
    )


def wait_for(
    predicate: Callable[[], bool], what: str, agent: AgentProcess, within: float = 30
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(f"agent exited while waiting for {what}:\n{agent.log()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{agent.log()[-4000:]}")
        time.sleep(0.05)


def gateway_values(gw: Any) -> Counter[tuple[str, int]]:
    return Counter(
        (e["data"]["work_order"], e["data"]["good"]["value"]) for e in gw.events("mes_drop")
    )


def test_real_agent_killed_after_commit_before_move_forwards_each_event_once(
    tmp_path: Path, gateway: Callable[..., Any], agent_process: Callable[..., AgentProcess]
) -> None:
    gw = gateway()
    inbox = tmp_path / "drop"
    inbox.mkdir()
    agent = agent_process(agent_config_for(tmp_path, gw, inbox)).start()
    # once the agent runs (config check would refuse it at start), a file where the
    # processed directory should be: the move after the commit fails
    processed = inbox / "processed"
    if processed.is_dir():
        processed.rmdir()
    processed.write_text("a file where the directory should be: moves fail\n")
    write_file(inbox, 1, 5)

    # committed and forwarded, but the move failed: the file is still in the inbox
    wait_for(lambda: sum(gateway_values(gw).values()) >= 5, "5 events at the gateway", agent)
    assert (inbox / "export-001.jsonl").exists()
    agent.kill()

    (inbox / "processed").unlink()
    agent.start(wait_ready=False)
    wait_for(lambda: (inbox / "processed" / "export-001.jsonl").exists(), "the move", agent)
    write_file(inbox, 2, 5)  # and it keeps working
    wait_for(lambda: (inbox / "processed" / "export-002.jsonl").exists(), "file 2", agent)
    wait_for(lambda: sum(gateway_values(gw).values()) >= 10, "10 events", agent)
    time.sleep(0.5)  # a duplicate, if any, would arrive now
    assert agent.stop() == 0, agent.log()[-4000:]

    values = gateway_values(gw)
    assert set(values) == {(f"WO-{f}", n) for f in (1, 2) for n in range(5)}
    assert max(values.values()) == 1, f"duplicates at the gateway: {values}"


def test_real_agent_sigkilled_repeatedly_mid_import_forwards_each_event_once(
    tmp_path: Path, gateway: Callable[..., Any], agent_process: Callable[..., AgentProcess]
) -> None:
    gw = gateway()
    inbox = tmp_path / "drop"
    inbox.mkdir()
    files, per_file = 100, 20  # enough files that two kills land mid-import, even on a fast disk
    for f in range(files):
        write_file(inbox, f, per_file)
    agent = agent_process(agent_config_for(tmp_path, gw, inbox))
    rng = random.Random(4)

    def moved() -> int:
        done = inbox / "processed"
        return len(list(done.glob("*.jsonl"))) if done.exists() else 0

    for _ in range(2):  # killed while it is busy importing, at a random moment
        before = moved()
        agent.start(wait_ready=False)
        wait_for(lambda: moved() > before, "progress", agent)  # noqa: B023
        time.sleep(rng.uniform(0.0, 0.15))
        agent.kill()
    assert moved() < files, "the kills should come before the end of the import"
    agent.start(wait_ready=False)
    wait_for(lambda: not any(inbox.glob("*.jsonl")), "every file imported", agent, within=60)
    wait_for(lambda: sum(gateway_values(gw).values()) >= files * per_file, "all events", agent)
    time.sleep(0.5)
    assert agent.stop() == 0, agent.log()[-4000:]

    values = gateway_values(gw)
    assert set(values) == {(f"WO-{f}", n) for f in range(files) for n in range(per_file)}
    assert max(values.values()) == 1, "an event arrived twice"
    assert len(list((inbox / "processed").iterdir())) == files

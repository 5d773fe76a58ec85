"""The stop budget adds up, fits the systemd unit with a margin, and the docs say the same."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from agent.lifecycle import (
    STOP_BUDGET,
    STOP_MARGIN,
    STOP_PHASES,
    SYSTEMD_TIMEOUT_STOP,
    share,
    stop_tasks,
)
from agent.runtime import STOP_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min)?", text.strip())
    assert m, f"cannot read a duration from {text!r}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_phases_add_up_inside_the_units_timeout_stop_sec() -> None:
    assert STOP_BUDGET == sum(p.seconds for p in STOP_PHASES)
    assert STOP_TIMEOUT == STOP_BUDGET
    assert [p.name for p in STOP_PHASES] == ["sources", "forwarders", "sinks", "service", "buffer"]
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        found = re.findall(r"^TimeoutStopSec=(.+)$", unit.read_text(), flags=re.M)
        assert found, f"{unit.name} sets no TimeoutStopSec"
        timeout = _seconds(found[-1])
        assert timeout == SYSTEMD_TIMEOUT_STOP, unit.name
        assert STOP_BUDGET + STOP_MARGIN <= timeout, (unit.name, STOP_BUDGET, timeout)
        assert STOP_MARGIN >= 5


def test_architecture_table_matches_the_code() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = dict(re.findall(r"^\| (\w+) \| (\d+) s \|", doc, flags=re.M))
    assert {k: float(v) for k, v in rows.items()} == {p.name: p.seconds for p in STOP_PHASES}
    total = re.search(r"^\| \*\*total\*\* \| \*\*(\d+) s\*\* \|", doc, flags=re.M)
    assert total and float(total.group(1)) == STOP_BUDGET


def test_mes_http_shutdown_timeout_fits_the_sources_share() -> None:
    from adapters.sources.mes_http.config import SHUTDOWN_TIMEOUT_MAX
    from adapters.sources.mes_http.config import Config as MesHttpConfig

    field = MesHttpConfig.model_fields["shutdown_timeout"]
    assert field.default <= SHUTDOWN_TIMEOUT_MAX < share("sources")
    notes: list[str] = []
    cfg = MesHttpConfig.model_validate(
        {"type": "mes_http", "stream": "mes", "listen": "127.0.0.1:8080",
         "token": "t", "shutdown_timeout": share("sources") * 2},
        context={"path": "sources.mes", "deprecations": notes},
    )  # fmt: skip
    # an older config still starts: capped to fit the budget, and said once
    assert cfg.shutdown_timeout == SHUTDOWN_TIMEOUT_MAX
    assert len(notes) == 1
    assert notes[0].startswith("sources.mes.shutdown_timeout = 12s is longer than")
    assert "capped at 5s" in notes[0]


def test_config_check_says_when_shutdown_timeout_is_capped(tmp_path) -> None:
    from click.testing import CliRunner

    from agent.cli import cli

    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\nplant = "p"\n[buffer]\npath = "{tmp_path}/buffer.db"\n'
        '[sinks.central]\ntype = "https"\nurl = "https://gw.example:8443/v1/events"\n'
        'token = "x"\n'
        '[sources.mes]\ntype = "mes_http"\nlisten = "127.0.0.1:0"\ntoken = "t"\n'
        'shutdown_timeout = "30s"\n'
    )
    result = CliRunner().invoke(cli, ["config", "check", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "sources.mes.shutdown_timeout = 30s is longer than" in result.output


async def test_a_task_over_its_share_is_named_and_cancelled_again(caplog) -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        finally:  # a cleanup that hangs: only a second cancellation ends it
            await asyncio.sleep(3600)

    async def polite() -> None:
        await asyncio.sleep(3600)

    async with asyncio.TaskGroup() as tg:
        late = tg.create_task(stubborn(), name="forward:slow")
        quick = tg.create_task(polite(), name="forward:quick")
        await asyncio.sleep(0)
        started = time.monotonic()
        assert await stop_tasks("forwarders", [late, quick]) is False
        took = time.monotonic() - started
    assert share("forwarders") <= took < share("forwarders") + 5
    assert late.cancelled() and quick.cancelled()
    assert "forwarders not stopped within its 1 s share: forward:slow" in caplog.text


async def test_tasks_that_stop_at_once_take_no_share() -> None:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(asyncio.sleep(3600)) for _ in range(3)]
        await asyncio.sleep(0)
        started = time.monotonic()
        assert await stop_tasks("sources", tasks) is True
        assert time.monotonic() - started < 2

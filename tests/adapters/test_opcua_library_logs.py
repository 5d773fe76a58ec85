"""asyncua's own log lines on a server restart (issue 10, item 3): docs/opcua.md promises a
warning on loss and info on reconnect; asyncua itself logs ERROR "Publish iteration crashed;
retrying in 1s" with a traceback. A real asyncua server is killed and started again."""

from __future__ import annotations

import logging

import pytest

from adapters.sources.opcua.library_logs import RETRY_LINES
from tests.fixtures.opcua_helpers import make_config, node, running_source, signals, wait_for


async def test_server_restart_logs_warnings_without_traceback(
    opcua_server, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncua")
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    srv = opcua_server(tick=0.05)
    cfg = make_config(srv.endpoint, [node("Counter", queue_size=20)], liveness_timeout="2s")
    async with running_source(cfg, tmp_path) as (src, buf):
        await wait_for(lambda: src.state().state == "connected", 30, "connected", src)
        before = len(await signals(buf, "line1", "Line1.Counter"))
        await wait_for(lambda: _more(buf, before + 3), 30, "samples before the restart", src)
        srv.kill()
        await wait_for(lambda: src.state().state == "disconnected", 10, "loss", src)
        srv.start()
        await wait_for(lambda: src.state().state == "connected", 30, "reconnect", src)
        n = len(await signals(buf, "line1", "Line1.Counter"))
        await wait_for(lambda: _more(buf, n + 3), 30, "samples after the restart", src)
    records = [r for r in caplog.records if r.name.startswith("asyncua")]
    for r in records:
        assert r.levelno < logging.ERROR, f"asyncua logged {r.levelname}: {r.getMessage()}"
        assert r.exc_info is None and r.exc_text is None, f"traceback in: {r.getMessage()}"
    ours = [r for r in caplog.records if r.name.startswith("edge_agent")]
    assert any(r.levelno == logging.WARNING for r in ours), "the loss is a warning"
    retry = [r for r in records if any(r.getMessage().startswith(p.replace("crashed", "failed"))
                                       for _, p in RETRY_LINES)]  # fmt: skip
    assert retry, "the restart made asyncua's publish loop fail: as one warning line"
    assert all(r.levelno == logging.WARNING and "\n" not in r.getMessage() for r in retry)


async def _more(buf, n: int) -> bool:
    return len(await signals(buf, "line1", "Line1.Counter")) >= n

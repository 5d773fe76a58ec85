"""End to end: asyncua server -> `edge-agent run` (subprocess) -> reference gateway."""

from __future__ import annotations

from datetime import datetime

from asyncua import ua

from tests.fixtures.common import agent_config, https_sink

NS = "urn:edge-agent:test-server"


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def test_values_reach_the_gateway_in_order_with_timestamps_and_status(
    opcua_plain_server, gateway, agent_process, tmp_path
):
    srv = opcua_plain_server
    gw = gateway()
    source = {
        "type": "opcua",
        "endpoint": srv.endpoint,
        "publishing_interval": "100ms",
        "line": "L1",
        "nodes": [
            {"node_id": f"nsu={NS};s=Line1.Counter", "sampling_interval": 0, "queue_size": 20},
            {"node_id": f"nsu={NS};s=Quality", "sampling_interval": 0, "queue_size": 20},
            {"node_id": f"nsu={NS};s=Line1.Quality", "sampling_interval": 0, "queue_size": 20},
        ],
    }
    agent = agent_process(
        agent_config(tmp_path, sinks={"https": https_sink(gw)}, sources={"line1": source})
    )
    agent.start()
    gw.wait_received(60, stream="line1", timeout=30)
    # the misspelt node is reported, not silently ignored, and the others still flow
    status = agent.wait(
        lambda st: _source_status(st, "line1")["state"] == "connected",
        timeout=10,
        what="source line1 connected in status",
    )
    agent.stop()
    events = gw.events("line1")
    seqs = [int(e["sequence"]) for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert {e["source"] for e in events} == {"edge-agent://test-plant/line1"}
    counters = [e for e in events if e["data"]["node_id"].endswith("Line1.Counter")]
    values = [e["data"]["value"] for e in counters]
    assert values == list(range(values[0], values[0] + len(values))), values
    for e in counters:
        src = _ts(e["data"]["source_timestamp"])
        assert abs(src.timestamp() - (srv.t0 + e["data"]["value"] * srv.tick)) < 0.002
        assert abs((_ts(e["time"]) - src).total_seconds()) < 0.001
        assert e["dataschema"] == "urn:edge-agent:schema:mfg.signal.sampled:1"
    quality = [e["data"] for e in events if e["data"]["node_id"].endswith("Line1.Quality")]
    names = {q["status_code"]["name"] for q in quality}
    assert {"BadSensorFailure", "UncertainLastUsableValue", "Good"} <= names
    assert any(q["status_code"]["code"] == ua.StatusCodes.BadSensorFailure for q in quality)
    src_status = _source_status(status, "line1")
    assert src_status["detail"]["items_monitored"] == 2, src_status
    assert "Quality" in str(src_status["detail"]["failed_nodes"])


def _source_status(status: dict, name: str) -> dict:
    for s in status.get("sources", []):
        if s.get("name") == name:
            return s
    raise AssertionError(f"no source {name} in status: {status}")

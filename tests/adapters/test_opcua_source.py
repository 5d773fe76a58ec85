"""The OPC UA source against a real asyncua server subprocess, into the real Buffer."""

from __future__ import annotations

from datetime import datetime

from asyncua import ua

from tests.adapters.opcua_helpers import make_config, node, running_source, signals, wait_for


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


async def test_values_arrive_in_order_with_timestamps_and_status(opcua_server, tmp_path):
    srv = opcua_server(tick=0.05)
    cfg = make_config(
        srv.endpoint,
        [node("Counter", queue_size=50), node("Quality", queue_size=50, machine="M1")],
    )
    async with running_source(cfg, tmp_path) as (src, buf):
        counters = await wait_for(
            lambda: _enough(buf, "Line1.Counter", 40), 20, "40 counter samples", src
        )
        quality = await signals(buf, "line1", "Line1.Quality")
        st = src.state()
        assert st.state == "connected", st
        assert st.detail["items_monitored"] == 2
    values = [e["data"]["value"] for e in counters]
    # every tick, in order, no gap, no duplicate (queue_size covers the publishing interval)
    assert values == list(range(values[0], values[0] + len(values))), values
    for e in counters:
        d = e["data"]
        assert d["status_code"] == {"code": 0, "name": "Good"}
        # the source timestamp is the server's tick time and becomes the envelope time
        expected = srv.t0 + d["value"] * srv.tick
        assert abs(_ts(d["source_timestamp"]).timestamp() - expected) < 0.002
        assert _ts(e["time"]) == _ts(d["source_timestamp"]).replace(microsecond=_ms(d))
        assert d["server_timestamp"] is not None
        assert d["line"] == "L1" and e["subject"] == d["node_id"]
        assert d["data_type"] == "UInt32"
    # bad and uncertain values are forwarded with their status, never dropped or made good
    # (a server may send no value with a Bad status: the tick comes from the timestamp)
    by_value = {
        round((_ts(e["data"]["source_timestamp"]).timestamp() - srv.t0) / srv.tick): e["data"][
            "status_code"
        ]
        for e in quality
    }
    names = {v % 5: sc["name"] for v, sc in by_value.items()}
    assert names[0] == "BadSensorFailure" and names[1] == "UncertainLastUsableValue"
    assert names[2] == "Good"
    bad = next(sc for v, sc in by_value.items() if v % 5 == 0)
    assert bad["code"] == ua.StatusCodes.BadSensorFailure
    assert quality[0]["data"]["machine"] == "M1"
    # notifications are committed in groups, not one transaction each
    assert st.detail["appends"] < st.detail["notifications_total"] / 2, st.detail


def _ms(d: dict) -> int:
    return _ts(d["source_timestamp"]).microsecond // 1000 * 1000


async def _enough(buf, suffix, n):
    got = await signals(buf, "line1", suffix)
    return got if len(got) >= n else None

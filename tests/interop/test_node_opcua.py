"""Interop: the OPC UA source against node-opcua's sample server, into the real Buffer."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.fixtures.opcua_helpers import make_config, read_events, running_source, wait_for

SIM = "urn://node-opcua-simulator"


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _nodes(ns: str) -> list[dict]:
    return [
        {"node_id": f"nsu={ns};s=FanSpeed", "sampling_interval": "100ms", "queue_size": 20},
        {"node_id": f"nsu={ns};s=Pressure", "sampling_interval": "100ms", "queue_size": 20},
        {"node_id": f"nsu={ns};s=PumpSpeed", "sampling_interval": "100ms", "queue_size": 20},
        {"node_id": f"nsu={SIM};s=Scalar_Simulation_Double", "sampling_interval": "100ms"},
    ]


async def _collect(cfg, tmp_path, n: int):
    async with running_source(cfg, tmp_path) as (src, buf):

        async def enough():
            evs = await read_events(buf, "line1")
            per_node = {e["data"]["node_id"] for e in evs}
            return evs if len(evs) >= n and len(per_node) >= 3 else None

        events = await wait_for(enough, 30, f"{n} events from node-opcua", src)
        return events, src.state()


async def test_values_from_node_opcua_arrive_in_order_with_source_time(node_opcua_server, tmp_path):
    srv = node_opcua_server
    cfg = make_config(srv.endpoint, _nodes(srv.namespace), publishing_interval="200ms")
    events, st = await _collect(cfg, tmp_path, 30)
    assert st.state == "connected" and st.detail["items_monitored"] == 4, st
    now = datetime.now(UTC)
    by_node: dict[str, list[dict]] = {}
    for e in events:
        assert e["type"] == "mfg.signal.sampled"
        by_node.setdefault(e["data"]["node_id"], []).append(e)
    assert f"nsu={srv.namespace};s=FanSpeed" in by_node
    for node_id, evs in by_node.items():
        times = [_ts(e["time"]) for e in evs]
        assert times == sorted(times), node_id
        for e in evs:
            d = e["data"]
            assert d["status_code"]["name"] == "Good" and isinstance(d["value"], float)
            # our contract, whatever the peer stamps: an unknown OPC UA DateTime (null
            # 1601-01-01 or max 9999-12-31) is never forwarded as a date, and the envelope
            # time is the first known, believable clock, which time_basis names
            for key in ("source_timestamp", "server_timestamp"):
                if key in d:
                    assert 1601 < _ts(d[key]).year < 9999, (key, d)
            assert abs((_ts(e["time"]) - now).total_seconds()) < 120
            basis = d["time_basis"]
            assert basis in ("source", "server", "received"), d
            if basis != "received":
                clock = _ts(d[f"{basis}_timestamp"])
                assert _ts(e["time"]) == clock.replace(microsecond=clock.microsecond // 1000 * 1000)
            if basis != "source" and "source_timestamp" in d:
                # a believable source timestamp would have been the envelope time
                assert abs((_ts(d["source_timestamp"]) - now).total_seconds()) >= 120, d


async def test_node_opcua_signandencrypt_with_user(node_opcua_server, tmp_path):
    srv = node_opcua_server
    (tmp_path / "pw").write_text("password1\n")
    cfg = make_config(
        srv.endpoint,
        _nodes(srv.namespace),
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        trusted_certs_dir=str(srv.pki),
        username="user1",
        password_file=str(tmp_path / "pw"),
        publishing_interval="200ms",
    )
    events, st = await _collect(cfg, tmp_path, 10)
    assert st.detail["security"] == "Basic256Sha256/SignAndEncrypt"
    assert all(e["data"]["status_code"]["code"] == 0 for e in events)


async def test_node_opcua_wrong_password_is_a_clear_error(node_opcua_server, tmp_path):
    srv = node_opcua_server
    (tmp_path / "pw").write_text("wrong")
    cfg = make_config(
        srv.endpoint,
        _nodes(srv.namespace),
        security_policy="Aes256_Sha256_RsaPss",
        security_mode="Sign",
        trusted_certs_dir=str(srv.pki),
        username="user1",
        password_file=str(tmp_path / "pw"),
    )
    async with running_source(cfg, tmp_path) as (src, buf):
        st = await wait_for(
            lambda: src.state() if src.state().state == "auth_failed" else None, 20, "auth", src
        )
        assert await read_events(buf, "line1") == []
    assert f"server {srv.endpoint} refused user 'user1'" in st.last_error
    assert "check username and password_file" in st.last_error


async def test_server_side_queue_overflow_is_counted_not_hidden(node_opcua_server, tmp_path):
    # a queue of 2 sampled every 50 ms but published every second: the server must discard
    # values and says so with the Overflow bit, which the agent counts and shows
    srv = node_opcua_server
    nodes = [
        {
            "node_id": f"nsu={srv.namespace};s=FanSpeed",
            "sampling_interval": "50ms",
            "queue_size": 2,  # (with 1 the spec says the Overflow bit is never set)
        }
    ]
    cfg = make_config(srv.endpoint, nodes, publishing_interval="1s")
    async with running_source(cfg, tmp_path) as (src, buf):
        st = await wait_for(
            lambda: src.state() if src.state().detail["server_queue_overflows"] >= 2 else None,
            15,
            "overflow counted",
            src,
        )
    assert st.detail["server_queue_overflows"] <= st.detail["notifications_total"]

"""The OPC UA source against a real asyncua server subprocess, into the real Buffer."""

from __future__ import annotations

from datetime import datetime

from asyncua import ua

from tests.adapters.opcua_helpers import (
    make_config,
    node,
    read_events,
    running_source,
    signals,
    wait_for,
)


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


async def test_signandencrypt_with_username_password(opcua_server, tmp_path):
    srv = opcua_server(secure=True, secure_only=True, users={"operator": "s3cret"}, tick=0.1)
    (tmp_path / "pw").write_text("s3cret\n")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "server.der").write_bytes(srv.cert.read_bytes())
    cfg = make_config(
        srv.endpoint,
        [node("Counter")],
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        trusted_certs_dir=str(trusted),
        username="operator",
        password_file=str(tmp_path / "pw"),
    )
    async with running_source(cfg, tmp_path) as (src, buf):
        got = await wait_for(lambda: _enough(buf, "Line1.Counter", 5), 20, "5 samples", src)
        st = src.state()
        assert st.state == "connected" and st.detail["security"] == "Basic256Sha256/SignAndEncrypt"
    values = [e["data"]["value"] for e in got]
    assert values == sorted(values) and len(set(values)) == len(values)
    # the agent made itself a proper application instance certificate
    assert (tmp_path / "state" / "opcua" / "line1" / "cert.der").is_file()


async def test_wrong_password_is_a_clear_auth_error(opcua_server, tmp_path):
    srv = opcua_server(secure=True, users={"operator": "s3cret"})
    (tmp_path / "pw").write_text("wrong")
    cfg = make_config(
        srv.endpoint,
        [node("Counter")],
        security_policy="Basic256Sha256",
        server_thumbprint=_thumb(srv.cert),
        username="operator",
        password_file=str(tmp_path / "pw"),
    )
    async with running_source(cfg, tmp_path) as (src, buf):
        st = await wait_for(
            lambda: src.state() if src.state().state == "auth_failed" else None, 20, "auth", src
        )
        assert st.last_error == (
            f"server {srv.endpoint} refused user 'operator' (BadUserAccessDenied): "
            "check username and password_file"
        )
        assert await read_events(buf, "line1") == []


async def test_untrusted_server_certificate_is_refused_naming_its_thumbprint(
    opcua_server, tmp_path
):
    srv = opcua_server(secure=True, secure_only=True)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    cfg = make_config(
        srv.endpoint,
        [node("Counter")],
        security_policy="Aes256_Sha256_RsaPss",
        security_mode="Sign",
        trusted_certs_dir=str(trusted),
    )
    thumb = _thumb(srv.cert)
    async with running_source(cfg, tmp_path) as (src, buf):
        st = await wait_for(
            lambda: src.state() if src.state().state == "auth_failed" else None, 20, "refusal", src
        )
        assert await read_events(buf, "line1") == []
    pretty = ":".join(thumb[i : i + 2] for i in range(0, 40, 2))
    assert f"server certificate of {srv.endpoint} is not trusted: SHA-1 thumbprint {pretty}" in (
        st.last_error
    )
    saved = tmp_path / "state" / "opcua" / "line1" / "rejected" / f"{thumb}.der"
    assert f"copy {saved} into {trusted}" in st.last_error
    assert f'set server_thumbprint = "{thumb}"' in st.last_error
    assert saved.read_bytes() == srv.cert.read_bytes()


def _thumb(path) -> str:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest().upper()

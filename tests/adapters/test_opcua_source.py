"""The OPC UA source against a real asyncua server subprocess, into the real Buffer."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import datetime

import orjson
import pytest
from asyncua import Client, ua

from agent import vocabulary
from tests.fixtures.opcua_helpers import (
    CutProxy,
    make_config,
    node,
    read_events,
    running_source,
    signals,
    wait_for,
)


@pytest.fixture
def plain(opcua_plain_server):
    return opcua_plain_server


@pytest.fixture
def secure(opcua_secure_server):
    return opcua_secure_server


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


async def test_values_arrive_in_order_with_timestamps_and_status(plain, tmp_path):
    srv = plain
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
        assert st.detail["publish_decode"] == "lean"  # lean_publish, not asyncua's decode
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
        assert d["time_basis"] == "source"
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


async def test_unknown_timestamps_are_left_out_and_time_falls_back(plain, tmp_path):
    """OPC UA's null (1601-01-01) and max (9999-12-31) DateTime mean "unknown" (Part 6,
    5.2.2.5): never forwarded as dates; the envelope time falls back to the server
    timestamp, then to the receipt time, and data.time_basis says which."""
    srv = plain
    cfg = make_config(srv.endpoint, [node("NullSource"), node("UnknownTimes")])
    async with running_source(cfg, tmp_path) as (src, buf):
        null_source = await wait_for(
            lambda: _enough(buf, "Line1.NullSource", 5), 20, "5 NullSource samples", src
        )
        unknown = await wait_for(
            lambda: _enough(buf, "Line1.UnknownTimes", 5), 20, "5 UnknownTimes samples", src
        )
    for e in null_source + unknown:
        d = e["data"]
        for key in ("source_timestamp", "server_timestamp"):
            assert key not in d or _ts(d[key]).year not in (1601, 9999), (key, d)
        assert 1601 < _ts(e["time"]).year < 9999, e["time"]
    for e in null_source:
        d = e["data"]
        assert "source_timestamp" not in d, d
        assert d["time_basis"] == "server"
        # the server stamps the tick: the envelope time is the server timestamp
        expected = srv.t0 + d["value"] * srv.tick
        assert abs(_ts(d["server_timestamp"]).timestamp() - expected) < 0.002
        assert abs(_ts(e["time"]).timestamp() - expected) < 0.002
    for e in unknown:
        d = e["data"]
        assert "source_timestamp" not in d and "server_timestamp" not in d, d
        assert d["time_basis"] == "received"
        # received: after the tick, and not long after it
        lag = _ts(e["time"]).timestamp() - (srv.t0 + d["value"] * srv.tick)
        assert -0.002 < lag < 10, lag
        assert vocabulary.validate_data(e["type"], d) == d


def _ms(d: dict) -> int:
    return _ts(d["source_timestamp"]).microsecond // 1000 * 1000


async def _enough(buf, suffix, n):
    got = await signals(buf, "line1", suffix)
    return got if len(got) >= n else None


async def test_signandencrypt_with_username_password(secure, tmp_path):
    srv = secure
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


async def test_wrong_password_is_a_clear_auth_error(secure, tmp_path):
    srv = secure
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


async def test_untrusted_server_certificate_is_refused_naming_its_thumbprint(secure, tmp_path):
    srv = secure
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
    assert f"server certificate of {srv.endpoint} (CN=edge-agent test server, SHA-1 {pretty})" in (
        st.last_error
    )
    assert "is not trusted" in st.last_error
    saved = tmp_path / "state" / "opcua" / "line1" / "rejected" / f"{thumb}.der"
    assert st.last_error.endswith(f"trust it: edge-agent opcua trust --dir {trusted} {saved}")
    assert saved.read_bytes() == srv.cert.read_bytes()


async def test_pki_dir_trusts_the_asyncua_server_by_its_own_certificate(secure, tmp_path):
    """The Part 12 folder with the self-signed server certificate in trusted/certs: no CA,
    so no CRL is needed; our own certificate is made in own/."""
    srv = secure
    pki = tmp_path / "pki"
    (pki / "trusted" / "certs").mkdir(parents=True)
    (pki / "trusted" / "certs" / "srv.der").write_bytes(srv.cert.read_bytes())
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = make_config(
        srv.endpoint,
        [node("Counter")],
        security_policy="Aes128_Sha256_RsaOaep",
        pki_dir=str(pki),
        username="operator",
        password_file=str(tmp_path / "pw"),
    )
    async with running_source(cfg, tmp_path) as (src, buf):
        await wait_for(lambda: _enough(buf, "Line1.Counter", 3), 20, "3 samples", src)
    for sub in ("trusted/crl", "issuers/certs", "issuers/crl", "rejected"):
        assert (pki / sub).is_dir(), sub
    assert (pki / "own" / "certs" / "cert.der").is_file()
    assert (pki / "own" / "private" / "key.pem").stat().st_mode & 0o077 == 0


def _thumb(path) -> str:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest().upper()


async def test_server_killed_and_restarted_reconnects_and_resumes(opcua_server, tmp_path):
    srv = opcua_server(tick=0.1)
    cfg = make_config(srv.endpoint, [node("Counter", queue_size=20)], liveness_timeout="2s")
    async with running_source(cfg, tmp_path) as (src, buf):
        await wait_for(lambda: _enough(buf, "Line1.Counter", 5), 20, "5 samples", src)
        # a frozen server (socket open, no answers: like a network cut) is detected in time
        os.kill(srv.proc.pid, signal.SIGSTOP)
        frozen = time.time()
        try:
            st = await wait_for(
                lambda: src.state() if src.state().state == "disconnected" else None, 6, "cut", src
            )
            # liveness_timeout + a watchdog step + slack for a loaded machine; a TCP
            # timeout would take minutes, and closing the frozen session is not waited for
            assert time.time() - frozen < 2 + 2.0, time.time() - frozen
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        await wait_for(lambda: src.state().state == "connected", 10, "back after the cut", src)
        assert src.state().detail["reconnects"] == 1
        killed = time.time()
        srv.kill()
        st = await wait_for(
            lambda: src.state() if src.state().state == "disconnected" else None, 5, "loss", src
        )
        detected = time.time() - killed
        assert detected < 2.5, detected  # within liveness_timeout (+ a watchdog step)
        assert "127.0.0.1" in st.last_error
        before = len(await signals(buf, "line1", "Line1.Counter"))
        await asyncio.sleep(1.0)
        srv.start()
        restarted = time.time()
        await wait_for(
            lambda: _enough(buf, "Line1.Counter", before + 10), 20, "samples after restart", src
        )
        st = src.state()
        assert st.state == "connected" and st.detail["reconnects"] == 2, st
        got = await signals(buf, "line1", "Line1.Counter")
    values = [e["data"]["value"] for e in got]
    assert values == sorted(set(values)), "no duplicate, no reordering across the restart"
    gaps = [b - a for a, b in zip(values, values[1:], strict=False) if b - a > 1]
    assert 1 <= len(gaps) <= 2, values  # the freeze and the restart window, nowhere else
    # the missing ticks fall in the window the server was really down (plus reconnect)
    first_after = next(v for v in values if srv.t0 + v * srv.tick > killed)
    # reconnect backoff (jittered, up to 1.2 s here) plus a new session and subscription
    assert srv.t0 + first_after * srv.tick < restarted + 5.0
    assert gaps[-1] * srv.tick < (restarted - killed) + 5.0


async def test_counter_state_and_hold_mapping(plain, tmp_path):
    nodes = [
        node(
            "Produced",
            event="mfg.production.counted",
            counter_max=65535,
            work_order="WO-1",
            item="ITEM-9",
            raw=False,
        ),
        node(
            "State",
            event="mfg.machine.state_changed",
            machine="M1",
            raw=False,
            states={"0": "idle", "1": "running", "2": "down", "3": "setup"},
        ),
        node("Hold", event="mfg.quality.hold", item="ITEM-9", lot="LOT-7", reason="leak test"),
    ]
    cfg = make_config(plain.endpoint, nodes, line="L1", plant="berlin")
    async with Client(plain.endpoint) as client:
        ns = await client.get_namespace_index("urn:edge-agent:test-server")

        async def write(name: str, value, vt) -> None:
            await client.get_node(f"ns={ns};s=Line1.{name}").write_value(ua.Variant(value, vt))

        await write("Produced", 0, ua.VariantType.UInt16)
        await write("State", 0, ua.VariantType.Int32)
        await write("Hold", False, ua.VariantType.Boolean)
        async with running_source(cfg, tmp_path) as (src, buf):
            await wait_for(
                lambda: src.state().detail["notifications_total"] >= 3, 10, "initial", src
            )
            for v in (10, 15, 3, 65530, 5):
                await write("Produced", v, ua.VariantType.UInt16)
                await asyncio.sleep(0.15)
            for v in (1, 2, 9, 3):
                await write("State", v, ua.VariantType.Int32)
                await asyncio.sleep(0.15)
            for v in (True, False):
                await write("Hold", v, ua.VariantType.Boolean)
                await asyncio.sleep(0.15)

            async def done():
                evs = await read_events(buf, "line1")
                return evs if sum(e["type"] == "mfg.quality.hold_released" for e in evs) else None

            events = await wait_for(done, 10, "hold released", src)
            assert src.state().detail["items_monitored"] == 3
    counted = [e["data"] for e in events if e["type"] == "mfg.production.counted"]
    # +10, +5, reset to 3 counts 3, +65527, rollover 65530 -> 5 counts 11
    assert [c["good"] for c in counted] == [
        {"value": v, "uom": "EA"} for v in (10, 5, 3, 65527, 11)
    ]
    assert counted[0]["work_order"] == "WO-1" and counted[0]["item"] == "ITEM-9"
    assert counted[0]["plant"] == "berlin" and counted[0]["line"] == "L1"
    states = [e["data"] for e in events if e["type"] == "mfg.machine.state_changed"]
    assert [(s["state"], s.get("previous_state")) for s in states] == [
        ("idle", None),
        ("running", "idle"),
        ("down", "running"),
        ("setup", "down"),
    ]
    assert states[0]["machine"] == "M1" and states[3]["reason_code"] == "3"
    holds = [e for e in events if e["type"].startswith("mfg.quality.hold_")]
    assert [h["type"] for h in holds] == ["mfg.quality.hold_placed", "mfg.quality.hold_released"]
    assert holds[0]["data"]["lot"] == "LOT-7" and holds[0]["data"]["reason"] == "leak test"
    # raw = false: no signal for the counter and state nodes; the hold node keeps its raw signal
    raw_nodes = {e["data"]["node_id"] for e in events if e["type"] == "mfg.signal.sampled"}
    assert raw_nodes == {"nsu=urn:edge-agent:test-server;s=Line1.Hold"}


async def test_outage_gap_is_backfilled_from_history_in_order(opcua_server, tmp_path):
    srv = opcua_server(tick=0.1, history=True)
    proxy = await CutProxy(srv.port).start()
    cfg = make_config(proxy.endpoint, [node("Counter", queue_size=20, backfill=True)])
    try:
        async with running_source(cfg, tmp_path) as (src, buf):
            await wait_for(lambda: _enough(buf, "Line1.Counter", 5), 20, "5 samples", src)
            proxy.cut()  # the server keeps ticking (and recording history) meanwhile
            await wait_for(lambda: src.state().state == "disconnected", 5, "loss", src)
            await asyncio.sleep(1.5)
            proxy.restore()
            await wait_for(lambda: src.state().state == "connected", 10, "reconnect", src)
            n = len(await signals(buf, "line1", "Line1.Counter"))
            got = await wait_for(lambda: _enough(buf, "Line1.Counter", n + 5), 10, "more", src)
            st = src.state()
    finally:
        await proxy.close()
    values = [e["data"]["value"] for e in got]
    # no gap, no duplicate, in source-timestamp order: the outage was filled from history
    assert values == list(range(values[0], values[0] + len(values))), values
    times = [_ts(e["data"]["source_timestamp"]) for e in got]
    assert times == sorted(times)
    assert st.detail["backfilled"] >= 10, st.detail
    assert st.detail["reconnects"] == 1


async def test_full_buffer_holds_the_server_back_and_nothing_is_lost(plain, tmp_path):
    nodes = [node(n, queue_size=400) for n in ("Counter", "Temperature", "Quality")]
    cfg = make_config(
        plain.endpoint, nodes, max_pending=100, batch_max=50, liveness_timeout="1500ms"
    )
    async with running_source(cfg, tmp_path, max_bytes=40_000) as (src, buf):
        # the buffer fills, then the source's queue, then the client stops asking for more
        await wait_for(
            lambda: (
                src.state().detail["held_back_by_full_buffer"]
                and src.state().detail["pending"] >= 100
            ),
            20,
            "held back",
            src,
        )
        await asyncio.sleep(2.0)  # the server keeps the values meanwhile
        st = src.state()
        # holding the server back (longer than liveness_timeout) is not a lost connection
        assert st.state == "connected" and st.detail["reconnects"] == 0, st
        assert not buf.has_room()
        # now play the forwarder: acknowledge what is stored and reclaim the space, until the
        # values the server held meanwhile have all come in
        delivered: list[dict] = []

        async def drain() -> bool:
            batch = await buf.take_batch("line1", 0, 100_000, 1 << 40)
            if batch:
                await buf.ack(batch)
                await buf.housekeeping()
                delivered.extend(orjson.loads(body) for body in batch.bodies)
            d = src.state().detail
            return not batch and d["pending"] == 0 and not d["held_back_by_full_buffer"]

        await wait_for(drain, 30, "drained", src)
        await asyncio.sleep(0.5)
        await drain()
        st = src.state()
    assert st.detail["server_queue_overflows"] == 0 and st.detail["lost_in_flight"] == 0
    values = [e["data"]["value"] for e in delivered if e["data"]["node_id"].endswith("Counter")]
    assert len(values) > 60
    assert values == list(range(values[0], values[0] + len(values))), "no value lost or repeated"

"""The MES HTTP push source, served for real in-process, against the real Buffer.

Requests go through httpx over loopback TCP; what got stored is read back from the buffer
file, so "nothing stored" is checked where it matters.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from adapters.sources.mes_http import Config, MesHttpSource
from agent.buffer import Buffer
from agent.vocabulary import validate_data
from tests.fixtures.mes_http import event, open_buffer, serving

STREAM = "mes"


def padded(i: int, pad: int) -> dict[str, Any]:
    """An event whose stored size grows by exactly one byte per ``pad``."""
    ev = event(i)
    ev["data"]["attributes"] = {"pad": "x" * pad}
    return ev


async def stored(buf: Buffer, stream: str = STREAM) -> list[dict[str, Any]]:
    """Every event committed to ``stream``, decoded from the buffer's stored bodies."""
    rows = await buf.read_range(stream, 0, 1 << 62, 1_000_000)
    return [json.loads(body) for _, _, body in rows]


@pytest.fixture
async def buf(tmp_path: Path) -> AsyncIterator[Buffer]:
    b = await open_buffer(tmp_path / "buffer.db")
    yield b
    await b.close()


@pytest.fixture
async def server(buf: Buffer) -> AsyncIterator[tuple[MesHttpSource, httpx.AsyncClient]]:
    async with serving(buf) as (src, url), httpx.AsyncClient(base_url=url) as client:
        yield src, client


async def post(client: httpx.AsyncClient, body: Any, **kw: Any) -> httpx.Response:
    return await client.post("/v1/events", json=body, **kw)


# --------------------------------------------------------------------------- accepted


async def test_single_event_is_committed_before_202(server, buf):
    src, client = server
    r = await post(client, event(1, correlationid="ECO-2231"))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 1 and body["duplicates"] == 0
    [ack] = body["events"]
    assert ack["sequence"] == "00000000000000000001" and ack["source_event_id"] == "MES-1"
    [ev] = await stored(buf)
    assert ev["id"] == ack["id"] and ev["sequence"] == ack["sequence"]
    assert ev["type"] == "mfg.production.completed"
    assert ev["dataschema"] == "urn:edge-agent:schema:mfg.production.completed:1"
    assert ev["subject"] == "WO-4701" and ev["correlationid"] == "ECO-2231"
    assert ev["time"] == "2026-11-23T10:15:02.123Z"
    assert ev["data"]["good"] == {"value": 11.0, "uom": "EA"}
    assert src.state().detail["accepted"] == 1


async def test_batch_is_committed_in_order(server, buf):
    _, client = server
    r = await post(client, [event(i) for i in range(1, 51)])
    assert r.status_code == 202, r.text
    assert [e["sequence"] for e in r.json()["events"]] == [f"{i:020d}" for i in range(1, 51)]
    assert [e["data"]["work_order"] for e in await stored(buf)] == [
        f"WO-{4700 + i}" for i in range(1, 51)
    ]


async def test_cloudevents_content_types_are_accepted(server, buf):
    _, client = server
    for i, ctype in enumerate(
        ["application/cloudevents+json", "application/cloudevents-batch+json; charset=utf-8"]
    ):
        r = await client.post(
            "/v1/events", content=json.dumps(event(i)), headers={"Content-Type": ctype}
        )
        assert r.status_code == 202, r.text
    assert len(await stored(buf)) == 2


async def test_field_mapping_from_config(buf):
    mapping = {
        "fields": {
            "EventType": "type",
            "Timestamp": "time",
            "EventId": "id",
            "Order.Number": "data.work_order",
            "Material": "data.item",
            "Yield": "data.good.value",
            "Unit": "data.good.uom",
        },
        "values": {"type": {"CONFIRMATION": "mfg.production.completed"}},
        "constants": {"data.plant": "berlin"},
        "unmapped": "drop",
    }
    mes = {
        "EventType": "CONFIRMATION",
        "Timestamp": "2026-11-23T11:15:02+01:00",
        "EventId": 881,
        "Order": {"Number": "WO-1"},
        "Material": "PN-9",
        "Yield": "12.5",
        "Unit": "KGM",
        "Operator": "ignored",
    }
    async with serving(buf, mapping=mapping) as (_, url), httpx.AsyncClient(base_url=url) as c:
        assert (await post(c, mes)).status_code == 202
        bad = dict(mes, Unit="kg", EventId=882)
        r = await post(c, bad)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "Unit (data.good.uom)"
    [ev] = await stored(buf)
    assert ev["data"] == {
        "plant": "berlin",
        "work_order": "WO-1",
        "item": "PN-9",
        "good": {"value": 12.5, "uom": "KGM"},
    }
    assert ev["time"] == "2026-11-23T10:15:02.000Z"


async def test_extra_uom_codes_from_config(buf):
    ev = event(1)
    ev["data"]["good"]["uom"] = "ZZ1"
    async with serving(buf) as (_, url), httpx.AsyncClient(base_url=url) as c:
        assert (await post(c, ev)).status_code == 422
    async with (
        serving(buf, extra_uom_codes=["ZZ1"]) as (_, url),
        httpx.AsyncClient(base_url=url) as c,
    ):
        assert (await post(c, ev)).status_code == 202


# --------------------------------------------------------------------------- dedupe


async def test_retry_with_same_mes_id_is_not_stored_twice(server, buf):
    src, client = server
    first = await post(client, [event(1), event(2)])
    again = await post(client, [event(2), event(3)])
    assert first.status_code == again.status_code == 202
    a, b = first.json()["events"], again.json()["events"]
    assert b[0]["duplicate"] is True and b[0]["id"] == a[1]["id"]
    assert b[0]["sequence"] == a[1]["sequence"]
    assert b[1]["duplicate"] is False
    assert again.json()["accepted"] == 1 and again.json()["duplicates"] == 1
    assert [e["data"]["work_order"] for e in await stored(buf)] == ["WO-4701", "WO-4702", "WO-4703"]
    assert src.state().detail["duplicates"] == 1


async def test_same_id_twice_in_one_request(server, buf):
    _, client = server
    r = await post(client, [event(7), event(7)])
    assert r.status_code == 202
    assert [e["duplicate"] for e in r.json()["events"]] == [False, True]
    assert len(await stored(buf)) == 1


# --------------------------------------------------------------------------- rejected


async def test_malformed_json_is_400_and_nothing_stored(server, buf):
    src, client = server
    for raw in [b'{"type": "mfg.production.completed",', b"", b"\xff\xfe", b"NaN", b"42"]:
        r = await client.post(
            "/v1/events", content=raw, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, raw
        assert r.json()["stored"] == 0
    assert await stored(buf) == []
    assert src.state().detail["rejected"]["malformed_json"] == 5


async def test_one_bad_event_rejects_the_whole_batch_naming_each_field(server, buf):
    src, client = server
    bad_uom = event(2)
    del bad_uom["data"]["good"]["uom"]
    bad_type = event(4)
    bad_type["data"]["scrap"] = 3  # a quantity without a unit
    bad_type["time"] = "yesterday"
    r = await post(client, [event(1), bad_uom, event(3), bad_type])
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert {(e["index"], e["field"]) for e in errors} == {
        (1, "data.good.uom"),
        (3, "data.scrap"),
        (3, "time"),
    }
    assert all(e["message"] for e in errors)
    assert r.json()["stored"] == 0
    assert await stored(buf) == []
    assert src.state().detail["rejected"] == {"invalid": 1}
    assert "422" in src.state().last_error


async def test_unknown_type_and_agent_types_are_422(server, buf):
    _, client = server
    spb = {"group_id": "G", "edge_node_id": "E", "state": "offline", "reason": "death"}
    r = await post(
        client,
        [
            event(1, type="mfg.made.up"),
            event(2, type="mfg.agent.gap"),
            # only the sparkplug source sees an edge node die: an MES saying so is refused
            event(3, type="mfg.sparkplug.state_changed", data=spb),
        ],
    )
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(0, "type"), (1, "type"), (2, "type")]
    assert "made by the sparkplug source" in errors[2]["message"]
    assert "mfg.sparkplug.state_changed" not in errors[0]["message"]  # not offered either
    assert await stored(buf) == []


async def test_wrong_content_type_is_415(server, buf):
    _, client = server
    for headers in [{"Content-Type": "text/plain"}, {"Content-Type": "application/json; charset=latin-1"}, {}]:  # fmt: skip
        r = await client.post("/v1/events", content=json.dumps(event()), headers=headers)
        assert r.status_code == 415, headers
    assert await stored(buf) == []


async def test_body_over_the_limit_is_413(buf):
    async with serving(buf, max_body_bytes="4KiB", max_events=3) as (src, url):
        async with httpx.AsyncClient(base_url=url) as client:
            big = [event(i) for i in range(40)]  # ~10 KiB
            r = await post(client, big)
            assert r.status_code == 413
            # chunked upload without Content-Length: cut off while reading
            payload = json.dumps(big).encode()

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(payload), 1000):
                    yield payload[i : i + 1000]

            r = await client.post(
                "/v1/events", content=chunks(), headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 413
            r = await post(client, [event(i) for i in range(4)])  # fits, but too many events
            assert r.status_code == 413
            assert (await post(client, event(1))).status_code == 202  # still serving
    assert len(await stored(buf)) == 1
    assert src.state().detail["rejected"] == {"too_large": 3}


async def test_token_is_required_when_configured(buf):
    async with serving(buf, token="s3cret-token-value") as (src, url):
        async with httpx.AsyncClient(base_url=url) as client:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token-value"}]:  # fmt: skip
                r = await post(client, event(), headers=headers)
                assert r.status_code == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            ok = {"Authorization": "Bearer s3cret-token-value"}
            assert (await post(client, event(), headers=ok)).status_code == 202
    assert len(await stored(buf)) == 1
    assert "s3cret" not in json.dumps(src.state().detail) + str(src.state().last_error)


async def test_token_file_and_tls(buf, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    cfg = {"tls_cert": str(cert_path), "tls_key": str(key_path), "token_file": str(token_file)}
    async with serving(buf, **cfg) as (src, url):
        assert url.startswith("https://")
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        async with httpx.AsyncClient(base_url=url, verify=ctx) as client:
            auth = {"Authorization": "Bearer from-a-file"}
            assert (await post(client, event(), headers=auth)).status_code == 202
        assert src.state().detail["tls"] is True


async def test_buffer_full_is_503_with_retry_after_and_nothing_stored(tmp_path):
    buf = await open_buffer(tmp_path / "small.db", max_bytes=3000)
    try:
        async with serving(buf, retry_after="7s") as (src, url):
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await post(client, [event(1), event(2)])).status_code == 202
                # does not fit: append raises BufferFull for the whole request
                r = await post(client, [event(i) for i in range(10, 30)])
                assert r.status_code == 503
                assert r.headers["Retry-After"] == "7"
                assert r.json()["error"] == "buffer_full" and r.json()["stored"] == 0
                assert len(await stored(buf)) == 2
                assert src.state().detail["rejected"] == {"buffer_full": 1}
    finally:
        await buf.close()


async def test_no_room_is_503_and_every_refused_event_is_counted(tmp_path):
    """With no room the body is still read (bounded) and validated, so the buffer refuses
    it and counts each event: status's refused_total tells the operator how many."""
    buf = await open_buffer(tmp_path / "small.db", max_bytes=3000)
    try:
        async with serving(buf, retry_after=2) as (src, url):
            async with httpx.AsyncClient(base_url=url) as client:
                # fill the buffer exactly, so it reports no room
                before = buf.used_bytes
                assert (await post(client, padded(3, 10))).status_code == 202
                size_at_10 = buf.used_bytes - before
                room = buf.max_bytes - buf.used_bytes
                r = await post(client, padded(4, 10 + room - size_at_10))
                assert r.status_code == 202, r.text
                refused_before = buf.refused_total
                r = await post(client, [event(i) for i in range(40, 45)])
                assert r.status_code == 503 and r.headers["Retry-After"] == "2"
                assert buf.refused_total == refused_before + 5
                assert not buf.has_room()
                # a malformed request is still told what is wrong, and stores nothing
                r = await client.post(
                    "/v1/events", content=b"{not json", headers={"Content-Type": "application/json"}
                )
                assert r.status_code == 400
                assert len(await stored(buf)) == 2
    finally:
        await buf.close()


async def test_wrong_method_and_path(server, buf):
    _, client = server
    assert (await client.get("/v1/events")).status_code == 405
    assert (await client.post("/v2/events", json=event())).status_code == 404
    assert await stored(buf) == []


# --------------------------------------------------------------------------- lifecycle


async def test_port_in_use_is_a_source_error(buf):
    async with serving(buf) as (_, url):
        taken = url.removeprefix("http://")
        src = MesHttpSource("other", Config(type="mes_http", listen=taken))
        from agent.errors import SourceError

        with pytest.raises(SourceError, match="cannot listen on"):
            await src.run(buf)
        assert src.state().state == "error"


async def test_stop_closes_the_socket_and_restart_serves_again(buf):
    async with serving(buf) as (_, url):
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await post(client, event(1))).status_code == 202
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=url) as client:
            await post(client, event(2))
    async with serving(buf) as (_, url2), httpx.AsyncClient(base_url=url2) as client:
        assert (await post(client, event(1))).status_code == 202  # duplicate after restart
        assert (await post(client, event(2))).status_code == 202
    assert len(await stored(buf)) == 2


async def test_concurrent_requests_share_commits(server, buf):
    _, client = server
    rs = await asyncio.gather(
        *(post(client, [event(i * 10 + j) for j in range(10)]) for i in range(20))
    )
    assert all(r.status_code == 202 for r in rs)
    seqs = sorted(int(e["sequence"]) for r in rs for e in r.json()["events"])
    assert seqs == list(range(1, 201))
    assert len(await stored(buf)) == 200


async def test_stored_events_match_the_vocabulary(server, buf):
    _, client = server
    await post(client, [event(i) for i in range(5)])
    for ev in await stored(buf):
        assert validate_data(ev["type"], ev["data"]) == ev["data"]

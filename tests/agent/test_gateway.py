"""The reference gateway, as a real subprocess over TLS/mTLS, driven by real httpx clients.

Most tests share one gateway process (starting one costs most of a second) and keep apart
by posting to a stream of their own: the ``stream`` fixture names it, and ``event()`` uses
it unless told otherwise. Tests that stop the gateway, need other flags, or read global
counters start their own with the ``gateway`` factory.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import trustme
from ulid import ULID

from tests.fixtures.gateway import REPO_ROOT, GatewayProcess

CT = "application/cloudevents-batch+json"
EPOCH = "01JD3V0000000000000000EPCH"
#: The stream event() posts to by default: set per test by the autouse ``stream`` fixture.
_current_stream = ["line1"]
_stream_numbers = itertools.count(1)


def event(
    seq: int,
    *,
    stream: str | None = None,
    epoch: str = EPOCH,
    type: str = "mfg.production.counted",
    data: Any = None,
    id: str | None = None,
    subject: str | None = None,
) -> dict[str, Any]:
    stream = stream or _current_stream[0]
    ev = {
        "specversion": "1.0",
        "id": id or str(ULID()),
        "source": f"edge-agent://plant-test/{stream}",
        "type": type,
        "time": "2026-11-23T10:15:02.123Z",
        "datacontenttype": "application/json",
        "sequence": f"{seq:020d}",
        "streamepoch": epoch,
        "plant": "plant-test",
        "agentid": "agent-01",
        "data": {"good": seq, "uom": "EA"} if data is None else data,
    }
    if subject is not None:
        ev["subject"] = subject
    return ev


def events(first: int, last: int, **kw: Any) -> list[dict[str, Any]]:
    return [event(s, **kw) for s in range(first, last + 1)]


def headers_for(evs: list[dict[str, Any]], key: str | None = None, **override: str) -> dict:
    h = {
        "Content-Type": CT,
        "Idempotency-Key": key or str(ULID()),
        "X-Edge-Stream": evs[0]["source"].rsplit("/", 1)[1],
        "X-Edge-Stream-Epoch": evs[0]["streamepoch"],
        "X-Edge-First-Sequence": evs[0]["sequence"],
        "X-Edge-Last-Sequence": evs[-1]["sequence"],
    }
    h.update(override)
    return h


def post(
    client: httpx.Client,
    gw: GatewayProcess,
    evs: list[dict[str, Any]],
    *,
    key: str | None = None,
    compress: bool = False,
    **override: str,
) -> httpx.Response:
    body = orjson.dumps(evs)
    h = headers_for(evs, key, **override)
    if compress:
        body = gzip.compress(body, 1)
        h["Content-Encoding"] = "gzip"
    return client.post(gw.path, content=body, headers=h)


@pytest.fixture(scope="module")
def shared_gateway(tls_ca, tmp_path_factory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("shared-gateway"), tls_ca, control=True)
    with gw:
        yield gw


_NO_FAULTS = {
    "fail_status": None,
    "fail_count": 0,
    "retry_after": None,
    "latency_ms": 0,
    "poison": [],
    "drop_acks": 0,
}


@pytest.fixture
def gw(shared_gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """The shared gateway, with failure injection reset after the test."""
    if not shared_gateway.running:  # a failed test left it stopped
        shared_gateway.start()
    yield shared_gateway
    if shared_gateway.control() != _NO_FAULTS:
        shared_gateway.control(**_NO_FAULTS)


@pytest.fixture(autouse=True)
def stream(request: pytest.FixtureRequest) -> Iterator[str]:
    """A stream name of this test's own (event() posts to it unless told otherwise)."""
    name = f"t{next(_stream_numbers)}-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:50]
    _current_stream[0] = name
    yield name
    _current_stream[0] = "line1"


@pytest.fixture
def client(gw: GatewayProcess):
    with gw.client(timeout=10) as c:
        yield c


def seqs(evs: list[dict[str, Any]]) -> list[int]:
    return [int(e["sequence"]) for e in evs]


# --------------------------------------------------------------------------- accepting


def test_accepts_a_batch_over_tls_and_stores_it_in_order(gw, client, stream):
    assert gw.url.startswith("https://127.0.0.1:") and gw.url.endswith("/v1/batches")
    sent = events(1, 10)
    r = post(client, gw, sent)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 10, "duplicates": 0}
    assert gw.events(stream) == sent
    s = gw.stream_report(stream)
    assert s["received"] == 10 and s["missing"] == [] and s["complete_up_to"] == 10
    assert s["epoch"] == EPOCH and s["ok"] is True


def test_accepts_gzip(gw, client, stream):
    r = post(client, gw, events(1, 50), compress=True)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 50, "duplicates": 0}
    assert seqs(gw.events(stream)) == list(range(1, 51))


def test_dedupes_on_source_and_id(gw, client, stream):
    sent = events(1, 5)
    assert post(client, gw, sent).json() == {"accepted": 5, "duplicates": 0}
    # The same events under a new batch id (the agent re-formed the batch after a crash).
    assert post(client, gw, sent).json() == {"accepted": 0, "duplicates": 5}
    # Partly new: 4..5 again plus 6..8.
    r = post(client, gw, sent[3:] + events(6, 8))
    assert r.json() == {"accepted": 3, "duplicates": 2}
    assert seqs(gw.events(stream)) == list(range(1, 9))
    s = gw.stream_report(stream)
    assert (s["received"], s["duplicates"], s["id_conflicts"]) == (8, 7, 0)


def test_idempotency_key_replays_the_same_answer_and_stores_nothing_twice(gw, client, stream):
    sent, key = events(1, 4), f"{stream}-batch-1"
    replayed = gw.report()["requests"]["replayed_batches"]
    first = post(client, gw, sent, key=key)
    again = post(client, gw, sent, key=key)
    assert again.status_code == 200
    assert again.content == first.content == b'{"accepted":4,"duplicates":0}'
    assert again.headers.get("Idempotent-Replayed") == "true"
    s = gw.stream_report(stream)
    assert s["received"] == 4 and s["duplicates"] == 0 and s["batches"] == 1
    assert gw.report()["requests"]["replayed_batches"] == replayed + 1
    # A key names one batch forever: reusing it for other sequences is refused.
    other = post(client, gw, events(5, 6), key=key)
    assert other.status_code == 422 and key in other.json()["error"]
    assert len(gw.events(stream)) == 4


# --------------------------------------------------------------------------- sequence checks


def test_detects_missing_then_out_of_order_fill(gw, client, stream):
    a, b, c = events(1, 10), events(11, 20), events(21, 30)
    post(client, gw, a)
    post(client, gw, c)
    s = gw.stream_report(stream)
    assert s["missing"] == [[11, 20]] and s["missing_count"] == 10
    assert s["complete_up_to"] == 10 and s["ok"] is False
    post(client, gw, b)
    s = gw.stream_report(stream)
    assert s["out_of_order"] == 10 and s["missing"] == [] and s["complete_up_to"] == 30
    assert s["ok"] is True
    # Arrival order is kept as it happened, not re-sorted.
    assert seqs(gw.events(stream)) == list(range(1, 11)) + list(range(21, 31)) + list(range(11, 21))


def test_missing_from_the_start_of_an_epoch(gw, client, stream):
    post(client, gw, events(5, 8))
    s = gw.stream_report(stream)
    assert s["missing"] == [[1, 4]] and s["complete_up_to"] == 0 and s["first_sequence"] == 5


def test_same_sequence_with_another_id_is_an_id_conflict(gw, client, stream):
    post(client, gw, events(1, 3))
    r = post(client, gw, [event(2)])
    assert r.json() == {"accepted": 1, "duplicates": 0}
    s = gw.stream_report(stream)
    assert s["id_conflicts"] == 1 and s["ok"] is False


def test_epochs_and_streams_are_counted_apart(gw, client, stream):
    other = stream + "-2"
    post(client, gw, events(1, 5))
    post(client, gw, events(1, 3, epoch="01JD3V0000000000000000NEW0"))
    post(client, gw, events(1, 2, stream=other))
    report = gw.report()
    got = {
        (s["stream"], s["epoch"]): (s["received"], s["complete_up_to"])
        for s in report["streams"]
        if s["stream"] in (stream, other)
    }
    assert got == {
        (stream, EPOCH): (5, 5),
        (stream, "01JD3V0000000000000000NEW0"): (3, 3),
        (other, EPOCH): (2, 2),
    }
    assert seqs(gw.events(other)) == [1, 2]
    assert seqs(gw.events(stream, epoch="01JD3V0000000000000000NEW0")) == [1, 2, 3]


def test_gap_event_explains_the_range_and_checkpoint_proves_completeness(gw, client, stream):
    post(client, gw, events(1, 10))
    gap = event(
        21,
        type="mfg.agent.gap",
        data={
            "stream": "line1",
            "streamepoch": EPOCH,
            "first_sequence": 11,
            "last_sequence": 20,
            "count": 10,
            "reason": "buffer full (drop_oldest)",
        },
    )
    assert post(client, gw, [gap]).status_code == 200
    checkpoint = event(
        22,
        type="mfg.agent.checkpoint",
        data={"streamepoch": EPOCH, "last_sequence": 21, "count": 21},
    )
    assert post(client, gw, [checkpoint]).status_code == 200
    s = gw.stream_report(stream)
    assert s["missing"] == [] and s["ok"] is True
    assert s["explained_count"] == 10
    assert s["explained"][0] | {"id": None} == {
        "first_sequence": 11,
        "last_sequence": 20,
        "count": 10,
        "reason": "buffer full (drop_oldest)",
        "kind": "gap",
        "id": None,
    }
    assert s["complete_up_to"] == 22
    cp = s["last_checkpoint"]
    assert cp["sequence"] == 22 and cp["last_sequence"] == 21 and cp["complete"] is True


def test_checkpoint_beyond_what_arrived_is_not_complete(gw, client, stream):
    post(client, gw, events(1, 5))
    cp = event(9, type="mfg.agent.checkpoint", data={"streamepoch": EPOCH, "last_sequence": 8})
    post(client, gw, [cp])
    s = gw.stream_report(stream)
    assert s["missing"] == [[6, 8]]
    assert s["last_checkpoint"]["complete"] is False


def test_malformed_gap_event_is_refused_naming_the_field(gw, client):
    bad = event(1, type="mfg.agent.gap", data={"first_sequence": 3, "count": 1, "reason": "x"})
    r = post(client, gw, [bad])
    assert r.status_code == 400
    assert r.json()["field"] == "data.last_sequence" and r.json()["index"] == 0


# --------------------------------------------------------------------------- poison


def test_poison_event_refuses_the_whole_batch_then_explains_its_sequence(gateway, stream):
    gw = gateway(poison=["HOLD-13"])
    with gw.client(timeout=10) as client:
        batch = events(1, 5)
        batch[2] = event(3, subject="HOLD-13")
        r = post(client, gw, batch)
        assert r.status_code == 422
        body = r.json()
        assert body["rejected"] == [
            {"index": 2, "id": batch[2]["id"], "reason": "poison subject 'HOLD-13'"}
        ]
        assert gw.events(stream) == []  # nothing of that batch stored
        # What the agent's bisection does next: the rest, in order, around the poison event.
        assert post(client, gw, batch[:2]).status_code == 200
        assert post(client, gw, batch[3:]).status_code == 200
    s = gw.stream_report(stream)
    assert seqs(gw.events(stream)) == [1, 2, 4, 5]
    assert s["missing"] == [] and s["complete_up_to"] == 5
    assert [(e["kind"], e["first_sequence"], e["id"]) for e in s["explained"]] == [
        ("rejected", 3, batch[2]["id"])
    ]
    assert gw.report()["requests"]["rejected_422"] == 1


def test_poison_by_id_set_at_runtime(gw, client):
    batch = events(1, 3)
    gw.control(poison=[batch[1]["id"]])
    r = post(client, gw, batch)
    assert r.status_code == 422 and r.json()["rejected"][0]["index"] == 1
    gw.control(poison=[])
    assert post(client, gw, batch).status_code == 200


# --------------------------------------------------------------------------- failure injection


def test_injected_500_then_recovery(gateway):
    gw = gateway(fail_status=500, fail_count=2)
    with gw.client(timeout=10) as client:
        batch = events(1, 3)
        key = "same-batch"
        statuses = [post(client, gw, batch, key=key).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    report = gw.report()
    assert report["requests"]["injected_failures"] == 2
    assert report["totals"]["received"] == 3


def test_injected_429_with_retry_after_at_runtime(gw, client):
    settings = gw.control(fail_status=429, fail_count=1, retry_after=2)
    assert settings["fail_status"] == 429 and settings["fail_count"] == 1
    r = post(client, gw, events(1, 2))
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert post(client, gw, events(1, 2)).status_code == 200
    assert gw.control()["fail_count"] == 0


def test_fail_forever_until_told_otherwise(gateway):
    gw = gateway(fail_status=503, retry_after=0.5)
    with gw.client(timeout=10) as client:
        for _ in range(3):
            r = post(client, gw, events(1, 1))
            assert r.status_code == 503 and r.headers["Retry-After"] == "0.5"
        gw.control(fail_status=None)
        assert post(client, gw, events(1, 1)).status_code == 200


def test_lost_acknowledgement_is_committed_then_replayed(gateway, stream):
    gw = gateway(drop_acks=1)
    sent = events(1, 3)
    with gw.client(timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            post(client, gw, sent, key=f"{stream}-k")
        # Committed before the connection was cut: the retry gets the recorded answer.
        r = post(client, gw, sent, key=f"{stream}-k")
    assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true"
    assert r.json() == {"accepted": 3, "duplicates": 0}
    assert seqs(gw.events(stream)) == [1, 2, 3]
    assert gw.report()["requests"]["dropped_acks"] == 1


def test_injected_latency(gw, client):
    gw.control(latency_ms=300)
    t0 = time.monotonic()
    assert post(client, gw, events(1, 1)).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    gw.control(latency_ms=0)


def test_control_refuses_unknown_or_bad_keys(gw, client):
    r = client.post("/control", json={"fail_statu": 500})
    assert r.status_code == 400 and "fail_statu" in r.json()["error"]
    r = client.post("/control", json={"fail_status": 500, "fail_count": "lots"})
    assert r.status_code == 400 and "fail_count" in r.json()["error"]
    assert gw.control()["fail_status"] is None  # nothing applied


def test_control_is_off_unless_asked_for(gateway):
    gw = gateway(control=False)
    with gw.client() as client:
        assert client.post("/control", json={"fail_status": 500}).status_code in (404, 405)


# --------------------------------------------------------------------------- refusals


def test_wrong_content_type_is_415(gw, client, stream):
    refused = gw.report()["requests"]["rejected_415"]
    evs = events(1, 1)
    r = client.post(
        gw.path,
        content=orjson.dumps(evs),
        headers=headers_for(evs) | {"Content-Type": "application/json"},
    )
    assert r.status_code == 415 and CT in r.json()["error"]
    r = client.post(
        gw.path,
        content=orjson.dumps(evs),
        headers=headers_for(evs) | {"Content-Encoding": "compress"},
    )
    assert r.status_code == 415
    assert gw.events(stream) == [] and gw.report()["requests"]["rejected_415"] == refused + 2


@pytest.mark.parametrize(
    ("mutate", "index", "field"),
    [
        (lambda evs, h: evs[1].update(specversion="0.3"), 1, "specversion"),
        (lambda evs, h: evs[1].pop("id"), 1, "id"),
        (lambda evs, h: evs[2].pop("source"), 2, "source"),
        (lambda evs, h: evs[0].update(type=""), 0, "type"),
        (lambda evs, h: evs[1].update(time="yesterday"), 1, "time"),
        (lambda evs, h: evs[1].update(time="2026-11-23T10:15:02"), 1, "time"),
        (lambda evs, h: evs[1].update(sequence="2"), 1, "sequence"),
        (lambda evs, h: evs[1].pop("plant"), 1, "plant"),
        (lambda evs, h: evs[1].pop("agentid"), 1, "agentid"),
        (lambda evs, h: evs[1].pop("data"), 1, "data"),
        (lambda evs, h: evs[1].update(data=[1, 2]), 1, "data"),
        (lambda evs, h: evs[1].update(streamepoch="OTHER"), 1, "streamepoch"),
        (lambda evs, h: evs[2].update(source="edge-agent://plant-test/line9"), 2, "source"),
        (lambda evs, h: evs[2].update(sequence=f"{7:020d}"), 2, "sequence"),
        (lambda evs, h: evs[1].update(subject=42), 1, "subject"),
        (lambda evs, h: h.update({"X-Edge-Last-Sequence": "4"}), None, "X-Edge-Last-Sequence"),
        (
            lambda evs, h: h.update({"X-Edge-First-Sequence": "2", "X-Edge-Last-Sequence": "4"}),
            0,
            "sequence",
        ),
        (lambda evs, h: h.update({"X-Edge-Stream-Epoch": "OTHER"}), 0, "streamepoch"),
        (lambda evs, h: h.pop("Idempotency-Key"), None, "Idempotency-Key"),
        (lambda evs, h: h.pop("X-Edge-Stream"), None, "X-Edge-Stream"),
        (lambda evs, h: h.update({"X-Edge-First-Sequence": "one"}), None, "X-Edge-First-Sequence"),
    ],
)
def test_malformed_batch_is_400_naming_index_and_field(gw, client, stream, mutate, index, field):
    evs = events(1, 3)
    h = headers_for(evs)
    mutate(evs, h)
    r = client.post(gw.path, content=orjson.dumps(evs), headers=h)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body.get("index") == index and body.get("field") == field, body
    if index is not None:
        assert f"events[{index}]" in body["error"]
    assert gw.events(stream) == []


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"specversion": "1.0"}', b"[]", b"[1, 2]"],
)
def test_body_that_is_not_an_event_array_is_400(gw, client, body):
    h = headers_for(events(1, 2))
    r = client.post(gw.path, content=body, headers=h)
    assert r.status_code == 400 and r.json()["error"]


def test_corrupt_gzip_is_400(gw, client, stream):
    h = headers_for(events(1, 1)) | {"Content-Encoding": "gzip"}
    r = client.post(gw.path, content=b"\x1f\x8bthis is not gzip", headers=h)
    assert r.status_code == 400
    assert gw.events(stream) == []


def test_a_refused_event_with_a_known_place_is_explained(gw, client, stream):
    """The agent dead-letters an event the gateway refuses (400): its sequence is explained."""
    evs = events(1, 3)
    evs[1]["time"] = "not a time"
    assert post(client, gw, [evs[1]]).status_code == 400
    post(client, gw, [evs[0]])
    post(client, gw, [evs[2]])
    s = gw.stream_report(stream)
    assert s["missing"] == [] and s["explained"][0]["kind"] == "rejected"
    assert "time" in s["explained"][0]["reason"]


# --------------------------------------------------------------------------- auth


def test_mtls_requires_a_client_certificate_from_the_ca(gateway, issue_client_cert, stream):
    gw = gateway(mtls=True)
    evs = events(1, 2)
    with httpx.Client(verify=gw.ssl_context(client_cert=False), timeout=10) as anonymous:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            anonymous.post(gw.url, content=orjson.dumps(evs), headers=headers_for(evs))
    stranger = trustme.CA()
    other = stranger.issue_cert("intruder")
    ctx = gw.ssl_context(client_cert=False)
    other.configure_cert(ctx)
    with httpx.Client(verify=ctx, timeout=10) as intruder:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            intruder.post(gw.url, content=orjson.dumps(evs), headers=headers_for(evs))
    cert = issue_client_cert("line-agent")
    with httpx.Client(verify=gw.ssl_context(client_cert=cert), timeout=10) as agent:
        r = agent.post(gw.url, content=orjson.dumps(evs), headers=headers_for(evs))
    assert r.status_code == 200
    assert seqs(gw.events(stream)) == [1, 2]


def test_server_certificate_is_verified(gw):
    evs = events(1, 1)
    with httpx.Client(verify=ssl.create_default_context(), timeout=10) as client:
        with pytest.raises(httpx.ConnectError):
            client.post(gw.url, content=orjson.dumps(evs), headers=headers_for(evs))


def test_bearer_token_is_required(gateway):
    gw = gateway(token="s3cret-token")
    evs = events(1, 2)
    with httpx.Client(verify=gw.ssl_context(), timeout=10) as client:
        r = client.post(gw.url, content=orjson.dumps(evs), headers=headers_for(evs))
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers
        r = client.post(
            gw.url,
            content=orjson.dumps(evs),
            headers=headers_for(evs) | {"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 401
        assert client.get(gw.base_url + "/report").status_code == 401
        assert client.get(gw.base_url + "/healthz").status_code == 200
        r = client.post(
            gw.url, content=orjson.dumps(evs), headers=headers_for(evs) | gw.auth_headers()
        )
        assert r.status_code == 200
    assert gw.report()["requests"]["unauthorized"] == 3
    assert "s3cret-token" not in gw.log_text()


def test_plain_http_without_a_certificate(gateway):
    gw = gateway(tls=False)
    assert gw.url.startswith("http://")
    with gw.client() as client:
        assert post(client, gw, events(1, 2)).status_code == 200


# --------------------------------------------------------------------------- lifecycle


def test_restart_on_the_same_port_keeps_everything(gateway, stream):
    gw = gateway()
    sent = events(1, 5)
    with gw.client(timeout=10) as client:
        post(client, gw, sent, key="k1")
    port = gw.port
    assert gw.stop(kill=True) == -9
    with gw.client(timeout=2) as client, pytest.raises(httpx.ConnectError):
        post(client, gw, events(6, 6))
    gw.start()
    assert gw.port == port
    with gw.client(timeout=10) as client:
        # Counters, dedupe and idempotency survive the restart.
        assert post(client, gw, sent, key="k1").headers.get("Idempotent-Replayed") == "true"
        assert post(client, gw, sent).json() == {"accepted": 0, "duplicates": 5}
        post(client, gw, events(6, 8))
    s = gw.stream_report(stream)
    assert (s["received"], s["duplicates"], s["complete_up_to"]) == (8, 5, 8)


def test_sigterm_stops_cleanly(gateway):
    gw = gateway()
    assert gw.stop() == 0
    assert "gateway stopping" in gw.log_text()


def test_http_report_and_events_endpoints(gw, client, stream):
    other = stream + "-2"
    sent = events(1, 3) + events(1, 2, stream=other)
    post(client, gw, sent[:3])
    post(client, gw, sent[3:])
    assert client.get("/healthz").text == "ok"
    report = client.get("/report").json()
    assert report == gw.report() | {"generated_at": report["generated_at"]}
    assert {s["stream"]: s["received"] for s in report["streams"]}[other] == 2
    assert client.get("/events", params={"stream": other}).json() == sent[3:]
    assert client.get("/events", params={"stream": stream}).json() == sent[:3]


async def test_many_batches_from_concurrent_async_clients(gw, stream):
    """Two streams posted concurrently, 1000-event batches, gzip: all stored, in order."""
    n_batches, size = 10, 1000

    async def drain(stream: str) -> None:
        async with gw.async_client(timeout=30) as client:
            for b in range(n_batches):
                evs = events(b * size + 1, (b + 1) * size, stream=stream)
                body = gzip.compress(orjson.dumps(evs), 1)
                h = headers_for(evs) | {"Content-Encoding": "gzip"}
                r = await client.post(gw.path, content=body, headers=h)
                assert r.status_code == 200, r.text

    t0 = time.monotonic()
    a, b = stream + "-a", stream + "-b"
    await asyncio.gather(drain(a), drain(b))
    elapsed = time.monotonic() - t0
    await gw.await_received(n_batches * size, stream=a, timeout=10)
    await gw.await_received(n_batches * size, stream=b, timeout=10)
    for name in (a, b):
        s = gw.stream_report(name)
        assert s["received"] == n_batches * size and s["ok"] and s["out_of_order"] == 0
    assert seqs(gw.events(a)) == list(range(1, n_batches * size + 1))
    print(f"gateway stored {20_000 / elapsed:.0f} events/s")


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )


def test_report_cli_offline(gateway, stream):
    gw = gateway()
    with gw.client(timeout=10) as client:
        post(client, gw, events(1, 4))
        post(client, gw, events(8, 9))
    gw.stop()
    out = _cli("report", "--db", str(gw.db_path))
    assert out.returncode == 0, out.stderr
    assert f"stream {stream}" in out.stdout and "received 6" in out.stdout
    assert "missing 3: 5-7" in out.stdout
    js = _cli("report", "--db", str(gw.db_path), "--json")
    data = orjson.loads(js.stdout)
    assert data["totals"]["received"] == 6 and data["streams"][0]["missing"] == [[5, 7]]
    assert _cli("report", "--db", str(gw.db_path), "--check").returncode == 1


def test_report_cli_on_a_missing_file_is_one_line(tmp_path):
    out = _cli("report", "--db", str(tmp_path / "nope.sqlite3"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "nope.sqlite3" in out.stderr


def test_edge_agent_gateway_is_the_same_program(gateway, stream, tmp_path):
    """`edge-agent gateway` (found by entry point) and `python -m gateway` are one command."""
    gw = gateway()
    with gw.client(timeout=10) as client:
        post(client, gw, events(1, 3))
    gw.stop()
    via_agent = subprocess.run(
        [sys.executable, "-m", "agent", "gateway", "report", "--db", str(gw.db_path), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert via_agent.returncode == 0, via_agent.stderr
    direct = _cli("report", "--db", str(gw.db_path), "--json")
    assert direct.returncode == 0, direct.stderr
    assert orjson.loads(via_agent.stdout)["totals"] == orjson.loads(direct.stdout)["totals"]
    assert orjson.loads(direct.stdout)["totals"]["received"] == 3


def test_serve_cli_errors_are_one_line(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    out = _cli("--cert", str(cert), "--db", str(tmp_path / "g.db"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--key" in out.stderr
    out = _cli("--listen", "nowhere", "--db", str(tmp_path / "g.db"))
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    out = _cli("--listen", "127.0.0.1:0", "--db", str(bad))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bad.sqlite3" in out.stderr


def test_port_in_use_is_a_clear_error(gw, tmp_path):
    out = _cli("--listen", f"127.0.0.1:{gw.port}", "--db", str(tmp_path / "g.db"))
    assert out.returncode == 1 and "cannot listen" in out.stderr


def test_body_over_max_body_is_413(gateway, stream):
    gw = gateway(extra_args=["--max-body", "4096"])
    with gw.client(timeout=10) as client:
        assert post(client, gw, events(1, 2)).status_code == 200
        assert post(client, gw, events(3, 40)).status_code == 413
    assert seqs(gw.events(stream)) == [1, 2]


async def test_in_process_server_serves_and_stops(tmp_path, stream):
    """GatewayServer, for embedding (benchmarks, demo): same routes, clean stop, data kept."""
    from gateway.server import GatewayServer, GatewaySettings

    settings = GatewaySettings(port=0, db=tmp_path / "gw.sqlite3")
    async with GatewayServer(settings) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/v1/batches"
        evs = events(1, 3)
        async with httpx.AsyncClient() as client:
            r = await client.post(server.url, content=orjson.dumps(evs), headers=headers_for(evs))
        assert r.json() == {"accepted": 3, "duplicates": 0}
        server.faults.update({"fail_status": 503, "fail_count": 1})
        async with httpx.AsyncClient() as client:
            r = await client.post(server.url, content=orjson.dumps(evs), headers=headers_for(evs))
        assert r.status_code == 503
    from gateway import read_events

    assert read_events(settings.db, stream) == evs

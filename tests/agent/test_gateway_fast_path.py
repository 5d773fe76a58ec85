"""The reference gateway's fast paths agree with its careful ones.

``_plainly_valid`` (column-wise checks of a whole batch) may only accept what the
event-by-event pass accepts, with the same result; everything doubtful goes to that pass,
which names the culprit. Bodies are decoded once, bounded, and gzip bodies are kept as
received and read back as JSON.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import validate
from gateway.encoding import BodyTooLarge, BodyUndecodable, decode_body, kept_body, stored_json
from gateway.store import GatewayStore, read_events
from gateway.validate import BatchError, parse_batch

EPOCH = "01JD3V0000000000000000EPCH"


def events(first: int, n: int) -> list[dict[str, Any]]:
    return [
        {
            "specversion": "1.0",
            "id": f"01JD3V{seq:020d}",
            "source": "edge-agent://p/line1",
            "type": "mfg.production.counted",
            "dataschema": "urn:edge-agent:schema:mfg.production.counted:1",
            "datacontenttype": "application/json",
            "time": f"2026-11-23T10:15:{seq % 60:02d}.123Z",
            "sequence": f"{seq:020d}",
            "streamepoch": EPOCH,
            "plant": "p",
            "agentid": "a",
            "subject": "WO-4711",
            "data": {"good": seq},
        }
        for seq in range(first, first + n)
    ]


def headers(evs: list[dict[str, Any]], first: int | None = None) -> dict[str, str]:
    first = int(evs[0]["sequence"]) if first is None else first
    return {
        "Idempotency-Key": f"k{first}",
        "X-Edge-Stream": "line1",
        "X-Edge-Stream-Epoch": EPOCH,
        "X-Edge-First-Sequence": str(first),
        "X-Edge-Last-Sequence": str(first + len(evs) - 1),
    }


def slow(monkeypatch: pytest.MonkeyPatch, h: dict[str, str], body: bytes) -> Any:
    with monkeypatch.context() as m:
        m.setattr(validate, "_plainly_valid", lambda *a: None)
        return parse_batch(h, body)


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BatchError as exc:
        return exc.body()


def test_a_valid_batch_takes_the_fast_path_with_the_same_result(monkeypatch):
    evs = events(7, 50)
    evs[3]["type"] = "mfg.agent.gap"
    evs[3]["data"] = {"first_sequence": 1, "last_sequence": 6, "count": 6, "reason": "dropped"}
    evs[9]["type"] = "mfg.agent.checkpoint"
    evs[9]["data"] = {"last_sequence": 15, "count": 15}
    del evs[4]["subject"]
    evs[5]["correlationid"] = None
    body = orjson.dumps(evs)
    assert validate._plainly_valid(orjson.loads(body), EPOCH, 7) is not None
    fast, careful = parse_batch(headers(evs), body), slow(monkeypatch, headers(evs), body)
    assert fast.source == careful.source and (fast.first, fast.last) == (
        careful.first,
        careful.last,
    )
    assert list(fast.ids) == list(careful.ids) == [ev["id"] for ev in evs]
    assert list(fast.types) == list(careful.types) == [ev["type"] for ev in evs]
    assert fast.gaps == careful.gaps and fast.checkpoints == careful.checkpoints
    assert len(fast.gaps) == 1 and len(fast.checkpoints) == 1


def _set(i: int, name: str, value: Any) -> Callable[[list[dict[str, Any]]], None]:
    return lambda evs: evs[i].__setitem__(name, value)


def _drop(i: int, name: str) -> Callable[[list[dict[str, Any]]], None]:
    return lambda evs: evs[i].pop(name)


MUTATIONS: dict[str, Callable[[list[dict[str, Any]]], None]] = {
    "specversion": _set(1, "specversion", "0.3"),
    "specversion float": _set(1, "specversion", 1.0),
    "no id": _drop(2, "id"),
    "empty id": _set(2, "id", ""),
    "id not a string": _set(2, "id", 5),
    "no source": _drop(0, "source"),
    "other source": _set(3, "source", "edge-agent://p/line2"),
    "empty type": _set(0, "type", ""),
    "type a list": _set(0, "type", ["x"]),
    "bad time": _set(1, "time", "yesterday"),
    "time without zone": _set(1, "time", "2026-11-23T10:15:02"),
    "time a number": _set(1, "time", 5),
    "short sequence": _set(1, "sequence", "2"),
    "21-digit sequence": _set(1, "sequence", "0" * 21),
    "sequence not a string": _set(1, "sequence", 2),
    "sequence out of order": _set(1, "sequence", f"{9:020d}"),
    "sequence with unicode digits": _set(1, "sequence", "٠" * 19 + "2"),
    "sequence with a sign": _set(1, "sequence", "+" + "0" * 18 + "2"),
    "no plant": _drop(1, "plant"),
    "empty plant": _set(1, "plant", ""),
    "other plant": _set(1, "plant", "q"),
    "agentid a dict": _set(1, "agentid", {"a": 1}),
    "other epoch": _set(2, "streamepoch", "01OTHER"),
    "no data": _drop(2, "data"),
    "data a list": _set(2, "data", [1]),
    "data null": _set(2, "data", None),
    "subject a number": _set(2, "subject", 5),
    "dataschema a list": _set(2, "dataschema", []),
    "not an object": lambda evs: evs.__setitem__(1, [1, 2]),
    "a string": lambda evs: evs.__setitem__(1, "event"),
    "bad gap": lambda evs: evs[1].update(type="mfg.agent.gap", data={"reason": "x"}),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_the_fast_path_answers_as_the_careful_one(monkeypatch, name):
    evs = events(1, 5)
    MUTATIONS[name](evs)
    body, h = orjson.dumps(evs), headers(events(1, 5))
    fast = outcome(lambda: parse_batch(h, body))
    careful = outcome(lambda: slow(monkeypatch, h, body))
    if isinstance(careful, dict):
        assert fast == careful  # the same 400 body: error, index, field
    else:
        assert isinstance(fast, validate.ParsedBatch)
        got = (list(fast.ids), list(fast.types), fast.source)
        assert got == (list(careful.ids), list(careful.types), careful.source)
    if name != "bad gap":  # every envelope doubt goes to the careful pass
        assert validate._plainly_valid(orjson.loads(body), EPOCH, 1) is None


def test_sequence_zero_and_a_header_that_disagrees_are_not_fast():
    evs = events(1, 3)
    assert validate._plainly_valid(evs, EPOCH, 2) is None
    zero = events(0, 3)
    assert validate._plainly_valid(zero, EPOCH, 0) is None
    with pytest.raises(BatchError, match="sequences start at 1"):
        parse_batch(headers(zero, 0), orjson.dumps(zero))


def test_decode_body_undoes_each_encoding_within_the_limit():
    raw = orjson.dumps(events(1, 20))
    assert decode_body(gzip.compress(raw, 1), "gzip", 1 << 20) == raw
    assert decode_body(gzip.compress(raw, 1), "x-gzip", 1 << 20) == raw
    assert decode_body(zlib.compress(raw), "deflate", 1 << 20) == raw
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert decode_body(raw_deflate.compress(raw) + raw_deflate.flush(), "deflate", 1 << 20) == raw
    assert decode_body(raw, "", 1 << 20) == raw and decode_body(b"", "gzip", 10) == b""
    with pytest.raises(BodyTooLarge):
        decode_body(gzip.compress(raw), "gzip", len(raw) - 1)
    assert decode_body(gzip.compress(raw), "gzip", len(raw)) == raw
    with pytest.raises(BodyTooLarge):
        decode_body(raw, "identity", 10)
    with pytest.raises(BodyUndecodable):
        decode_body(b"\x1f\x8bthis is not gzip", "gzip", 1 << 20)
    with pytest.raises(BodyUndecodable):
        decode_body(gzip.compress(raw)[:-20], "gzip", 1 << 20)


def test_a_gzip_body_is_kept_as_received_and_read_back(tmp_path: Path):
    evs = events(1, 10)
    raw = orjson.dumps(evs)
    wire = gzip.compress(raw, 1)
    assert kept_body(wire, "gzip", raw) == wire and kept_body(raw, "", raw) == raw
    assert stored_json(wire) == raw and stored_json(raw) == raw
    store = GatewayStore.open(tmp_path / "gw.sqlite3")
    try:
        batch = parse_batch(headers(evs), raw)
        batch.body = kept_body(wire, "gzip", raw)
        accepted, dups, _ = store.store_batch(batch, lambda a, d: b"{}")
        more = events(11, 5)
        store.store_batch(parse_batch(headers(more), orjson.dumps(more)), lambda a, d: b"{}")
    finally:
        store.close()
    assert (accepted, dups) == (10, 0)
    assert read_events(tmp_path / "gw.sqlite3", "line1") == evs + more


def test_with_fsync_a_sigkill_loses_no_acknowledged_batch(tmp_path: Path):
    """Every 200 of a ``--fsync`` gateway is still there after SIGKILL, bodies as gzip,
    and a resend under the same key gets the same answer, marked replayed."""
    import httpx

    from tests.fixtures.gateway import GatewayProcess

    gw = GatewayProcess(tmp_path, tls=False, control=False, extra_args=["--fsync"]).start()
    acked: list[dict[str, Any]] = []
    sent: list[tuple[dict[str, str], bytes]] = []
    try:
        with httpx.Client(base_url=gw.base_url, timeout=10) as client:
            for first in range(1, 2001, 250):
                evs = events(first, 250)
                h = headers(evs) | {
                    "Content-Type": validate.BATCH_CONTENT_TYPE,
                    "Content-Encoding": "gzip",
                }
                body = gzip.compress(orjson.dumps(evs), 1)
                r = client.post(gw.path, content=body, headers=h)
                assert r.status_code == 200 and r.json() == {"accepted": 250, "duplicates": 0}
                acked += evs
                sent.append((h, body))
    finally:
        gw.stop(kill=True)
    assert gw.events("line1") == acked
    gw.start()
    try:
        with httpx.Client(base_url=gw.base_url, timeout=10) as client:
            h, body = sent[-1]
            r = client.post(gw.path, content=body, headers=h)
        assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true"
        assert r.json() == {"accepted": 250, "duplicates": 0}
        report = gw.stream_report("line1")
        assert report is not None and report["received"] == 2000 and report["ok"]
    finally:
        gw.stop()


@pytest.mark.parametrize("mixed_types", [False, True])
def test_ids_that_differ_after_a_nul_stay_two_events(tmp_path: Path, mixed_types):
    evs = events(1, 3)
    evs[0]["id"], evs[1]["id"] = "01JD3V\x00a", "01JD3V\x00b"
    if mixed_types:
        evs[2]["type"] = "mfg.machine.state"
    store = GatewayStore.open(tmp_path / "gw.sqlite3")
    try:
        batch = parse_batch(headers(evs), orjson.dumps(evs))
        assert store.store_batch(batch, lambda a, d: b"{}")[:2] == (3, 0)
        again = parse_batch(headers(evs) | {"Idempotency-Key": "other"}, orjson.dumps(evs))
        assert store.store_batch(again, lambda a, d: b"{}")[:2] == (0, 3)
    finally:
        store.close()
    assert [ev["id"] for ev in read_events(tmp_path / "gw.sqlite3")] == [ev["id"] for ev in evs]

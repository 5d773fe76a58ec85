"""Sparkplug B decoding and the host's bookkeeping, without a broker: every datatype,
arrays, DataSet, Template flattening, refusals with counted reasons, seq and bdSeq rules.

Payloads are built with the protobuf classes of the .proto we wrote from the specification;
the interop tests (tests/interop/test_sparkplug_*.py) feed payloads encoded by peers.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from adapters.sources.sparkplug import Config
from adapters.sources.sparkplug import payload as sp
from adapters.sources.sparkplug.tracker import Tracker
from agent.vocabulary import validate_data

T0 = 1_764_590_400_000  # 2025-12-01T12:00:00Z
DT = sp.DATATYPE_CODES


def payload(seq: int | None, *metrics: dict[str, Any], ts: int = T0) -> bytes:
    msg = sp.Payload()
    msg.timestamp = ts
    if seq is not None:
        msg.seq = seq
    for spec in metrics:
        m = msg.metrics.add()
        for key, value in spec.items():
            if key == "properties":
                for k, v in value.items():
                    m.properties.keys.append(k)
                    pv = m.properties.values.add()
                    if isinstance(v, str):
                        pv.type, pv.string_value = DT["String"], v
                    else:
                        pv.type, pv.int_value = DT["Int32"], v
            elif key == "dataset_value":
                m.dataset_value.CopyFrom(value)
            elif key == "template_value":
                m.template_value.CopyFrom(value)
            else:
                setattr(m, key, value)
    return bytes(msg.SerializeToString())


def birth(tracker: Tracker, *metrics: dict[str, Any], bd: int = 0, seq: int = 0) -> Any:
    return tracker.handle(
        "spBv1.0/G/NBIRTH/E",
        payload(seq, {"name": "bdSeq", "datatype": DT["UInt64"], "long_value": bd}, *metrics),
        T0,
    )


def values(out: Any) -> dict[str, Any]:
    return {
        e.data["sparkplug"]["metric"]: e.data["value"]
        for e in out.events
        if e.type == "mfg.signal.sampled"
    }


SCALARS = [
    ("Int8", "int_value", 0xFFFFFFFF, -1),  # sign-extended into uint32, as 3.0 encodes it
    ("Int8", "int_value", 0xFF, -1),  # or only its 8 bits
    ("Int16", "int_value", 0xFFFF8000, -32768),
    ("Int32", "int_value", 0x80000000, -(2**31)),
    ("Int64", "long_value", 2**64 - 5, -5),
    ("UInt8", "int_value", 255, 255),
    ("UInt16", "int_value", 65535, 65535),
    ("UInt32", "int_value", 2**32 - 1, 2**32 - 1),
    ("UInt64", "long_value", 2**64 - 1, 2**64 - 1),
    ("Float", "float_value", 1.1, 1.1),
    ("Double", "double_value", 2.5e-300, 2.5e-300),
    ("Boolean", "boolean_value", True, True),
    ("String", "string_value", "héllo", "héllo"),
    ("Text", "string_value", "long text", "long text"),
    (
        "UUID",
        "string_value",
        "8d0f8b3a-0000-4000-8000-000000000001",
        "8d0f8b3a-0000-4000-8000-000000000001",
    ),
    ("DateTime", "long_value", T0 + 5, "2025-12-01T12:00:00.005000Z"),
    ("Bytes", "bytes_value", b"\x00\x01\xff", "AAH/"),
    ("File", "bytes_value", b"%PDF", "JVBERg=="),
]


@pytest.mark.parametrize(("datatype", "field", "raw", "expected"), SCALARS)
def test_every_scalar_datatype(datatype: str, field: str, raw: Any, expected: Any) -> None:
    tracker = Tracker()
    out = birth(tracker, {"name": "m", "alias": 7, "datatype": DT[datatype], field: raw})
    assert values(out) == {"m": expected}
    out = tracker.handle("spBv1.0/G/NDATA/E", payload(1, {"alias": 7, field: raw}), T0)
    (event,) = out.events
    assert event.data["value"] == expected and event.data["data_type"] == datatype
    assert validate_data(event.type, event.data) == event.data


@pytest.mark.parametrize(("datatype", "field", "raw", "expected"), SCALARS)
@pytest.mark.parametrize("historical", [False, True])
def test_data_fast_path_makes_the_same_event_as_the_birth(
    datatype: str, field: str, raw: Any, expected: Any, historical: bool
) -> None:
    """NDATA's metrics take a fast path in the tracker (tracker._data), births the general
    one (_sample): for the same metric, value and time both give the same event, unit and
    historical flag included, but for the message type and seq in the origin."""
    tracker = Tracker()
    spec = {"alias": 7, field: raw, "timestamp": T0 - 5}
    if historical:
        spec["is_historical"] = True
    props = {"properties": {"engUnit": "degC"}}
    out = birth(tracker, {"name": "m", "datatype": DT[datatype], **spec, **props}, bd=3)
    (born,) = [e for e in out.events if e.type == "mfg.signal.sampled"]
    out = tracker.handle("spBv1.0/G/NDATA/E", payload(1, spec), T0)
    (event,) = out.events
    want = dict(born.data)
    want["sparkplug"] = {**born.data["sparkplug"], "seq": 1, "message": "NDATA"}
    assert (event.data, event.time, event.subject) == (want, born.time, born.subject)
    assert list(event.data) == list(want) and list(event.data["sparkplug"]) == list(
        want["sparkplug"]
    )  # the same keys in the same order: the same stored JSON
    assert event.data["uom"] == "CEL" and event.data["value"] == expected
    # no metric timestamp: the payload's, as the general path does
    del spec["timestamp"]
    out = tracker.handle("spBv1.0/G/NDATA/E", payload(2, spec, ts=T0 + 7), T0)
    (event,) = out.events
    assert event.time == "2025-12-01T12:00:00.007000Z" == event.data["source_timestamp"]


ARRAYS = [
    ("Int8Array", struct.pack("<3b", -1, 0, 127), [-1, 0, 127]),
    ("Int16Array", struct.pack("<2h", -300, 300), [-300, 300]),
    ("Int32Array", struct.pack("<2i", -(2**31), 5), [-(2**31), 5]),
    ("Int64Array", struct.pack("<q", -(2**40)), [-(2**40)]),
    ("UInt8Array", bytes([0, 255]), [0, 255]),
    ("UInt16Array", struct.pack("<H", 65535), [65535]),
    ("UInt32Array", struct.pack("<I", 2**32 - 1), [2**32 - 1]),
    ("UInt64Array", struct.pack("<Q", 2**64 - 1), [2**64 - 1]),
    ("FloatArray", struct.pack("<2f", 1.5, 0.1), [1.5, 0.1]),
    ("DoubleArray", struct.pack("<d", 0.1), [0.1]),
    (
        "BooleanArray",
        struct.pack("<I", 10) + bytes([0b10100000, 0b01000000]),
        [True, False, True] + [False] * 6 + [True],
    ),
    ("StringArray", b"ab\x00\x00c\x00", ["ab", "", "c"]),
    ("DateTimeArray", struct.pack("<q", T0), ["2025-12-01T12:00:00.000000Z"]),
]


@pytest.mark.parametrize(("datatype", "raw", "expected"), ARRAYS)
def test_array_datatypes(datatype: str, raw: bytes, expected: list[Any]) -> None:
    out = birth(Tracker(), {"name": "a", "datatype": DT[datatype], "bytes_value": raw})
    assert values(out) == {"a": expected}


def test_bad_array_is_refused_with_a_counted_reason() -> None:
    tracker = Tracker()
    out = birth(
        tracker, {"name": "a", "datatype": DT["Int32Array"], "bytes_value": b"\x01\x02\x03"}
    )
    assert values(out) == {}
    assert out.refused[0][0] == "bad_array" and tracker.refused["bad_array"] == 1


def test_dataset_becomes_one_table_value() -> None:
    ds = sp.Payload.DataSet()
    ds.num_of_columns = 2
    ds.columns.extend(["lot", "qty"])
    ds.types.extend([DT["String"], DT["Int32"]])
    for lot, qty in (("L1", 5), ("L2", 0xFFFFFFFF)):
        row = ds.rows.add()
        row.elements.add().string_value = lot
        row.elements.add().int_value = qty
    out = birth(Tracker(), {"name": "Lots", "datatype": DT["DataSet"], "dataset_value": ds})
    assert values(out) == {
        "Lots": {
            "columns": ["lot", "qty"],
            "types": ["String", "Int32"],
            "rows": [["L1", 5], ["L2", -1]],
        }
    }


def test_template_instance_is_flattened_to_member_paths() -> None:
    tpl = sp.Payload.Template()
    tpl.template_ref = "Motor"
    m = tpl.metrics.add()
    m.name, m.datatype, m.double_value = "Speed", DT["Double"], 1450.0
    inner = tpl.metrics.add()
    inner.name, inner.datatype = "Bearing", DT["Template"]
    t2 = inner.template_value.metrics.add()
    t2.name, t2.datatype, t2.float_value = "Temp", DT["Float"], 61.5
    out = birth(Tracker(), {"name": "Motor1", "datatype": DT["Template"], "template_value": tpl})
    assert values(out) == {"Motor1/Speed": 1450.0, "Motor1/Bearing/Temp": 61.5}
    subjects = [e.subject for e in out.events if e.type == "mfg.signal.sampled"]
    assert subjects == ["G/E/Motor1/Speed", "G/E/Motor1/Bearing/Temp"]


def test_template_definition_is_not_emitted_and_property_set_value_refused() -> None:
    tpl = sp.Payload.Template()
    tpl.is_definition = True
    out = birth(
        Tracker(),
        {"name": "_types_/Motor", "datatype": DT["Template"], "template_value": tpl},
        {"name": "PS", "datatype": DT["PropertySet"], "int_value": 1},
    )
    assert values(out) == {}
    assert [r for r, _ in out.refused] == ["unsupported_datatype"]


def test_quality_property_historical_and_null() -> None:
    tracker = Tracker()
    out = birth(
        tracker,
        {"name": "a", "alias": 1, "datatype": DT["Double"], "double_value": 1.0},
        {
            "name": "b",
            "alias": 2,
            "datatype": DT["Double"],
            "is_null": True,
            "properties": {"Quality": 0},
        },
    )
    b = [e for e in out.events if e.subject == "G/E/b"][0]
    assert b.data["value"] is None and b.data["quality"] == "bad"
    assert b.data["status_code"] == {"code": 0x80000000, "name": "Bad"}
    out = tracker.handle(
        "spBv1.0/G/NDATA/E",
        payload(
            1,
            {
                "alias": 1,
                "double_value": 2.0,
                "is_historical": True,
                "timestamp": T0 - 60_000,
                "properties": {"Quality": 500},
            },
        ),
        T0,
    )
    (e,) = out.events
    assert e.data["historical"] is True and e.data["quality"] == "uncertain"
    assert e.time == "2025-12-01T11:59:00.000000Z"
    assert validate_data(e.type, e.data) == e.data


def test_seq_gap_and_wrap() -> None:
    tracker = Tracker(rebirth_interval_ms=1000)
    birth(tracker, {"name": "a", "alias": 1, "datatype": DT["Int32"], "int_value": 0}, seq=254)
    assert (
        tracker.handle("spBv1.0/G/NDATA/E", payload(255, {"alias": 1, "int_value": 1}), T0).rebirth
        is None
    )
    assert (
        tracker.handle("spBv1.0/G/NDATA/E", payload(0, {"alias": 1, "int_value": 2}), T0).rebirth
        is None
    )
    out = tracker.handle("spBv1.0/G/NDATA/E", payload(2, {"alias": 1, "int_value": 3}), T0)
    assert out.rebirth == ("G", "E") and out.fault and "expected 1, got 2" in out.fault
    assert values(out) == {"a": 3}  # what came is committed; what was lost is not guessed
    # owed: asked again only after rebirth_interval
    assert (
        tracker.handle(
            "spBv1.0/G/NDATA/E", payload(4, {"alias": 1, "int_value": 4}), T0 + 10
        ).rebirth
        is None
    )
    assert tracker.handle(
        "spBv1.0/G/NDATA/E", payload(6, {"alias": 1, "int_value": 5}), T0 + 1500
    ).rebirth == ("G", "E")
    assert tracker.seq_gaps == 3 and tracker.rebirths_requested == 2
    assert tracker.nodes[("G", "E")].seq_health.startswith("rebirth requested")
    birth(tracker, {"name": "a", "alias": 1, "datatype": DT["Int32"], "int_value": 0}, seq=0)
    assert tracker.nodes[("G", "E")].seq_health == "ok"


def test_unknown_alias_is_refused_and_asks_for_rebirth() -> None:
    tracker = Tracker()
    birth(tracker, {"name": "a", "alias": 1, "datatype": DT["Int32"], "int_value": 0})
    out = tracker.handle("spBv1.0/G/NDATA/E", payload(1, {"alias": 99, "int_value": 1}), T0)
    assert out.events == [] and out.rebirth == ("G", "E")
    assert tracker.refused["unknown_metric"] == 1


def test_ndeath_counts_only_with_the_births_bdseq() -> None:
    tracker = Tracker()
    birth(tracker, {"name": "a", "alias": 1, "datatype": DT["Int32"], "int_value": 0}, bd=4)
    tracker.handle(
        "spBv1.0/G/DBIRTH/E/D",
        payload(1, {"name": "x", "alias": 2, "datatype": DT["Boolean"], "boolean_value": True}),
        T0,
    )
    stale = tracker.handle(
        "spBv1.0/G/NDEATH/E",
        payload(None, {"name": "bdSeq", "datatype": DT["UInt64"], "long_value": 3}),
        T0,
    )
    assert stale.events == [] and tracker.stale_deaths == 1 and tracker.nodes[("G", "E")].online
    out = tracker.handle(
        "spBv1.0/G/NDEATH/E",
        payload(None, {"name": "bdSeq", "datatype": DT["UInt64"], "long_value": 4}),
        T0,
    )
    assert [(e.subject, e.data["state"], e.data["reason"]) for e in out.events] == [
        ("G/E", "offline", "death"),
        ("G/E/D", "offline", "node_death"),
    ]
    for e in out.events:
        assert validate_data(e.type, e.data) == e.data


def test_garbage_and_foreign_topics_are_refused_not_fatal() -> None:
    tracker = Tracker()
    assert tracker.handle("spBv1.0/G/NDATA/E", b"\xff\xff\xff", T0).refused[0][0] == "not_protobuf"
    assert tracker.handle("spBv1.0/G/BOGUS/E", b"", T0).refused[0][0] == "bad_topic"
    assert tracker.handle("spBv1.0/G/NCMD/E", sp.rebirth_request(T0), T0).refused == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"groups": ["a/b"], "host_id": "h"}, "group id"),
        ({"groups": [], "host_id": "h"}, "at least 1"),
        ({"groups": ["G"], "host_id": "h/1"}, "host id"),
        ({"groups": ["G", "G"], "host_id": "h"}, "twice"),
    ],
)
def test_config_errors(body: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Config.model_validate({"type": "sparkplug", **body})


def test_generated_protobuf_module_matches_the_proto() -> None:
    """sparkplug_b_pb2.py is protoc's output for sparkplug_b.proto: the descriptor it
    carries names every field of the .proto (a stale module would miss an edit)."""
    import re
    from pathlib import Path

    proto = (Path(sp.__file__).parent / "sparkplug_b.proto").read_text()
    declared = set(re.findall(r"^\s*(?:optional|repeated)?\s*\w+\s+(\w+)\s*=\s*\d+;", proto, re.M))
    known: set[str] = set()

    def walk(desc: Any) -> None:
        known.update(f.name for f in desc.fields)
        for nested in desc.nested_types:
            walk(nested)

    walk(sp.Payload.DESCRIPTOR)
    known.update(v.name for v in sp.pb.DataType.DESCRIPTOR.values)
    assert declared <= known, declared - known


def test_sample_toml_validates() -> None:
    import tomllib
    from pathlib import Path

    sample = Path(sp.__file__).parent / "sample.toml"
    body = tomllib.loads(sample.read_text())["sources"]["line1_spb"]
    cfg = Config.model_validate(body)
    assert cfg.host_id == "edge-agent-plant1" and cfg.tls


async def test_a_big_group_is_decoded_in_slices_with_the_loop_getting_turns(tmp_path) -> None:
    """The source decodes group N+1 while group N commits. The commit is a task created
    just before the decode, and a task only starts at a turn of the loop: decoding a
    1,000-message group without one kept the commit from starting until the decode was
    over. Here: a task made before decoding 250 messages runs before the decode ends, and
    the events are those _decode gives in one piece."""
    import asyncio
    import time

    from adapters.sources.sparkplug import build
    from adapters.sources.sparkplug.source import DECODE_SLICE, _Message
    from agent.registry import AdapterContext

    def source() -> Any:
        cfg = Config.model_validate(
            {"type": "sparkplug", "url": "mqtt://127.0.0.1:1", "groups": ["G"], "host_id": "h"}
        )
        return build("spb", cfg, AdapterContext("a", "p", tmp_path, "0"))

    tag = {"name": "T", "alias": 1, "datatype": DT["Double"], "double_value": 0.0}
    msgs = [_Message(0, 0, 0, "spBv1.0/G/NBIRTH/E", payload(0, {"name": "bdSeq",
            "datatype": DT["UInt64"], "long_value": 0}, tag), 1)]  # fmt: skip
    for i in range(1, 250):
        data = payload(i % 256, {"alias": 1, "double_value": float(i), "timestamp": T0 + i})
        msgs.append(_Message(0, i, 0, "spBv1.0/G/NDATA/E", data, 1))
    assert len(msgs) > 2 * DECODE_SLICE

    ran_at: list[float] = []

    async def commit_like() -> None:
        ran_at.append(time.perf_counter())

    sliced = source()
    task = asyncio.get_running_loop().create_task(commit_like())
    events = await sliced._decode_turns(msgs)
    done_at = time.perf_counter()
    await task
    assert ran_at and ran_at[0] < done_at
    whole = source()._decode(msgs)
    assert [(e.type, e.subject, e.data, e.time) for e in events] == [
        (e.type, e.subject, e.data, e.time) for e in whole
    ]
    assert [e.data["value"] for e in events if e.subject == "G/E/T"] == [
        float(i) for i in range(250)
    ]

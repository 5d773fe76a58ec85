"""Shared MES parsing: mapping, validation, error naming (pure functions, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.sources.mes_common import (
    FieldMapping,
    MesInputError,
    apply_mapping,
    get_path,
    parse_mes_payload,
)


def canonical(**over: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "type": "mfg.inventory.moved",
        "time": "2026-11-23T10:15:02.5+01:00",
        "id": "MES-1",
        "data": {
            "item": "PN-1",
            "lot": "L-1",
            "from_location": "WH-1",
            "to_location": "LINE-1",
            "quantity": {"value": 5, "uom": "KGM"},
        },
    }
    ev.update(over)
    return ev


def problems(obj: Any, mapping: FieldMapping | None = None, **kw: Any) -> list[tuple[str, str]]:
    with pytest.raises(MesInputError) as exc:
        parse_mes_payload(obj, mapping, **kw)
    assert exc.value.field_path == exc.value.errors[0][0]
    return exc.value.errors


def test_canonical_input_needs_no_mapping():
    ev = parse_mes_payload(canonical(correlationid="T-9"))
    assert ev.type == "mfg.inventory.moved"
    assert ev.time == datetime(2026, 11, 23, 9, 15, 2, 500000, tzinfo=UTC)
    assert ev.source_event_id == "MES-1" and ev.correlationid == "T-9"
    assert ev.subject == "L-1"  # default subject: the lot
    assert ev.dataschema == "urn:edge-agent:schema:mfg.inventory.moved:1"
    assert ev.data["quantity"] == {"value": 5.0, "uom": "KGM"}


def test_cloudevents_attributes_are_tolerated_but_checked():
    ok = canonical(specversion="1.0", source="mes://x", datacontenttype="application/json")
    assert parse_mes_payload(ok).type == "mfg.inventory.moved"
    errs = problems(canonical(specversion="0.3", dataschema="urn:other"))
    assert {p for p, _ in errs} == {"specversion", "dataschema"}


def test_all_problems_are_reported_together():
    obj = canonical(time="10:15", subject="", extra=1)
    obj["data"]["quantity"] = {"value": "five"}
    errs = dict(problems(obj))
    assert set(errs) == {
        "time",
        "subject",
        "extra",
        "data.quantity.value",
        "data.quantity.uom",
    }
    assert "UTC offset" in errs["time"]


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ([1], ""),
        ("x", ""),
        ({"time": "2026-11-23T10:00:00Z", "data": {}}, "type"),
        (canonical(type=7), "type"),
        (canonical(type="mfg.agent.checkpoint"), "type"),
        (canonical(type="mfg.unknown"), "type"),
        (canonical(data=[1]), "data"),
        ({"type": "mfg.inventory.moved", "data": {}}, "time"),
    ],
)
def test_shape_errors(obj, path):
    assert path in [p for p, _ in problems(obj)]


def test_mapping_renames_translates_and_names_mes_fields_in_errors():
    m = FieldMapping(
        fields={
            "Kind": "type",
            "At": "time",
            "Ref": "id",
            "Mat.No": "data.item",
            "From": "data.from_location",
            "To": "data.to_location",
            "Qty": "data.quantity.value",
            "Unit": "data.quantity.uom",
        },
        values={"type": {"MOVE": "mfg.inventory.moved"}},
        constants={"data.plant": "berlin"},
        unmapped="drop",
    )
    mes = {
        "Kind": "MOVE",
        "At": "2026-11-23T10:00:00Z",
        "Ref": 17,
        "Mat": {"No": "PN-2"},
        "From": "A",
        "To": "B",
        "Qty": "2.5",
        "Unit": "LTR",
        "Noise": True,
    }
    ev = parse_mes_payload(mes, m)
    assert ev.source_event_id == "17"
    assert ev.data == {
        "plant": "berlin",
        "item": "PN-2",
        "from_location": "A",
        "to_location": "B",
        "quantity": {"value": 2.5, "uom": "LTR"},
    }
    errs = problems({**mes, "Unit": "l", "At": "now"}, m)
    assert {p for p, _ in errs} == {"At (time)", "Unit (data.quantity.uom)"}


def test_unmapped_keep_rejects_unknown_fields_and_prunes_mapped_parents():
    m = FieldMapping(fields={"Order.No": "data.work_order"})
    obj = {
        "type": "mfg.workorder.status_changed",
        "time": "2026-11-23T10:00:00Z",
        "Order": {"No": "WO-1"},
        "data": {"status": "started"},
    }
    assert parse_mes_payload(obj, m).data == {"work_order": "WO-1", "status": "started"}
    assert [p for p, _ in problems({**obj, "Plant": "x"}, m)] == ["Plant"]


def test_csv_row_with_dotted_columns_and_empty_cells():
    row = {
        "type": "mfg.production.completed",
        "time": "2026-11-23T10:00:00Z",
        "id": "",
        "data.work_order": "WO-9",
        "data.item": "PN-1",
        "data.lot": "",
        "data.good.value": "10",
        "data.good.uom": "EA",
        "data.scrap.value": "",
    }
    ev = parse_mes_payload(row, None, drop_empty=True)
    assert ev.source_event_id is None
    assert ev.data == {"work_order": "WO-9", "item": "PN-1", "good": {"value": 10.0, "uom": "EA"}}
    assert ev.subject == "WO-9"
    # without drop_empty an empty cell is an error, named
    assert "data.lot" in [p for p, _ in problems(row)]


def test_run_time_constants_override():
    obj = canonical()
    del obj["type"]
    ev = parse_mes_payload(obj, None, constants={"type": "mfg.inventory.moved"})
    assert ev.type == "mfg.inventory.moved"
    m = FieldMapping(constants={"type": "mfg.quality.hold_placed"})
    assert parse_mes_payload(obj, m, constants={"type": "mfg.inventory.moved"}).type == (
        "mfg.inventory.moved"
    )


def test_extra_uom_codes():
    obj = canonical()
    obj["data"]["quantity"]["uom"] = "ZZ1"
    assert problems(obj)[0][0] == "data.quantity.uom"
    assert parse_mes_payload(obj, extra_uom_codes={"ZZ1"}).data["quantity"]["uom"] == "ZZ1"


def test_conflicting_targets_are_reported():
    m = FieldMapping(fields={"A": "data.item", "B": "data.item.code"})
    obj = canonical(A="x", B="y")
    errs = problems(obj, m)
    assert any("is not an object" in msg for _, msg in errs)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"fields": {"Qty": "quantity"}}, "not a canonical field"),
        ({"fields": {"A": "data.item", "B": "data.item"}}, "both map to"),
        ({"fields": {"A": "data..x"}}, "not a canonical field"),
        ({"constants": {"type": "mfg.agent.gap"}}, "not a canonical MES event type"),
        ({"constants": {"type": "mfg.sparkplug.state_changed"}}, "not a canonical MES event type"),
        ({"values": {"nope": {}}}, "not a canonical field"),
        ({"unmapped": "maybe"}, "keep"),
        ({"field": {}}, "Extra inputs"),
    ],
)
def test_mapping_config_errors(body, words):
    with pytest.raises(ValidationError) as exc:
        FieldMapping.model_validate(body)
    assert words in str(exc.value)


def test_get_path_and_apply_mapping_are_reusable():
    assert get_path({"a.b": 1, "a": {"b": 2}}, "a.b") == 1
    assert get_path({"a": {"b": [{"c": 3}]}}, "a.b.0.c") == 3
    assert get_path({"x.y": {"z": 4}}, "x.y.z") == 4
    out, errs = apply_mapping({"K": "v", "o": "p"}, FieldMapping(fields={"K": "data.k"}))
    assert out == {"o": "p", "data": {"k": "v"}} and errs == []

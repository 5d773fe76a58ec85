"""The canonical vocabulary: models, normalisation, and the published JSON Schemas agree."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.vocabulary import (
    TYPES,
    UOM_CODES,
    VocabularyError,
    dataschema,
    default_subject,
    envelope_schema,
    render_schemas,
    stale_schemas,
    validate_data,
    write_schemas,
)

ROOT = Path(__file__).parents[2]
SCHEMAS = ROOT / "docs" / "schemas"
QTY = {"value": 12, "uom": "EA"}

SAMPLES: dict[str, dict[str, Any]] = {
    "mfg.signal.sampled": {
        "node_id": "ns=2;s=Line1.Counter",
        "browse_path": "/Objects/Line1/Counter",
        "value": 4711,
        "data_type": "UInt32",
        "status_code": {"code": 0, "name": "Good"},
        "source_timestamp": "2026-11-23T10:15:02.123Z",
        "server_timestamp": "2026-11-23T11:15:02.124+01:00",
        "line": "line1",
    },
    "mfg.machine.state_changed": {
        "machine": "M-17",
        "state": "down",
        "previous_state": "running",
        "reason_code": "M-104",
    },
    "mfg.production.counted": {"work_order": "WO-1", "item": "PN-1", "good": QTY},
    "mfg.production.completed": {
        "work_order": "WO-1",
        "item": "PN-1",
        "lot": "L-9",
        "good": QTY,
        "scrap": {"value": 0.5, "uom": "KGM"},
    },
    "mfg.material.consumed": {
        "component_item": "RM-7",
        "lot": "L-3",
        "quantity": {"value": 2.25, "uom": "KGM"},
        "work_order": "WO-1",
    },
    "mfg.workorder.status_changed": {"work_order": "WO-1", "status": "released"},
    "mfg.quality.hold_placed": {
        "item": "PN-1",
        "lot": "L-9",
        "location": "WH-1",
        "reason": "dimension out of tolerance",
    },
    "mfg.quality.hold_released": {"item": "PN-1", "lot": "L-9", "reason": "MRB: use as is"},
    "mfg.inventory.moved": {
        "item": "PN-1",
        "from_location": "WH-1",
        "to_location": "LINE-1",
        "quantity": {"value": 100, "uom": "H87"},
    },
    "mfg.sparkplug.state_changed": {
        "group_id": "Plant1",
        "edge_node_id": "Line1-Gateway",
        "device_id": "Filler",
        "state": "online",
        "reason": "birth",
        "bd_seq": 3,
        "metrics": 12,
    },
    "mfg.agent.checkpoint": {
        "streamepoch": "01JD3V0000000000000000000",
        "first_sequence": 1,
        "last_sequence": 500,
        "count": 500,
    },
    "mfg.agent.gap": {
        "streamepoch": "01JD3V0000000000000000000",
        "first_sequence": 10,
        "last_sequence": 19,
        "count": 10,
        "reason": "drop_oldest",
    },
}

#: type -> the quantity fields of its data (a quantity without uom must be refused)
QUANTITIES = {
    "mfg.production.counted": ["good"],
    "mfg.production.completed": ["good", "scrap"],
    "mfg.material.consumed": ["quantity"],
    "mfg.inventory.moved": ["quantity"],
}


def published(type_: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{type_}.v1.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def errors(type_: str, data: Any, **kw: Any) -> list[tuple[str, str]]:
    with pytest.raises(VocabularyError) as exc:
        validate_data(type_, data, **kw)
    return exc.value.errors


def test_every_type_has_a_sample():
    assert set(SAMPLES) == set(TYPES)


@pytest.mark.parametrize("type_", list(TYPES))
def test_sample_validates_normalises_and_matches_published_schema(type_):
    out = validate_data(type_, SAMPLES[type_])
    assert validate_data(type_, out) == out  # normalised output is a fixed point
    assert json.loads(json.dumps(out)) == out  # plain JSON
    assert list(published(type_).iter_errors(out)) == []


@pytest.mark.parametrize("type_", list(QUANTITIES))
def test_quantity_without_uom_is_rejected_by_model_and_schema(type_):
    for field in QUANTITIES[type_]:
        for bad in ({"value": 3}, 3, "3", {"value": 3, "uom": None}, {"value": 3, "uom": ""}):
            data = copy.deepcopy(SAMPLES[type_])
            data[field] = bad
            errs = errors(type_, data)
            assert errs[0][0] in (field, f"{field}.uom"), errs
            if isinstance(bad, dict):
                assert not published(type_).is_valid(data)


def test_unknown_uom_is_rejected_with_a_hint_and_extra_codes_extend_the_list():
    data = copy.deepcopy(SAMPLES["mfg.inventory.moved"])
    data["quantity"]["uom"] = "PCS"
    [(path, msg)] = errors("mfg.inventory.moved", data)
    assert path == "quantity.uom" and "H87 or EA" in msg
    data["quantity"]["uom"] = "kgm"
    assert "upper case" in errors("mfg.inventory.moved", data)[0][1]
    data["quantity"]["uom"] = "ZZ9"
    assert "extra_uom_codes" in errors("mfg.inventory.moved", data)[0][1]
    out = validate_data("mfg.inventory.moved", data, extra_uom_codes=["ZZ9"])
    assert out["quantity"]["uom"] == "ZZ9"


def test_lenient_input_canonical_output():
    out = validate_data(
        "mfg.production.completed",
        {
            "work_order": 4711,
            "item": " PN-1 ",
            "good": {"value": "12.5", "uom": "KGM"},
            "lot": None,
        },
    )
    assert out == {"work_order": "4711", "item": "PN-1", "good": {"value": 12.5, "uom": "KGM"}}
    sig = validate_data("mfg.signal.sampled", SAMPLES["mfg.signal.sampled"])
    assert sig["server_timestamp"] == "2026-11-23T10:15:02.124000Z"  # in UTC


@pytest.mark.parametrize(
    ("type_", "patch", "path"),
    [
        ("mfg.production.counted", {"good": {"value": True, "uom": "EA"}}, "good.value"),
        ("mfg.production.counted", {"good": {"value": float("nan"), "uom": "EA"}}, "good.value"),
        ("mfg.production.counted", {"good": None, "scrap": None}, ""),
        ("mfg.production.counted", {"work_order": ""}, "work_order"),
        ("mfg.production.counted", {"colour": "red"}, "colour"),
        ("mfg.machine.state_changed", {"state": "off"}, "state"),
        ("mfg.machine.state_changed", {"machine": None}, ""),
        ("mfg.workorder.status_changed", {"status": "done"}, "status"),
        ("mfg.quality.hold_placed", {"reason": ""}, "reason"),
        ("mfg.signal.sampled", {"source_timestamp": "2026-11-23T10:15:02"}, "source_timestamp"),
        ("mfg.signal.sampled", {"status_code": 0}, "status_code"),
        ("mfg.agent.gap", {"first_sequence": 20}, ""),
        ("mfg.agent.checkpoint", {"count": -1}, "count"),
        ("mfg.material.consumed", {"attributes": {"nested": {"a": 1}}}, "attributes.nested"),
    ],
)
def test_invalid_data_names_the_field(type_, patch, path):
    # a None in the patch removes the field
    data = {**SAMPLES[type_], **patch}
    data = {k: v for k, v in data.items() if not (k in patch and patch[k] is None)}
    errs = errors(type_, data)
    assert any(p == path or p.startswith(path + ".") for p, _ in errs), errs
    assert all(m for _, m in errs)


def test_every_bad_field_is_listed():
    errs = errors("mfg.inventory.moved", {"quantity": {"value": "x"}, "extra": 1})
    assert {p for p, _ in errs} == {
        "item",
        "from_location",
        "to_location",
        "quantity.value",
        "quantity.uom",
        "extra",
    }


def test_unknown_type_and_non_object_data():
    with pytest.raises(VocabularyError) as exc:
        validate_data("mfg.nope", {})
    assert exc.value.field_path == "type" and "mfg.production.completed" in exc.value.message
    assert errors("mfg.production.counted", [1, 2]) == [
        ("", "data must be a JSON object, got an array")
    ]


def test_dataschema_and_default_subject():
    assert (
        dataschema("mfg.quality.hold_placed") == "urn:edge-agent:schema:mfg.quality.hold_placed:1"
    )
    with pytest.raises(VocabularyError):
        dataschema("nope")
    assert (
        default_subject("mfg.production.completed", SAMPLES["mfg.production.completed"]) == "WO-1"
    )
    assert default_subject("mfg.signal.sampled", SAMPLES["mfg.signal.sampled"]).startswith("ns=2")
    assert default_subject("mfg.quality.hold_released", {"item": "PN-1"}) == "PN-1"


# --------------------------------------------------------------------------- published files


def test_committed_schemas_are_up_to_date():
    stale = stale_schemas(SCHEMAS)
    assert stale == [], f"run: python -m agent.vocabulary --write docs/schemas ({stale})"


def test_cli_writes_and_checks(tmp_path):
    run = [sys.executable, "-m", "agent.vocabulary"]
    r = subprocess.run([*run, "--check", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "--write" in r.stderr
    r = subprocess.run([*run, "--write", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(render_schemas())
    r = subprocess.run([*run, "--check", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (tmp_path / "mfg.agent.gap.v1.schema.json").write_text("{}")
    assert stale_schemas(tmp_path) == ["mfg.agent.gap.v1.schema.json"]


def test_write_removes_stale_files(tmp_path):
    (tmp_path / "mfg.old.v1.schema.json").write_text("{}")
    write_schemas(tmp_path)
    assert not (tmp_path / "mfg.old.v1.schema.json").exists()


def test_published_schemas_are_valid_json_schema():
    for name in render_schemas():
        schema = json.loads((SCHEMAS / name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)


def _envelope(type_: str, data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "01JD3W5Q8R6B1N9X2K4T7V0M3C",
        "source": "edge-agent://plant-berlin/mes",
        "type": type_,
        "time": "2026-11-23T10:15:02.123Z",
        "subject": "WO-1",
        "datacontenttype": "application/json",
        "dataschema": dataschema(type_),
        "sequence": "00000000000000012345",
        "streamepoch": "01JD3V0000000000000000000",
        "plant": "plant-berlin",
        "agentid": "berlin-srv-01",
        "data": data,
    }


def test_envelope_schema_checks_data_by_type():
    v = jsonschema.Draft202012Validator(
        json.loads((SCHEMAS / "cloudevent.v1.schema.json").read_text())
    )
    assert v.schema == envelope_schema()
    for t in TYPES:
        assert list(v.iter_errors(_envelope(t, validate_data(t, SAMPLES[t])))) == []
    bad = _envelope(
        "mfg.inventory.moved", {**SAMPLES["mfg.inventory.moved"], "quantity": {"value": 1}}
    )
    assert not v.is_valid(bad)
    wrong_schema = _envelope("mfg.agent.gap", SAMPLES["mfg.agent.gap"])
    wrong_schema["dataschema"] = dataschema("mfg.agent.checkpoint")
    assert not v.is_valid(wrong_schema)
    short_seq = _envelope("mfg.agent.gap", SAMPLES["mfg.agent.gap"])
    short_seq["sequence"] = "12345"
    assert not v.is_valid(short_seq)


def test_vocabulary_doc_lists_every_type_and_unit():
    doc = (ROOT / "docs" / "vocabulary.md").read_text()
    for t in TYPES:
        assert f"`{t}`" in doc, t
    for code in UOM_CODES:
        assert f"`{code}`" in doc, code


def test_bad_sample_keeps_its_null_value():
    """A Bad OPC UA sample has no usable value: it is sent as "value": null, not without it."""
    bad = {
        "node_id": "ns=2;s=Line1.Temp",
        "value": None,
        "data_type": "Double",
        "status_code": {"code": 0x80310000, "name": "BadNoCommunication"},
        "source_timestamp": None,  # optional and null: still left out
    }
    out = validate_data("mfg.signal.sampled", bad)
    assert "value" in out and out["value"] is None
    assert "source_timestamp" not in out
    assert list(out) == ["node_id", "value", "data_type", "status_code"]  # field order kept
    assert validate_data("mfg.signal.sampled", out) == out  # fixed point
    assert list(published("mfg.signal.sampled").iter_errors(out)) == []
    # required means present: a sample without any value is still refused
    missing = {k: v for k, v in bad.items() if k != "value"}
    with pytest.raises(VocabularyError) as err:
        validate_data("mfg.signal.sampled", missing)
    assert err.value.field_path == "value"

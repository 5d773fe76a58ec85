"""The fast pass (adapters/sources/mes_common/fast.py) against the detailed pydantic path.

Property: whenever the fast pass accepts a record, the detailed path accepts it too and
gives the same NewEvent: the same committed envelope byte for byte, the same MES id. The
fast pass may refuse anything (the detailed path then judges), so refusing is never
wrong; accepting wrongly would be. And it must actually take the plain records an MES
sends, or it would buy nothing.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.sources.mes_common import MesInputError, parse_mes_payload
from adapters.sources.mes_common.fast import DATA_CHECKS, fast_event, fast_time
from adapters.sources.mes_common.parse import parse_detailed
from agent.event import encode
from agent.interfaces import NewEvent
from tests.fixtures.mes_http import event

NONE: frozenset[str] = frozenset()


def envelope(ev: NewEvent) -> bytes:
    return encode(
        ev, id="01JDXXXXXXXXXXXXXXXXXXXXXX", source="s", seq=7, epoch="e", plant="p", agent_id="a"
    )


def detailed(obj: dict[str, Any], extra: frozenset[str] = NONE) -> NewEvent | None:
    try:
        return parse_detailed(dict(obj), [], None, extra)
    except MesInputError:
        return None


def same(fast: NewEvent, slow: NewEvent) -> None:
    assert envelope(fast) == envelope(slow)
    assert fast.source_event_id == slow.source_event_id
    assert fast == slow
    assert type(fast.time) is not str and fast.time == slow.time


PLAIN = [
    event(1),
    event(2, subject="S-1", correlationid="C-1"),
    event(3, time="2026-11-23T10:15:02.5+01:00"),
    event(4, time="2026-11-23T10:15:02.123456-05:30", specversion="1.0"),
    event(5, data={"good": {"value": 2.5, "uom": "KGM"}, "item": "X", "work_order": "W"}),
    {
        "type": "mfg.machine.state_changed",
        "time": "2026-11-23T10:15:02Z",
        "data": {"machine": "M-1", "state": "down", "reason_code": "M-104"},
    },
    {
        "type": "mfg.inventory.moved",
        "time": "2026-11-23T10:15:02Z",
        "id": "T-1",
        "datacontenttype": "application/json",
        "dataschema": "urn:edge-agent:schema:mfg.inventory.moved:1",
        "source": "mes://x",
        "data": {
            "item": "PN-1",
            "from_location": "A",
            "to_location": "B",
            "quantity": {"value": 3, "uom": "EA"},
            "lot": None,
        },
    },
]


@pytest.mark.parametrize("obj", PLAIN)
def test_plain_records_take_the_fast_pass_and_match_the_detailed_one(obj: dict[str, Any]) -> None:
    before = copy.deepcopy(obj)
    fast = fast_event(obj, NONE)
    assert fast is not None
    slow = detailed(obj)
    assert slow is not None
    same(fast, slow)
    assert parse_mes_payload(obj) == slow
    assert obj == before  # the record is not changed


def test_every_mes_type_but_the_signal_has_a_fast_pass() -> None:
    assert "mfg.signal.sampled" not in DATA_CHECKS  # value: Any, a field validator
    assert not any(t.startswith("mfg.agent.") for t in DATA_CHECKS)
    assert "mfg.production.completed" in DATA_CHECKS
    assert "mfg.quality.hold_placed" in DATA_CHECKS


@pytest.mark.parametrize(
    "obj",
    [
        event(1, id=" MES-1"),  # stripped by the detailed path: it decides
        event(1, id=12),  # a number, coerced to a string
        event(1, subject=""),  # refused
        event(1, time="2026-11-23 10:15:02Z"),
        event(1, time="2026-11-23T10:15:02"),  # no offset
        event(1, time="2026-11-23T10:15:60Z"),
        event(1, time=1700000000),
        event(1, type=" mfg.production.completed"),
        event(1, type="mfg.agent.gap"),
        event(
            1,
            type="mfg.sparkplug.state_changed",
            data={"group_id": "G", "edge_node_id": "E", "state": "online", "reason": "birth"},
        ),  # fmt: skip
        event(1, extra=1),
        event(1, dataschema="urn:x"),
        event(1, data={"work_order": "W", "item": "I"}),  # neither good nor scrap
        event(1, data={"work_order": "W", "item": "I", "good": {"value": True, "uom": "EA"}}),
        event(1, data={"work_order": "W", "item": "I", "good": {"value": 1, "uom": "ea"}}),
        event(1, data={"work_order": "W", "item": "I", "good": 5}),
        event(
            1,
            data={
                "work_order": "W",
                "item": "I",
                "good": {"value": 1, "uom": "EA"},
                "attributes": {"a": 1},
            },
        ),
    ],
)
def test_doubtful_records_are_left_to_the_detailed_path(obj: dict[str, Any]) -> None:
    assert fast_event(obj, NONE) is None


def test_fast_time_reads_what_pydantic_reads() -> None:
    assert fast_time("2026-11-23T10:15:02.5+01:00") == datetime(
        2026, 11, 23, 9, 15, 2, 500000, tzinfo=UTC
    )
    assert fast_time("2026-11-23T10:15:02Z") == datetime(2026, 11, 23, 10, 15, 2, tzinfo=UTC)
    for bad in ("2026-13-01T00:00:00Z", "2026-11-23T24:00:00Z", "2026-11-23T10:15:02+24:00",
                "2026-11-23T10:15:02.1234567Z", "２０２６-11-23T10:15:02Z", "2026-11-23T10:15:02Z\n"):  # fmt: skip
        assert fast_time(bad) is None, bad


# --------------------------------------------------------------------------- generated

blanks = st.sampled_from(
    ["", " ", "\t", "\n", "\u00a0", "\u2003", "\x1c", "\x85", "\u200b", "\x00"]
)
strings = st.one_of(
    st.text(max_size=6),
    st.builds(lambda a, s, b: a + s + b, blanks, st.text(min_size=0, max_size=4), blanks),
    st.text(min_size=195, max_size=205, alphabet="ab"),
    st.sampled_from(["EA", "KGM", "ea", "XYZ", "E A", "EA\n", "running", "down", "online"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    strings,
)
offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m))
)


@st.composite
def times(draw: st.DrawFn) -> Any:
    dt = draw(
        st.datetimes(
            min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
        )
    )
    dt = dt.astimezone(draw(offsets))
    spec = draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
    text = dt.isoformat(timespec=spec)
    text = draw(
        st.sampled_from(
            [text, text.replace("+00:00", "Z"), text.replace("T", " "), text[:-6], text + "Z"]
        )
    )
    return draw(st.one_of(st.just(text), scalars))


quantities = st.one_of(
    st.fixed_dictionaries(
        {
            "value": st.one_of(st.integers(-(10**6), 10**6), st.floats(), st.booleans(), strings),
            "uom": st.one_of(st.sampled_from(["EA", "KGM", "MTR", "SITE1", "ZZ"]), strings),
        },  # fmt: skip
        optional={"extra": scalars},
    ),
    scalars,
)


def mutate(base: dict[str, Any], key: str, value: Any, delete: bool) -> dict[str, Any]:
    out = copy.deepcopy(base)
    if delete:
        out.pop(key, None)
    else:
        out[key] = value
    return out


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(PLAIN)))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["envelope", "data", "quantity"]))
        if where == "envelope":
            key = draw(st.sampled_from(["type", "time", "id", "subject", "correlationid", "data",
                                        "specversion", "source", "datacontenttype", "dataschema", "x"]))  # fmt: skip
            value = (
                draw(times())
                if key == "time"
                else draw(
                    st.one_of(
                        scalars,
                        st.sampled_from(sorted(DATA_CHECKS)),
                        st.just("1.0"),
                        st.just("application/json"),
                    )
                )
            )
            obj = mutate(obj, key, value, draw(st.booleans()))
        elif isinstance(obj.get("data"), dict):
            data = obj["data"]
            key = draw(st.sampled_from(["work_order", "item", "lot", "good", "scrap", "quantity", "machine",
                                        "work_center", "state", "reason", "attributes", "plant", "x"]))  # fmt: skip
            value = draw(quantities) if where == "quantity" else draw(scalars)
            obj["data"] = mutate(data, key, value, draw(st.booleans()))
    return obj


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=records(), site_codes=st.sampled_from([NONE, frozenset({"SITE1", "ZZ"})]))
def test_the_fast_pass_accepts_only_what_the_detailed_path_accepts_identically(
    obj: dict[str, Any], site_codes: frozenset[str]
) -> None:
    before = copy.deepcopy(obj)
    fast = fast_event(obj, site_codes)
    assert obj == before
    if fast is None:
        return
    slow = detailed(obj, site_codes)
    assert slow is not None, "the fast pass accepted what the detailed path refuses"
    same(fast, slow)

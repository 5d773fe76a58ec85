"""encode() joins cached fragments for speed; it must give exactly the bytes of one
orjson.dumps of the whole envelope (encode_reference), for any event."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.event import encode, encode_reference
from agent.interfaces import NewEvent

text = st.text(max_size=40)  # any unicode: quotes, backslashes, control characters, emoji
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,  # fmt: skip
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
types = st.sampled_from(
    ["mfg.production.counted", "mfg.signal.sampled", "mfg.agent.gap", "x.custom.unknown"]
) | st.text(min_size=1, max_size=20)
times = st.one_of(
    st.sampled_from(["2026-11-23T10:00:00.000Z"]),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(),  # naive: taken as UTC
)


@settings(max_examples=400, deadline=None)
@given(
    type_=types,
    data=st.dictionaries(text, json_values, max_size=6),
    time=times,
    subject=st.none() | text,
    correlationid=st.none() | text,
    dataschema=st.none() | st.just("urn:example:custom:2"),
    seq=st.integers(1, 10**19),
    source=text,
    epoch=text,
    plant=text,
    agent_id=text,
)
def test_encode_is_byte_identical_to_the_reference(
    type_: str,
    data: dict,
    time: str | datetime,
    subject: str | None,
    correlationid: str | None,
    dataschema: str | None,
    seq: int,
    source: str,
    epoch: str,
    plant: str,
    agent_id: str,
) -> None:
    ev = NewEvent(type_, data, time, subject=subject, correlationid=correlationid,
                  dataschema=dataschema)  # fmt: skip
    kw = {"id": "01JD3V0000000000000000000A", "source": source, "seq": seq, "epoch": epoch,
          "plant": plant, "agent_id": agent_id}  # fmt: skip
    fast = encode(ev, **kw)
    assert fast == encode_reference(ev, **kw)
    doc = orjson.loads(fast)
    assert doc["sequence"] == f"{seq:020d}" and doc["data"] == data
    assert list(doc)[:3] == ["specversion", "id", "source"] and list(doc)[-1] == "data"

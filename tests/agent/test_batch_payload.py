"""Batch.payload is the contract's JSON array of the stored bodies, byte for byte what
joining them inside brackets gives, for any number of bodies (it is built with one copy)."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from agent.interfaces import Batch

json_objects = st.dictionaries(
    st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8), max_size=4
)


@given(st.lists(json_objects, max_size=40))
def test_payload_is_the_json_array_of_the_bodies(objects: list[dict[str, object]]) -> None:
    bodies = [orjson.dumps(o) for o in objects]
    batch = Batch("s", "B", "E", 1, max(1, len(bodies)), [], bodies)
    assert batch.payload == b"[" + b",".join(bodies) + b"]"
    assert orjson.loads(batch.payload) == objects
    assert list(batch.bodies) == bodies  # the stored bodies are left as they were

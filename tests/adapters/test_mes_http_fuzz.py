"""Fuzzing the MES HTTP endpoint: random JSON, wrong types, huge and truncated bodies.

Properties, checked on the real server and the real Buffer after every request:
never a 5xx; a refused request stores nothing; an accepted one stores exactly what it
reports, and every stored event is valid (vocabulary models AND the published JSON Schema);
the endpoint keeps serving afterwards.

Hypothesis drives a synchronous function in a worker thread; each example is run on the
test's event loop with run_coroutine_threadsafe, so server, buffer and requests share one
loop and the server lives across all examples (it must survive all of them).
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.vocabulary import envelope_schema, validate_data
from tests.fixtures.mes_http import event, open_buffer, serving

TOKEN = "fuzz-token-0123456789"
MAX_BODY = 16 * 1024
EXAMPLES = 300

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip

#: Paths into a valid event where a wrong value is put (or the key removed).
PATHS = [
    ("type",),
    ("time",),
    ("id",),
    ("subject",),
    ("correlationid",),
    ("data",),
    ("data", "work_order"),
    ("data", "item"),
    ("data", "lot"),
    ("data", "good"),
    ("data", "good", "value"),
    ("data", "good", "uom"),
    ("data", "scrap"),
    ("data", "attributes"),
    ("data", "unknown_field"),
    ("specversion",),
    ("extra",),
]
OTHER_TYPES = [
    "mfg.machine.state_changed",
    "mfg.inventory.moved",
    "mfg.quality.hold_placed",
    "mfg.agent.gap",
    "mfg.sparkplug.state_changed",
    "mfg.signal.sampled",
    "",
]


@st.composite
def mutated_event(draw: st.DrawFn) -> Any:
    ev = event(draw(st.integers(0, 50)))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(PATHS))
        node = ev
        for key in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                break
            node = node[key]
        else:
            action = draw(st.sampled_from(["replace", "delete", "type"]))
            if action == "delete":
                node.pop(path[-1], None)
            elif action == "type":
                ev["type"] = draw(st.sampled_from(OTHER_TYPES))
            else:
                node[path[-1]] = draw(json_values)
    return ev


@st.composite
def request_spec(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(["valid", "mutated", "batch", "random", "truncated", "huge", "bytes"])
    )
    if kind == "valid":
        body = json.dumps(event(draw(st.integers(0, 10_000)))).encode()
    elif kind == "mutated":
        body = json.dumps(draw(mutated_event())).encode()
    elif kind == "batch":
        items = draw(st.lists(st.one_of(mutated_event(), json_values), min_size=0, max_size=6))
        body = json.dumps(items).encode()
    elif kind == "random":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "truncated":
        full = json.dumps([event(i) for i in range(draw(st.integers(1, 4)))]).encode()
        body = full[: draw(st.integers(0, len(full) - 1))]
    elif kind == "huge":
        n = MAX_BODY // 250 + draw(st.integers(0, 40))
        body = json.dumps([event(i) for i in range(n)]).encode()
        if draw(st.booleans()):
            body = b"[" + b" " * (MAX_BODY + draw(st.integers(0, 4096))) + b"]"
    else:
        body = draw(st.binary(max_size=300))
    ctype = draw(
        st.sampled_from(
            ["application/json"] * 6
            + [
                "application/cloudevents-batch+json",
                "text/plain",
                "application/json; charset=latin-1",
                None,
            ]  # fmt: skip
        )
    )
    auth = draw(st.sampled_from([f"Bearer {TOKEN}"] * 20 + [None, "Bearer nope", TOKEN]))
    chunked = draw(st.booleans()) if kind == "huge" else False
    return {"kind": kind, "body": body, "ctype": ctype, "auth": auth, "chunked": chunked}


async def test_fuzz_never_5xx_never_invalid_stored(tmp_path: Path) -> None:
    buf = await open_buffer(tmp_path / "fuzz.db")
    validator = jsonschema.Draft202012Validator(envelope_schema())
    loop = asyncio.get_running_loop()
    seen = {"seq": 0, "statuses": {}}
    try:
        async with serving(buf, token=TOKEN, max_body_bytes=MAX_BODY) as (src, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:

                async def check(spec: dict[str, Any]) -> None:
                    headers = {}
                    if spec["ctype"] is not None:
                        headers["Content-Type"] = spec["ctype"]
                    if spec["auth"] is not None:
                        headers["Authorization"] = spec["auth"]
                    content: Any = spec["body"]
                    if spec["chunked"]:
                        data = spec["body"]

                        async def gen() -> Any:
                            for i in range(0, len(data), 4096):
                                yield data[i : i + 4096]

                        content = gen()
                    r = await client.post("/v1/events", content=content, headers=headers)
                    statuses = seen["statuses"]
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    assert r.status_code < 500, (r.status_code, r.text, spec)
                    assert r.status_code in (202, 400, 401, 413, 415, 422), r.text
                    assert r.headers["Content-Type"].startswith("application/json")
                    rows = await buf.read_range("mes", seen["seq"], 1 << 62, 1_000_000)
                    if r.status_code != 202:
                        assert rows == [], f"{r.status_code} but {len(rows)} events stored"
                        assert r.json()["stored"] == 0
                        return
                    assert spec["auth"] == f"Bearer {TOKEN}"
                    assert len(rows) == r.json()["accepted"]
                    for seq, _, body in rows:
                        ev = json.loads(body)
                        errors = [e.message for e in validator.iter_errors(ev)]
                        assert not errors, (errors, ev)
                        assert validate_data(ev["type"], ev["data"]) == ev["data"]
                        seen["seq"] = seq

                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                )
                @given(spec=request_spec())
                def one(spec: dict[str, Any]) -> None:
                    asyncio.run_coroutine_threadsafe(check(copy.deepcopy(spec)), loop).result(30)

                await asyncio.to_thread(one)

                # still serving, and the counters add up
                ok = await client.post(
                    "/v1/events",
                    json=event(123_456),
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert ok.status_code == 202
                detail = src.state().detail
                assert detail["requests"] == sum(seen["statuses"].values()) + 1
                assert sum(detail["rejected"].values()) == sum(
                    n for s, n in seen["statuses"].items() if s != 202
                )
        # every class of answer was actually exercised
        assert {202, 400, 401, 413, 415, 422} <= set(seen["statuses"]), seen["statuses"]
    finally:
        await buf.close()

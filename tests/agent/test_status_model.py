"""The typed status snapshot, the one state vocabulary and the one rule for last_error."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from agent.interfaces import UP_STATES, ComponentState, State, is_up
from agent.status import build_snapshot
from agent.status_model import StatusSnapshot

ROWS = [
    {"name": "line1", "last_seq": 10, "forwarded_seq": 4, "backlog_events": 6,
     "backlog_bytes": 600, "oldest_unsent_at": 100.0, "last_forwarded_at": None,
     "last_error": "AUTH: HTTP 401", "dead_letters": 0, "ingested_total": 10,
     "forwarded_total": 4, "dropped_total": 0, "dead_lettered_total": 0, "stored_bytes": 900},
]  # fmt: skip


def _heartbeat(now: float, sink_state: str, source_state: str) -> dict:
    return {
        "pid": None, "at": now, "started_at": now - 60, "version": "0.1.0",
        "agent_id": "edge-01", "plant": "p1",
        "sinks": [{"name": "central", "type": "https", "state": State(sink_state),
                   "since": now - 5, "last_error": None}],
        "sources": [{"name": "line1", "type": "simulator", "stream": "line1",
                     "state": source_state, "since": now - 5, "last_error": None,
                     "detail": {"emitted": 10}}],
        "forwarders": {"line1": {"state": State.RETRYING, "last_error": "x"}},
        "stream_sinks": {"line1": ["central", "normal"]},
        "ingest_rate_eps": 2.0, "net_fill_bps": 10.0, "refused": {"line1": 3},
        "last_write_error": None, "accepting": True, "stopped": False,
    }  # fmt: skip


def _snap(sink_state: str = "connected", source_state: str = "connected", running: bool = True):
    now = time.time()
    return build_snapshot(
        rows=ROWS, heartbeat=_heartbeat(now, sink_state, source_state), meta={"epoch": "E1"},
        path=Path("/nonexistent/buffer.db"), max_bytes=10_000,
        on_full="block", durability="normal", agent_id="edge-01", plant="p1",
        version="0.1.0", stream_sinks={}, now=now, running=running,
    )  # fmt: skip


def test_to_dict_is_schema_1_and_reads_back_the_same() -> None:
    snap = _snap()
    d = snap.to_dict()
    assert list(d) == ["schema", "agent", "buffer", "streams", "sinks", "sources"]
    assert d["schema"] == 1
    assert d["streams"][0]["state"] == "retrying" and d["streams"][0]["refused_total"] == 3
    assert d["sinks"][0]["state"] == "connected"
    # the JSON keeps plain strings, never "State.CONNECTED"
    text = orjson.dumps(d).decode()
    assert '"state":"connected"' in text and "State." not in text
    assert StatusSnapshot.from_dict(orjson.loads(text)).to_dict() == orjson.loads(text)


def test_stopped_agent_shows_every_component_stopped() -> None:
    d = _snap(running=False).to_dict()
    assert d["agent"]["running"] is False and d["agent"]["pid"] is None
    assert {c["state"] for c in d["sinks"] + d["sources"] + d["streams"]} == {"stopped"}
    assert d["buffer"]["accepting"] is None and d["buffer"]["ingest_rate_eps"] == 0.0


@pytest.mark.parametrize(
    ("sink", "source", "ready"),
    [
        ("connected", "connected", True),
        ("starting", "connected", True),  # a sink not yet failed does not make us unready
        ("connected", "listening", True),  # a server source waiting for peers is up
        ("connected", "finished", True),
        ("disconnected", "connected", False),
        ("auth_failed", "connected", False),
        ("connected", "starting", False),
        ("connected", "error", False),
    ],
)
def test_readiness_is_the_one_up_rule(sink: str, source: str, ready: bool) -> None:
    r = _snap(sink, source).readiness()
    assert r.ready is ready
    assert r.to_dict() == {"sinks": {"central": sink}, "sources": {"line1": source}}


def test_one_up_rule_covers_every_state() -> None:
    assert {s.value for s in State if s.up} == UP_STATES
    assert not is_up("a-state-from-a-newer-agent") and not is_up(None)


def test_last_error_rule() -> None:
    st = ComponentState(state="starting", since=1.0)
    assert st.state is State.STARTING
    st.change("disconnected", "connection refused")
    since = st.since
    assert st.last_error == "connection refused" and since > 1.0
    st.change("disconnected")  # no news: the reason stays, since does not move
    assert st.last_error == "connection refused" and st.since == since
    st.change(State.AUTH_FAILED)  # a move to another down state keeps the last reason
    assert st.last_error == "connection refused"
    st.change("connected")  # recovered: the trouble is over
    assert st.state is State.CONNECTED and st.last_error is None
    st.note_error("stream a: not authorised")  # an error that does not change the state
    st.change("connected")
    assert st.last_error == "stream a: not authorised"
    st.clear_error()
    assert st.last_error is None
    with pytest.raises(ValueError):
        st.change("no-such-state")

"""OPC UA config validation, the sample, and the pure mapping (counter, state, hold)."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asyncua import ua

from adapters.sources.opcua import Config
from adapters.sources.opcua.config import NodeConfig
from adapters.sources.opcua.mapping import (
    Counter,
    NodeMapper,
    Sample,
    event_time,
    known,
    to_json,
)
from agent import vocabulary
from agent.config import ConfigError, parse_config

SAMPLE = Path(__file__).parents[2] / "adapters" / "sources" / "opcua" / "sample.toml"


def _cfg(**kw) -> Config:
    body = {"endpoint": "opc.tcp://127.0.0.1:4840", "nodes": [{"node_id": "ns=2;s=X"}], **kw}
    return Config.model_validate(body)


def _load(source: dict) -> Config:
    raw = {"sinks": {"https": {"url": "https://gw.example/ingest"}}, "sources": {"s": source}}
    return parse_config(raw).sources["s"]


def test_sample_toml_validates():
    raw = tomllib.loads(SAMPLE.read_text())
    src = raw["sources"]["line1"]
    cfg = Config.model_validate(src)
    assert cfg.mode == "SignAndEncrypt" and len(cfg.nodes) == 4
    assert cfg.nodes[0].sampling_interval == 0.5 and cfg.nodes[0].queue_size == 4
    assert cfg.subscription("slow").publishing_interval == 5.0


@pytest.mark.parametrize(
    ("source", "path", "words"),
    [
        ({"endpoint": "http://x", "nodes": [{"node_id": "i=1"}]}, "endpoint", "opc.tcp://"),
        (
            {"endpoint": "opc.tcp://h:1", "nodes": [{"node_id": "i=1", "browse_path": "a"}]},
            "nodes[0]",
            "exactly one of node_id or browse_path",
        ),
        (
            {
                "endpoint": "opc.tcp://h:1",
                "security_policy": "Basic256Sha256",
                "nodes": [{"node_id": "i=1"}],
            },
            "sources.s",
            "needs pki_dir (or trusted_certs_dir, or server_thumbprint)",
        ),
        (
            {
                "endpoint": "opc.tcp://h:1",
                "server_thumbprint": "abc",
                "nodes": [{"node_id": "i=1"}],
            },
            "server_thumbprint",
            "40 hex digits",
        ),
        (
            {"endpoint": "opc.tcp://h:1", "username": "u", "nodes": [{"node_id": "i=1"}]},
            "sources.s",
            "password_file",
        ),
        (
            {"endpoint": "opc.tcp://h:1", "nodes": [{"node_id": "i=1", "queue_size": 0}]},
            "nodes[0].queue_size",
            "greater than or equal to 1",
        ),
        (
            {
                "endpoint": "opc.tcp://h:1",
                "nodes": [{"node_id": "i=1", "event": "mfg.machine.state_changed"}],
            },
            "nodes[0]",
            "value-to-state table",
        ),
        (
            {
                "endpoint": "opc.tcp://h:1",
                "nodes": [{"node_id": "i=1", "event": "mfg.production.counted"}],
            },
            "sources.s",
            "needs work_order and item",
        ),
        (
            {"endpoint": "opc.tcp://h:1", "nodes": [{"node_id": "i=1", "unit": "kg"}]},
            "nodes[0].unit",
            "UN/CEFACT",
        ),
        (
            {"endpoint": "opc.tcp://h:1", "nodes": [{"node_id": "i=1", "subscription": "fast"}]},
            "sources.s",
            "[sources.NAME.subscriptions.fast]",
        ),
    ],
)
def test_config_errors_are_one_line_with_key_and_fix(source, path, words):
    with pytest.raises(ConfigError) as info:
        _load({"type": "opcua", **source})
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"sources.s.{path}" if path != "sources.s" else "sources.s"), msg
    assert words in msg


def test_thumbprint_is_normalized():
    cfg = _cfg(server_thumbprint="94:78:f0:02:53:f8:14:ab:9d:1d:a0:b2:f5:82:02:85:69:62:33:a1")
    assert cfg.server_thumbprint == "9478F00253F814AB9D1DA0B2F5820285696233A1"


def test_counter_increments_across_reset_and_rollover():
    c = Counter(counter_max=65535)
    assert [c.feed(v) for v in (100, 100, 105, 110, 2, 7, 65530, 65535, 4)] == [
        None,
        None,
        5,
        5,
        2,
        5,
        65523,
        5,
        5,
    ]
    assert c.resets == 1 and c.rollovers == 1
    plain = Counter(counter_max=None)
    assert [plain.feed(v) for v in (10, 12, 0, 3)] == [None, 2, None, 3]  # reset to 0, then +3


def _sample(value, code=0, *, src: datetime | None, srv: datetime | None) -> Sample:
    return Sample(value, code, src, srv, datetime.now(UTC))


def test_signal_shape_matches_the_vocabulary_and_keeps_bad_status():
    node = NodeConfig(node_id="ns=2;s=T", line="L1", item="I-1")
    m = NodeMapper(
        node,
        node_id="ns=2;s=T",
        browse_path="Objects/2:T",
        attributes={"line": "L1", "item": "I-1"},
    )
    now = datetime.now(UTC)
    [good] = m.map(_sample(1.5, src=now, srv=now), "Double")
    [bad] = m.map(
        _sample(None, ua.StatusCodes.BadSensorFailure, src=now + timedelta(seconds=1), srv=None)
    )
    for ev in (good, bad):
        # validate_data leaves out optional None fields but keeps the required value, which a
        # Bad sample sends as null
        normalised = vocabulary.validate_data(ev.type, ev.data)
        assert normalised == {k: v for k, v in ev.data.items() if v is not None or k == "value"}
    assert bad.data["status_code"] == {
        "code": ua.StatusCodes.BadSensorFailure,
        "name": "BadSensorFailure",
    }
    assert bad.data["value"] is None and good.data["attributes"] == {"item": "I-1"}


def test_unknown_timestamps_are_left_out_and_time_falls_back_in_order():
    src = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    srv_t = src + timedelta(milliseconds=5)
    null = datetime(1601, 1, 1, tzinfo=UTC)
    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    # Part 6, 5.2.2.5: at or before 1601-01-01 and at or after 9999-12-31 mean "unknown"
    assert known(null) is None and known(far) is None
    assert known(datetime(9999, 12, 31, tzinfo=UTC)) is None
    assert known(datetime(1601, 1, 1, 0, 0, 1, tzinfo=UTC)) is not None
    assert known(src.replace(tzinfo=None)) == src  # naive is UTC
    assert event_time(_sample(1, src=src, srv=srv_t)) == (src, "source")
    assert event_time(_sample(1, src=None, srv=srv_t)) == (srv_t, "server")
    s = _sample(1, src=None, srv=None)
    assert event_time(s) == (s.received, "received")
    # a known but unbelievable clock (never set: 1970) is kept in data, not used for time
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert event_time(_sample(1, src=epoch, srv=srv_t)) == (srv_t, "server")
    node = NodeConfig(node_id="ns=1;s=P")
    m = NodeMapper(node, node_id="ns=1;s=P", browse_path=None, attributes={})
    [ev] = m.map(_sample(2.0, src=epoch, srv=None))
    assert ev.data["source_timestamp"].startswith("1970-01-01")
    assert "server_timestamp" not in ev.data and ev.data["time_basis"] == "received"
    assert vocabulary.validate_data(ev.type, ev.data)


def test_unknown_datetime_values_are_null():
    assert to_json(datetime(1601, 1, 1, tzinfo=UTC)) is None
    assert to_json(datetime(9999, 12, 31, 23, 59, 59)) is None
    assert to_json(datetime(2026, 1, 2, tzinfo=UTC)) == "2026-01-02T00:00:00.000000Z"


def test_repeated_initial_value_after_reconnect_is_not_emitted_twice():
    node = NodeConfig(node_id="ns=1;s=P")
    m = NodeMapper(node, node_id="ns=1;s=P", browse_path=None, attributes={})
    t = datetime.now(UTC)
    assert len(m.map(_sample(2.0, src=t, srv=t))) == 1
    assert m.map(_sample(2.0, src=t, srv=t + timedelta(seconds=5))) == []
    assert len(m.map(_sample(2.0, src=t + timedelta(seconds=1), srv=t))) == 1


def test_state_and_hold_tables():
    state = NodeConfig(
        node_id="ns=1;s=S",
        event="mfg.machine.state_changed",
        raw=False,
        states={"0": "idle", "1": "running", "true": "down"},
    )
    m = NodeMapper(state, node_id="ns=1;s=S", browse_path=None, attributes={"machine": "M1"})
    t = datetime.now(UTC)
    out = []
    for i, v in enumerate([0, 0.0, 1, 7, 1, True]):
        out += m.map(_sample(v, src=t + timedelta(seconds=i), srv=None))
    assert [(e.data["state"], e.data.get("previous_state")) for e in out] == [
        ("idle", None),
        ("running", "idle"),
        ("down", "running"),
    ]
    assert m.unmapped == 1
    hold = NodeConfig(node_id="ns=1;s=H", event="mfg.quality.hold", raw=False, hold_values=[2, 3])
    h = NodeMapper(hold, node_id="ns=1;s=H", browse_path=None, attributes={"item": "I"})
    out = []
    for i, v in enumerate([0, 2, 3, 1, 1, 2]):
        out += h.map(_sample(v, src=t + timedelta(seconds=i), srv=None))
    assert [e.type for e in out] == [
        "mfg.quality.hold_placed",
        "mfg.quality.hold_released",
        "mfg.quality.hold_placed",
    ]
    assert out[0].data["reason"] == "OPC UA hold signal ns=1;s=H = 2"
    # a bad value is no business event
    assert (
        h.map(_sample(0, ua.StatusCodes.BadCommunicationError, src=t + timedelta(days=1), srv=None))
        == []
    )

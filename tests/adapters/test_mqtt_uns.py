"""Unified namespace topics in the mqtt source, against a real mosquitto and the real Buffer:
an ISA-95 topic tree named by ``topic_template`` becomes subject, stream and location of
``mfg.signal.sampled`` events; value payloads as objects, bare JSON values and plain text."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.sources.mqtt import Config, build
from agent.buffer import Buffer
from agent.vocabulary import validate_data
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.mqtt_source import CTX, Publisher, running, wait_until

TEMPLATE = "{enterprise}/{site}/{area}/{line}/{cell}/{tag}"


def uns_config(broker: Mosquitto, **sub: Any) -> Config:
    return Config.model_validate(
        {
            "type": "mqtt",
            "url": broker.url,
            "client_id": "edge-agent-test-uns-values",
            "subscriptions": [{"topic": "acme/#", "topic_template": TEMPLATE, **sub}],
        }
    )


async def all_events(buf: Buffer) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for stream in buf.streams():
        rows = await buf.read_range(stream, 0, 1 << 62, 10_000)
        out[stream] = [orjson.loads(b) for _, _, b in rows]
    return out


async def test_uns_values_become_signals_with_subject_stream_and_location(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    buf = await Buffer.open(tmp_path / "b.db", plant="p", agent_id="a")
    publisher = Publisher(mosquitto)
    try:
        source = build("uns", uns_config(mosquitto, stream="{site}.{line}"), CTX)
        async with running(source, buf):
            topic = "acme/dallas/press/line1/cell4/temperature"
            await asyncio.to_thread(
                publisher.publish,
                topic,
                {"value": 71.5, "timestamp": 1764590400123, "unit": "°C", "quality": "good"},
            )
            await asyncio.to_thread(publisher.publish, "acme/dallas/press/line1/cell4/count", 42)
            await asyncio.to_thread(publisher.publish, "acme/dallas/press/line2/cell1/mode", b"RUN")
            await asyncio.to_thread(
                publisher.publish, "acme/dallas/press/line2/cell1/bad", {"v": 1}
            )
            await wait_until(
                lambda: (
                    source.state().detail["accepted"] == 3
                    and source.state().detail["messages"] == 4
                )
            )
        events = await all_events(buf)
    finally:
        publisher.close()
        await buf.close()
    assert set(events) == {"dallas.line1", "dallas.line2"}
    temp, count = events["dallas.line1"]
    assert temp["subject"] == "acme/dallas/press/line1/cell4/temperature"
    assert temp["time"] == "2025-12-01T12:00:00.123000Z"
    assert temp["data"]["value"] == 71.5
    assert temp["data"]["uom"] == "CEL" and temp["data"]["engineering_unit"] == "°C"
    assert (temp["data"]["plant"], temp["data"]["area"], temp["data"]["line"]) == (
        "dallas",
        "press",
        "line1",
    )
    assert temp["data"]["work_center"] == "cell4"
    assert temp["data"]["attributes"] == {"enterprise": "acme", "tag": "temperature"}
    assert temp["data"]["protocol"] == "mqtt"
    assert count["data"]["value"] == 42 and count["data"]["quality"] == "good"
    assert temp["data"]["time_basis"] == "source"
    assert count["data"]["time_basis"] == "received" and "source_timestamp" not in count["data"]
    (mode,) = events["dallas.line2"]
    assert mode["data"]["value"] == "RUN"
    for e in [*events["dallas.line1"], *events["dallas.line2"]]:
        assert validate_data(e["type"], e["data"]) == e["data"]
    # an object without "value" is refused, counted, acknowledged
    assert source.state().detail["rejected"] == {"no_value": 1}


@pytest.mark.parametrize(
    ("sub", "words"),
    [
        ({"topic_template": "{site}/+/{tag}"}, "whole level"),
        ({"topic_template": "{a}/{a}"}, "twice"),
        ({"topic_template": "{site}/{tag}", "stream": "{line}"}, "not a level"),
        ({"stream": "{site}"}, "needs a topic_template"),
        (
            {
                "topic_template": "{site}/{tag}",
                "mapping": {"constants": {"type": "mfg.signal.sampled"}},
            },
            "no mapping",
        ),
    ],
)
def test_uns_config_errors(sub: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Config.model_validate({"type": "mqtt", "subscriptions": [{"topic": "acme/#", **sub}]})

"""Drop folder source against the real Buffer: whole files or nothing, exactly once."""

from __future__ import annotations

import asyncio
import os
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.sources.drop_folder import Config, DropFolderSource, build
from adapters.sources.drop_folder.files import StabilityTracker, scan
from agent.buffer import Buffer
from agent.config import ConfigError, parse_config
from agent.registry import AdapterContext

STREAM = "mes_drop"
CTX = AdapterContext(agent_id="test-agent", plant="plant-test", state_dir=Path("."), version="0")


def event(n: int, *, wo: str = "WO-1", uom: str | None = "EA", **extra: Any) -> dict[str, Any]:
    good: dict[str, Any] = {"value": n}
    if uom is not None:
        good["uom"] = uom
    return {
        "type": "mfg.production.counted",
        "time": f"2026-11-23T10:00:{n % 60:02d}Z",
        "id": f"evt-{wo}-{n}",
        "data": {"work_order": wo, "item": "P-100", "good": good},
        **extra,
    }


def jsonl(*objs: Any) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def make_source(inbox: Path, **cfg: Any) -> DropFolderSource:
    config = Config.model_validate({"type": "drop_folder", "path": str(inbox), **cfg})
    source = build(STREAM, config, CTX)
    assert isinstance(source, DropFolderSource)
    return source


async def stored(buf: Buffer, stream: str = STREAM) -> list[dict[str, Any]]:
    rows = await buf.read_range(stream, 0, 1 << 62, 100_000)
    return [orjson.loads(body) for _, _, body in rows]


async def settle(source: DropFolderSource, buf: Buffer, polls: int = 2) -> None:
    """Two polls: the first sees a file, the second finds it unchanged and imports it."""
    for _ in range(polls):
        await source.poll_once(buf)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "drop"
    d.mkdir()
    return d


@pytest.fixture
async def buf(tmp_path: Path):
    b = await Buffer.open(tmp_path / "buffer.db", plant="plant-test", agent_id="test-agent")
    try:
        yield b
    finally:
        await b.close()


# ----------------------------------------------------------------------------- good files


async def test_good_jsonl_file_is_committed_in_order_and_moved(inbox: Path, buf: Buffer) -> None:
    (inbox / "batch1.jsonl").write_bytes(jsonl(*(event(i) for i in range(1, 6))))
    source = make_source(inbox)

    await settle(source, buf)

    events = await stored(buf)
    assert [e["data"]["good"]["value"] for e in events] == [1, 2, 3, 4, 5]
    assert {e["type"] for e in events} == {"mfg.production.counted"}
    assert [e["sequence"] for e in events] == [f"{i:020d}" for i in range(1, 6)]
    assert not (inbox / "batch1.jsonl").exists()
    assert (inbox / "processed" / "batch1.jsonl").exists()
    st = source.state()
    assert st.state == "connected"
    assert st.detail["accepted"] == 5 and st.detail["files_imported"] == 1
    assert st.detail["rejected"] == {}


async def test_blank_lines_are_skipped(inbox: Path, buf: Buffer) -> None:
    (inbox / "b.jsonl").write_bytes(b"\n" + jsonl(event(1)) + b"   \n" + jsonl(event(2)))
    source = make_source(inbox)
    await settle(source, buf)
    assert len(await stored(buf)) == 2


async def test_run_loop_polls_until_cancelled(inbox: Path, buf: Buffer) -> None:
    source = make_source(inbox, poll_interval="20ms")
    task = asyncio.create_task(source.run(buf))
    try:
        (inbox / "late.jsonl").write_bytes(jsonl(event(1), event(2)))
        async with asyncio.timeout(5):
            while not (inbox / "processed" / "late.jsonl").exists():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(await stored(buf)) == 2
    assert source.state().state == "stopped"


# ----------------------------------------------------------------------------- bad files


async def test_mixed_file_is_rejected_whole_with_a_report(inbox: Path, buf: Buffer) -> None:
    lines = [
        orjson.dumps(event(1)),
        orjson.dumps(event(2, uom=None)),  # quantity without unit of measure
        b"{not json",
        orjson.dumps(event(4)),
        orjson.dumps([1, 2]),
        orjson.dumps({**event(6), "type": "mfg.no.such.type"}),
    ]
    (inbox / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source = make_source(inbox)

    await settle(source, buf)

    assert await stored(buf) == []  # nothing of it, not even the good lines
    assert not (inbox / "mixed.jsonl").exists()
    assert (inbox / "rejected" / "mixed.jsonl").read_bytes() == b"\n".join(lines) + b"\n"
    report = (inbox / "rejected" / "mixed.jsonl.errors.txt").read_text()
    problem_lines = [ln for ln in report.splitlines() if ln.startswith("line ")]
    assert [ln.split(":")[0] for ln in problem_lines] == ["line 2", "line 3", "line 5", "line 6"]
    assert "data.good.uom" in problem_lines[0]
    assert "not valid JSON" in problem_lines[1]
    assert "expected one JSON object" in problem_lines[2]
    assert "mfg.no.such.type" in problem_lines[3]
    assert "nothing of it was imported" in report
    st = source.state()
    assert st.detail["rejected"] == {"invalid": 1}
    assert st.detail["accepted"] == 0
    assert "mixed.jsonl" in (st.last_error or "")


async def test_not_utf8_is_rejected(inbox: Path, buf: Buffer) -> None:
    (inbox / "latin1.jsonl").write_bytes(jsonl(event(1)) + b'{"x": "\xe4"}\n')
    source = make_source(inbox)
    await settle(source, buf)
    assert await stored(buf) == []
    report = (inbox / "rejected" / "latin1.jsonl.errors.txt").read_text()
    assert "line 2: not UTF-8" in report
    assert source.state().detail["rejected"] == {"encoding": 1}


async def test_too_large_file_is_rejected_without_reading(inbox: Path, buf: Buffer) -> None:
    (inbox / "big.jsonl").write_bytes(jsonl(*(event(i) for i in range(50))))
    source = make_source(inbox, max_file_size="1KiB")
    await settle(source, buf)
    assert await stored(buf) == []
    report = (inbox / "rejected" / "big.jsonl.errors.txt").read_text()
    assert "max_file_size = 1024" in report
    assert source.state().detail["rejected"] == {"too_large": 1}


async def test_rejected_name_clash_keeps_both(inbox: Path, buf: Buffer) -> None:
    source = make_source(inbox)
    for content in (b"{bad\n", b"[1]\n"):
        (inbox / "same.jsonl").write_bytes(content)
        await settle(source, buf)
    rejected = sorted(p.name for p in (inbox / "rejected").iterdir())
    assert len(rejected) == 4, rejected  # two files, two reports
    assert "same.jsonl" in rejected and "same.jsonl.errors.txt" in rejected


# ----------------------------------------------------------------------------- still writing


async def test_file_still_being_written_is_not_read_until_stable(inbox: Path, buf: Buffer) -> None:
    source = make_source(inbox)
    path = inbox / "growing.jsonl"
    with open(path, "wb") as f:  # noqa: ASYNC230
        f.write(jsonl(event(1)))
        f.flush()
        await source.poll_once(buf)  # first sighting
        f.write(orjson.dumps(event(2))[:20])  # half a line
        f.flush()
        await source.poll_once(buf)  # changed: not stable
        await source.poll_once(buf)  # unchanged once, now it would be read...
        # ...but it was read only if complete: we are still writing, so it must not be
        # imported with a truncated line. Make sure it was not:
        assert path.exists() and not (inbox / "rejected").exists(), "read while growing"
        f.write(orjson.dumps(event(2))[20:] + b"\n")
        f.flush()
        await source.poll_once(buf)
        assert await stored(buf) == []
    await source.poll_once(buf)
    assert [e["data"]["good"]["value"] for e in await stored(buf)] == [1, 2]
    assert (inbox / "processed" / "growing.jsonl").exists()


async def test_rename_convention_files_are_ignored(inbox: Path, buf: Buffer) -> None:
    for name in ("upload.jsonl.part", "upload.jsonl.tmp", ".upload.jsonl", "notes.txt"):
        (inbox / name).write_bytes(jsonl(event(1)))
    source = make_source(inbox)
    await settle(source, buf, polls=3)
    assert await stored(buf) == []
    assert sorted(p.name for p in inbox.iterdir()) == sorted(  # noqa: ASYNC240
        ["upload.jsonl.part", "upload.jsonl.tmp", ".upload.jsonl", "notes.txt"]
    )
    os.rename(inbox / "upload.jsonl.part", inbox / "upload.jsonl")
    await settle(source, buf)
    assert len(await stored(buf)) == 1


def test_stability_tracker_needs_two_equal_sightings(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("x")
    t = StabilityTracker()
    assert t.update(scan(tmp_path, ("*.jsonl",))) == []
    assert [p.name for p, _ in t.update(scan(tmp_path, ("*.jsonl",)))] == ["a.jsonl"]
    (tmp_path / "a.jsonl").write_text("xy")
    assert t.update(scan(tmp_path, ("*.jsonl",))) == []


# ----------------------------------------------------------------------------- CSV


async def test_csv_columns_are_mapped_with_type_column(inbox: Path, buf: Buffer) -> None:
    (inbox / "moves.csv").write_text(
        "Art;Zeit;Teil;Von;Nach;Menge;ME;Charge;Buchung\n"
        "mfg.inventory.moved;2026-11-23T10:00:00Z;P-7;LAGER-1;LINIE-2;12.5;KGM;L-9;B-1\n"
        "mfg.inventory.moved;2026-11-23T10:01:00+01:00;P-8;LAGER-1;LINIE-2;3;EA;;B-2\n",
        encoding="utf-8",
    )
    source = make_source(
        inbox,
        csv={"delimiter": ";"},
        mapping={
            "fields": {
                "Art": "type",
                "Zeit": "time",
                "Teil": "data.item",
                "Von": "data.from_location",
                "Nach": "data.to_location",
                "Menge": "data.quantity.value",
                "ME": "data.quantity.uom",
                "Charge": "data.lot",
                "Buchung": "id",
            }
        },
    )
    await settle(source, buf)
    events = await stored(buf)
    assert [e["type"] for e in events] == ["mfg.inventory.moved"] * 2
    assert events[0]["data"]["quantity"] == {"value": 12.5, "uom": "KGM"}
    assert events[0]["data"]["lot"] == "L-9"
    assert "lot" not in events[1]["data"]  # empty cell = absent
    assert events[1]["time"].startswith("2026-11-23T09:01:00")  # normalised to UTC
    assert (inbox / "processed" / "moves.csv").exists()


async def test_csv_fixed_type_and_bad_rows(inbox: Path, buf: Buffer) -> None:
    (inbox / "counts.csv").write_text(
        "time,data.work_order,data.item,data.good.value,data.good.uom\n"
        "2026-11-23T10:00:00Z,WO-1,P-1,5,EA\n"
        "2026-11-23T10:00:00Z,WO-1,P-1,5\n"
        "2026-11-23T10:00:00Z,WO-1,P-1,lots,EA\n"
        "2026-11-23T10:00:00Z,,P-1,5,EA\n"
    )
    source = make_source(inbox, mapping={"constants": {"type": "mfg.production.counted"}})
    await settle(source, buf)
    assert await stored(buf) == []
    report = (inbox / "rejected" / "counts.csv.errors.txt").read_text()
    lines = [ln for ln in report.splitlines() if ln.startswith("line ")]
    assert [ln.split(":")[0] for ln in lines] == ["line 3", "line 4", "line 5"]
    assert "cells but the header has 5 columns" in lines[0]
    assert "data.good.value" in lines[1]
    assert "data.work_order" in lines[2]

    (inbox / "counts2.csv").write_text(
        "time,data.work_order,data.item,data.good.value,data.good.uom\n"
        "2026-11-23T10:00:00Z,WO-1,P-1,5,EA\n"
    )
    await settle(source, buf)
    [ev] = await stored(buf)
    assert ev["type"] == "mfg.production.counted"
    assert ev["data"]["good"] == {"value": 5, "uom": "EA"}


# ----------------------------------------------------------------------------- exactly once


async def test_same_content_again_is_not_imported_twice(inbox: Path, buf: Buffer) -> None:
    body = jsonl(event(1), event(2))
    source = make_source(inbox)
    (inbox / "a.jsonl").write_bytes(body)
    await settle(source, buf)
    (inbox / "a-copy.jsonl").write_bytes(body)  # e.g. the MES re-sent the same file
    await settle(source, buf)
    assert len(await stored(buf)) == 2
    assert (inbox / "processed" / "a-copy.jsonl").exists()
    assert source.state().detail["files_already_imported"] == 1


async def test_events_with_known_mes_ids_are_not_stored_again(inbox: Path, buf: Buffer) -> None:
    source = make_source(inbox)
    (inbox / "a.jsonl").write_bytes(jsonl(event(1), event(2)))
    await settle(source, buf)
    # a corrected re-export: different bytes, two events the MES already sent (same ids)
    (inbox / "b.jsonl").write_bytes(jsonl(event(2), event(1), event(3)))
    await settle(source, buf)
    assert [e["data"]["good"]["value"] for e in await stored(buf)] == [1, 2, 3]
    assert source.state().detail["accepted"] == 3
    assert source.state().detail["duplicates"] == 2


async def test_committed_but_not_moved_is_only_moved_after_restart(
    inbox: Path, buf: Buffer
) -> None:
    """The state a crash between commit and move leaves: events and mark stored, file in
    the inbox. A new source instance (a restart) must only move it."""
    import hashlib

    body = jsonl(event(1), event(2), event(3))
    events_before = [
        __import__("adapters.sources.mes_common", fromlist=["x"]).parse_mes_payload(
            orjson.loads(line)
        )
        for line in body.splitlines()
    ]
    await buf.append(
        STREAM, events_before, marks=[(f"drop_folder:{STREAM}", hashlib.sha256(body).hexdigest())]
    )
    (inbox / "c.jsonl").write_bytes(body)
    source = make_source(inbox)
    await settle(source, buf)
    assert len(await stored(buf)) == 3
    assert (inbox / "processed" / "c.jsonl").exists()
    assert source.state().detail["files_already_imported"] == 1


async def test_buffer_full_leaves_the_file_and_retries(inbox: Path, tmp_path: Path) -> None:
    buf = await Buffer.open(
        tmp_path / "small.db", plant="p", agent_id="a", max_bytes=3000, on_full="block"
    )
    try:
        source = make_source(inbox)
        (inbox / "1.jsonl").write_bytes(jsonl(*(event(i) for i in range(5))))
        await settle(source, buf)
        assert len(await stored(buf)) == 5
        # does not fit in what is left: refused whole, the file stays
        (inbox / "2.jsonl").write_bytes(jsonl(*(event(i, wo="WO-2") for i in range(3))))
        await settle(source, buf, polls=3)
        assert (inbox / "2.jsonl").exists()
        assert source.state().detail["held_back"] >= 1
        assert "buffer full" in (source.state().last_error or "")

        # The sink drains the backlog: room again, the file goes in.
        batch = await buf.take_batch(STREAM, 0, 1000, 1 << 30)
        assert batch is not None
        await buf.ack(batch)
        assert buf.has_room()
        await source.poll_once(buf)
        assert not (inbox / "2.jsonl").exists()
        assert (inbox / "processed" / "2.jsonl").exists()
        rows = await buf.read_range(STREAM, buf.stream_state(STREAM)[1], 1 << 62, 1000)
        assert [orjson.loads(b)["data"]["work_order"] for _, _, b in rows] == ["WO-2"] * 3
    finally:
        await buf.close()


# ----------------------------------------------------------------------------- directory


async def test_missing_directory_is_an_error_state_then_recovers(
    tmp_path: Path, buf: Buffer
) -> None:
    inbox = tmp_path / "not-yet"
    source = make_source(inbox)
    await source.poll_once(buf)
    st = source.state()
    assert st.state == "error"
    assert "cannot list" in (st.last_error or "") and str(inbox) in (st.last_error or "")
    inbox.mkdir()
    (inbox / "x.jsonl").write_bytes(jsonl(event(1)))
    await settle(source, buf)
    assert source.state().state == "connected"
    assert len(await stored(buf)) == 1


async def test_move_failure_is_reported_and_retried_later(
    inbox: Path, buf: Buffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.sources.drop_folder import source as source_module

    monkeypatch.setattr(source_module, "FAILED_RETRY", 0.5)
    (inbox / "processed").write_text("a file where the directory should be")
    (inbox / "a.jsonl").write_bytes(jsonl(event(1)))
    source = make_source(inbox)
    await settle(source, buf)
    assert len(await stored(buf)) == 1  # committed, but it could not be moved
    st = source.state()
    assert st.state == "error" and "cannot move" in (st.last_error or "")
    await settle(source, buf)  # not retried at every poll
    assert (inbox / "a.jsonl").exists()

    (inbox / "processed").unlink()  # the operator fixes it
    await asyncio.sleep(0.5)
    await source.poll_once(buf)
    assert (inbox / "processed" / "a.jsonl").exists()
    assert len(await stored(buf)) == 1
    assert source.state().state == "connected"


# ----------------------------------------------------------------------------- config


def test_sample_toml_validates() -> None:
    sample = Path(__file__).parents[2] / "adapters/sources/drop_folder/sample.toml"
    raw = tomllib.loads(sample.read_text())
    raw["sinks"] = {"https": {"type": "https", "url": "https://gateway.example/v1/events"}}
    cfg = parse_config(raw)
    assert isinstance(cfg.sources["mes_drop"], Config)


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ({"patterns": ["*.xml"]}, "sources.d.patterns", "must end in .jsonl"),
        ({"processed_dir": "."}, "sources.d", "processed_dir must differ from path"),
        ({"csv": {"delimiter": ";;"}}, "sources.d.csv.delimiter", "one character"),
        ({"poll_interval": "soon"}, "sources.d.poll_interval", "not a duration"),
        ({"mapping": {"constants": {"type": "nope"}}}, "sources.d.mapping", "'nope'"),
        ({"bogus": 1}, "sources.d.bogus", "unknown key"),
    ],
)
def test_config_errors_name_key_and_fix(
    tmp_path: Path, body: dict[str, Any], key: str, words: str
) -> None:
    raw = {
        "sinks": {"https": {"type": "https", "url": "https://gw.example/v1"}},
        "sources": {"d": {"type": "drop_folder", "path": str(tmp_path), **body}},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key), str(err.value)
    assert words in str(err.value)
    assert "\n" not in str(err.value)

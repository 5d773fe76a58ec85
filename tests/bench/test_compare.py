"""The comparison's arithmetic and the counting receiver (cheap: no benchmark runs here)."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx

from bench.compare import summarize, table, verdict
from bench.receivers import CountingReceiver


def test_overlapping_ranges_are_within_noise() -> None:
    base, head = summarize([0.50, 0.60, 0.55]), summarize([0.58, 0.66, 0.62])
    v = verdict(base, head)
    assert base["median"] == 0.55 and head["median"] == 0.62
    assert v["change_percent"] == 12.7
    assert v["ranges_overlap"] is True
    assert v["verdict"] == "within noise"


def test_change_under_the_spread_is_within_noise() -> None:
    # no overlap, but a 10% change against a 19% spread on one side
    base, head = summarize([0.50, 0.60, 0.59]), summarize([0.65, 0.66, 0.655])
    v = verdict(base, head)
    assert v["ranges_overlap"] is False
    assert v["spread_percent"] > abs(v["change_percent"])
    assert v["verdict"] == "within noise"


def test_a_clear_drop_is_a_regression_and_a_clear_rise_an_improvement() -> None:
    base, head = summarize([0.60, 0.61, 0.62]), summarize([0.40, 0.41, 0.42])
    v = verdict(base, head)
    assert v["verdict"] == "regression" and v["change_percent"] == -32.8
    assert verdict(head, base)["verdict"] == "improvement"
    figures = {"ingest": {"base": base, "head": head, **v}}
    line = table(figures).splitlines()[1]
    assert line.split() == [
        "ingest",
        "0.610",
        "(0.600-0.620)",
        "0.410",
        "(0.400-0.420)",
        "-32.8%",
        "4.9%",  # the wider side: 0.02 of 0.41
        "regression",
    ]


def test_one_run_per_side_gives_no_verdict() -> None:
    v = verdict(summarize([0.6]), summarize([0.3]))
    assert v["verdict"].startswith("unknown")


def test_counting_receiver_counts_answers_2xx_and_records_byte_for_byte(tmp_path: Path) -> None:
    rx = CountingReceiver(record=True).start()
    try:
        body = gzip.compress(b'[{"id":"1"},{"id":"2"},{"id":"3"}]', 1)
        headers = {
            "Content-Encoding": "gzip",
            "Idempotency-Key": "01JBATCH",
            "X-Edge-First-Sequence": "00000000000000000005",
            "X-Edge-Last-Sequence": "00000000000000000007",
        }
        with httpx.Client() as c:
            for _ in range(2):  # keep-alive: both on one connection
                r = c.post(rx.url, content=body, headers=headers)
                assert r.status_code == 200
        got = rx.count()
        assert (got["requests"], got["events"], got["bytes"]) == (2, 6, 2 * len(body))
        assert isinstance(got["first_at"], float)  # the clock of the whole-agent figures
        recorded = rx.recorded(tmp_path / "r.pickle")
        assert len(recorded) == 2
        method, path, got_headers, got_body = recorded[0]
        assert (method, path, got_body) == ("POST", "/v1/batches", body)
        assert ("Idempotency-Key", "01JBATCH") in got_headers
        rx.reset()
        assert rx.count()["events"] == 0 and rx.count()["first_at"] is None
    finally:
        rx.stop()


def test_python_m_bench_rounds_report_the_median_run_and_the_spread() -> None:
    from bench.__main__ import median_of

    def run(r: float, v: float) -> dict[str, object]:
        return {"ingest": {"value": v, "raw": v / r, "ratio": r}, "disk": {"value": v}}

    got = median_of([run(0.5, 50.0), run(0.7, 70.0), run(0.6, 60.0)])
    assert got["ingest"] == {
        "value": 60.0,  # the median run's own value and raw, not a mix of runs
        "raw": 100.0,
        "ratio": 0.6,
        "ratio_runs": [0.5, 0.7, 0.6],
        "ratio_spread": [0.5, 0.7],
        "value_runs": [50.0, 70.0, 60.0],  # every run's own value too
    }
    assert got["disk"] == {"value": 60.0}  # no ratio: the last run
    # a figure whose target is an absolute rate reports the run with the median value
    by_value = median_of(
        [
            {"gw": {"value": v, "raw": 1.0, "ratio": r, "median_by": "value"}}
            for v, r in ((90.0, 0.9), (120.0, 0.3), (100.0, 0.5))
        ]
    )["gw"]
    assert (by_value["value"], by_value["ratio"]) == (100.0, 0.5)
    assert by_value["value_runs"] == [90.0, 120.0, 100.0]
    assert median_of([run(0.5, 50.0)])["ingest"] == {"value": 50.0, "raw": 100.0, "ratio": 0.5}

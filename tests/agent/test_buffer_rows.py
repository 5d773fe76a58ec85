"""agent/buffer/rows.py: a group's event rows in one statement per run, stored exactly as
executemany would store them."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer import MIGRATIONS, rows
from agent.ids import ulids

RUN_PREFIX = rows.INSERT_RUN.split(" SELECT")[0]
ROW_SQL = (
    "SELECT sid, seq, id, committed_at, size, body, ctl, typeof(sid), typeof(seq), typeof(id),"
    " typeof(committed_at), typeof(size), typeof(body), typeof(ctl) FROM events ORDER BY sid, seq"
)


def events_db(path: Path | str = ":memory:") -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.executescript(MIGRATIONS[0])
    return db


def stored(db: sqlite3.Connection) -> list[tuple[object, ...]]:
    return db.execute(ROW_SQL).fetchall()


def statements(db: sqlite3.Connection) -> list[str]:
    """The INSERTs db runs from now on: "run" (INSERT_RUN) or "one" (a row of executemany).
    The trace callback sees the SQL with its values filled in."""
    seen: list[str] = []

    def trace(sql: str) -> None:
        if sql.startswith(RUN_PREFIX):
            seen.append("run")
        elif sql.startswith("INSERT INTO events VALUES"):
            seen.append("one")

    db.set_trace_callback(trace)
    return seen


def make_rows(spec: list[tuple[int, int, float, int, bytes]]) -> list[rows.EventRow]:
    """(sid, seq, committed_at, ctl, body) -> rows with fresh ULIDs and the body's size."""
    ids = ulids(len(spec))
    return [
        (sid, seq, ids[i], at, len(body), body, ctl)
        for i, (sid, seq, at, ctl, body) in enumerate(spec)
    ]


def test_json_each_is_there() -> None:
    # the fast path is what every supported build runs; a build without json_each would
    # silently take executemany everywhere, so say so here
    assert rows.json_each_works()


def test_a_run_is_one_statement_and_stores_what_executemany_stores() -> None:
    body = [b'{"n":%d,"x":"%s"}' % (i, b"\xc3\xa9" * i) for i in range(500)]
    rs = make_rows([(3, 100 + i, 1.25, 0, b) for i, b in enumerate(body)])
    fast, slow = events_db(), events_db()
    seen = statements(fast)
    rows.insert_events(fast, rs)
    slow.executemany(rows.INSERT_ONE, rs)
    assert seen == ["run"]
    assert stored(fast) == stored(slow)
    assert stored(fast)[0][7:] == ("integer", "integer", "text", "real", "integer", "blob",
                                   "integer")  # fmt: skip


def test_runs_are_cut_where_stream_sequence_time_or_ctl_change() -> None:
    spec = [
        (1, 1, 1.0, 0, b"a"), (1, 2, 1.0, 0, b"bb"),  # run 1
        (2, 1, 1.0, 0, b"c"), (2, 2, 1.0, 0, b"d"),  # another stream
        (1, 4, 1.0, 0, b"e"), (1, 5, 1.0, 0, b"f"),  # a gap in seq
        (1, 6, 2.0, 0, b"g"), (1, 7, 2.0, 0, b"h"),  # another committed_at
        (1, 8, 2.0, 1, b"i"), (1, 9, 2.0, 1, b"j"),  # ctl rows
        (1, 10, 2.0, 0, b"k"),  # a run of one: executemany
    ]  # fmt: skip
    rs = make_rows(spec)
    fast, slow = events_db(), events_db()
    seen = statements(fast)
    rows.insert_events(fast, rs)
    slow.executemany(rows.INSERT_ONE, rs)
    assert seen == ["run"] * 5 + ["one"]
    assert stored(fast) == stored(slow)


def test_rows_the_run_cannot_carry_go_one_by_one() -> None:
    good = make_rows([(1, 1, 1.0, 0, b"a"), (1, 2, 1.0, 0, b"b")])
    odd_id = [(1, 3, "not-a-ulid", 1.0, 1, b"c", 0), (1, 4, "é" * 26, 1.0, 1, b"d", 0),
              # lengths that add up to 26 a row: cut by position they would be misread
              (1, 7, "A" * 25, 1.0, 1, b"g", 0), (1, 8, "B" * 27, 1.0, 1, b"h", 0)]  # fmt: skip
    wrong_size = [(1, 5, good[0][2][:-1] + "Z", 1.0, 7, b"e", 0),
                  (1, 6, good[1][2][:-1] + "Z", 1.0, 7, b"f", 0)]  # fmt: skip
    rs = good + odd_id + wrong_size
    fast, slow = events_db(), events_db()
    rows.insert_events(fast, rs)
    slow.executemany(rows.INSERT_ONE, rs)
    assert stored(fast) == stored(slow)


def test_a_long_group_is_cut_into_runs_of_bounded_size(monkeypatch) -> None:
    monkeypatch.setattr(rows, "RUN_ROWS", 7)
    monkeypatch.setattr(rows, "RUN_BYTES", 40)
    rs = make_rows([(1, i + 1, 1.0, 0, b"x" * (1 + i % 9)) for i in range(60)])
    fast, slow = events_db(), events_db()
    seen = statements(fast)
    rows.insert_events(fast, rs)
    slow.executemany(rows.INSERT_ONE, rs)
    assert stored(fast) == stored(slow)
    assert "one" not in seen and len(seen) >= 60 // 7


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 3),  # sid
            st.integers(0, 2),  # seq step (0: a duplicate key would be refused; see below)
            st.sampled_from([1.0, 1.5]),
            st.integers(0, 1),
            st.binary(min_size=0, max_size=64),
        ),
        max_size=40,
    )
)
def test_any_group_stores_the_same_rows(spec: list[tuple[int, int, float, int, bytes]]) -> None:
    last: dict[int, int] = {}
    laid: list[tuple[int, int, float, int, bytes]] = []
    for sid, step, at, ctl, body in spec:
        seq = last.get(sid, 0) + max(step, 1)
        last[sid] = seq
        laid.append((sid, seq, at, ctl, body))
    rs = make_rows(laid)
    fast, slow = events_db(), events_db()
    rows.insert_events(fast, rs)
    slow.executemany(rows.INSERT_ONE, rs)
    assert stored(fast) == stored(slow)


def test_a_duplicate_key_fails_the_statement_and_stores_nothing_of_it() -> None:
    rs = make_rows([(1, 1, 1.0, 0, b"a"), (1, 2, 1.0, 0, b"b")])
    db = events_db()
    db.execute(rows.INSERT_ONE, (1, 2, rs[0][2], 1.0, 1, b"z", 0))
    try:
        rows.insert_events(db, rs)
    except sqlite3.IntegrityError:
        pass
    else:
        raise AssertionError("a duplicate (sid, seq) was stored")
    assert [r[1] for r in stored(db)] == [2]


def test_the_insert_does_not_wait_for_a_busy_python_thread(tmp_path: Path) -> None:
    """The point of the module: while another thread runs Python without pause, a run of
    rows is ONE sqlite3_step (the GIL let go once), not one per row (each waiting for
    the busy thread's switch interval). Counted in steps, not timed: the trace callback
    sees one INSERT for 2,000 rows, and they are all there."""
    db = events_db(tmp_path / "b.db")
    rs = make_rows([(1, i + 1, 1.0, 0, b"{}" * 300) for i in range(2000)])
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin)
    t.start()
    try:
        seen = statements(db)
        db.execute("BEGIN IMMEDIATE")
        rows.insert_events(db, rs)
        db.execute("COMMIT")
    finally:
        stop.set()
        t.join()
    assert seen == ["run"]
    assert db.execute("SELECT count(*), sum(size) FROM events").fetchone() == (2000, 1_200_000)


def dedupe_rows_of(db: sqlite3.Connection) -> list[tuple[object, ...]]:
    return db.execute(
        "SELECT sid, source_event_id, seq, id, committed_at, typeof(source_event_id),"
        " typeof(seq) FROM dedupe ORDER BY sid, source_event_id"
    ).fetchall()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=0, max_size=30))
def test_dedupe_rows_are_stored_as_executemany_stores_them(keys: list[str]) -> None:
    """Any source event id, NUL and every plane of Unicode included (those JSON cannot
    carry exactly go one by one); a key twice keeps its first row (OR IGNORE)."""
    ids = ulids(len(keys))
    rs = [(1 + i % 2, k, i + 1, ids[i], 7.5) for i, k in enumerate(keys)]
    fast, slow = events_db(), events_db()
    rows.insert_dedupe(fast, rs)
    slow.executemany(rows.INSERT_DEDUPE_ONE, rs)
    assert dedupe_rows_of(fast) == dedupe_rows_of(slow)


def test_dedupe_rows_of_a_group_are_one_statement() -> None:
    keys = ["WO-1/1", 'quote " and \\ backslash', "ünïcödé", "tab\there", "😀"]
    ids = ulids(len(keys))
    rs = [(1, k, i + 1, ids[i], 7.5) for i, k in enumerate(keys)]
    fast, slow = events_db(), events_db()
    seen: list[str] = []
    fast.set_trace_callback(seen.append)
    rows.insert_dedupe(fast, rs)
    slow.executemany(rows.INSERT_DEDUPE_ONE, rs)
    assert len([s for s in seen if s.startswith("INSERT")]) == 1
    assert dedupe_rows_of(fast) == dedupe_rows_of(slow)
    nul = [(1, "a\0b", 9, ids[0], 7.5), (1, "a", 10, ids[1], 7.5)]
    rows.insert_dedupe(fast, nul)
    slow.executemany(rows.INSERT_DEDUPE_ONE, nul)
    assert dedupe_rows_of(fast) == dedupe_rows_of(slow)

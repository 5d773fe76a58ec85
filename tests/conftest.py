"""Shared fixtures. Each real peer has its own fixture module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.gateway",
    "tests.fixtures.mosquitto",
    "tests.fixtures.mqtt_sink",  # make_sink: MqttSink instances stopped at teardown
    "tests.fixtures.opcua_server",
]


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    """aiosqlite's worker threads are not daemons: a buffer a test left open (a failed test's
    traceback keeps it alive) would keep this process from ever exiting, and CI would wait
    for it until its time limit. Stop them, and fail the run when a passing one leaked."""
    import gc

    import aiosqlite

    conns = [c for c in gc.get_objects() if isinstance(c, aiosqlite.Connection)]
    for c in conns:  # a connection closed just now has a thread about to return
        if c._thread.is_alive():  # noqa: SLF001
            c._thread.join(timeout=1.0)  # noqa: SLF001
    leaked = [c for c in conns if c._thread.is_alive()]  # noqa: SLF001
    for conn in leaked:
        conn.stop()
    if leaked:
        print(f"\n{len(leaked)} aiosqlite connection(s) left open by tests: stopped")
        if session.exitstatus == 0:
            session.exitstatus = 1

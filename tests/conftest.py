"""Shared fixtures. Each real peer has its own fixture module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.gateway",
    "tests.fixtures.mosquitto",
    "tests.fixtures.mqtt_sink",  # make_sink: MqttSink instances stopped at teardown
    "tests.fixtures.opcua_server",
]


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    """A buffer a test left open (a failed test's traceback keeps it alive) keeps its SQL
    thread (agent/buffer/writer.py) and its file open: fail the run when a passing one
    leaked. A closed buffer has joined its thread."""
    import threading

    leaked = [t for t in threading.enumerate() if t.name.startswith("buffer-sql")]
    for t in leaked:  # a buffer closed just now has a thread about to return
        t.join(timeout=1.0)
    leaked = [t for t in leaked if t.is_alive()]
    if leaked:
        print(f"\n{len(leaked)} buffer(s) left open by tests (their SQL threads are alive)")
        if session.exitstatus == 0:
            session.exitstatus = 1

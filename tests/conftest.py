"""Shared fixtures. Each real peer has its own fixture module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.gateway",
    "tests.fixtures.mosquitto",
    "tests.fixtures.opcua_server",
]

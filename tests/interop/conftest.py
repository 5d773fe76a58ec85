"""The node-opcua sample server (an independent OPC UA implementation) for interop tests.

Installed by ``tests/interop/ensure_node_opcua.py`` (the test command runs it before pytest).
Started once per session: bound to 127.0.0.1 by a ``node -r`` preload (it has no host
option), with its PKI under the session's temp dir (XDG_CONFIG_HOME). A missing install is a
FAILURE with the command to run, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.node_opcua import (
    NodeOpcUaServer,
    start_node_opcua,
    stop_node_opcua,
)
from tests.fixtures.sparkplug_peers import tahu  # noqa: F401  (the Tahu edge node fixture)

collect_ignore_glob = ["node_modules/*"]


@pytest.fixture(scope="session")
def node_opcua_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeOpcUaServer]:
    srv = start_node_opcua(tmp_path_factory.mktemp("node-opcua"))
    try:
        yield srv
    finally:
        stop_node_opcua(srv)

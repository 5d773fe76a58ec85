"""Edge nodes we did not write, for the Sparkplug interop tests.

``TahuEdgeNode`` runs tests/interop/sparkplug/edge_node.cjs (Eclipse Tahu's JavaScript
``sparkplug-client`` from npm) as a process driven by JSON lines. ``Wire`` records what
crosses the broker on ``spBv1.0/#`` (our STATE, our NCMD rebirth requests), decoded with
the protobuf classes of the source under test only where a payload is Sparkplug.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mosquitto import Mosquitto

HERE = Path(__file__).resolve().parent / "sparkplug"
CLIENT = HERE / "node_modules" / "sparkplug-client" / "index.js"


class TahuEdgeNode:
    def __init__(self, broker: Mosquitto, group: str, edge: str, log: Path) -> None:
        node = shutil.which("node")
        if node is None or not CLIENT.is_file():
            pytest.fail(
                "Eclipse Tahu's sparkplug-client is not installed: run "
                "`python tests/interop/ensure_sparkplug_client.py` (needs Node.js 18+ and npm; "
                "Debian: apt-get install -y nodejs npm)",
                pytrace=False,
            )
        self.group, self.edge = group, edge
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [node, str(HERE / "edge_node.cjs"), f"mqtt://127.0.0.1:{broker.port}", group, edge],
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None and self.proc.poll() is None, "edge node exited"
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], count: int = 1, within: float = 20
    ) -> None:
        deadline = time.monotonic() + within
        with self._cond:
            while sum(1 for e in self.events if pred(e)) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"edge node events: {self.events[-10:]}")
                self._cond.wait(min(left, 0.2))

    def count(self, pred: Callable[[dict[str, Any]], bool]) -> int:
        with self._cond:
            return sum(1 for e in self.events if pred(e))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def tahu(tmp_path: Path) -> Any:
    nodes: list[TahuEdgeNode] = []

    def make(broker: Mosquitto, group: str = "Plant1", edge: str = "Line1") -> TahuEdgeNode:
        n = TahuEdgeNode(broker, group, edge, tmp_path / f"tahu-{edge}-{len(nodes)}.log")
        nodes.append(n)
        n.wait_for(lambda e: e.get("event") == "connected")
        return n

    try:
        yield make
    finally:
        for n in nodes:
            n.close()

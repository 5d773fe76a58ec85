"""The HTTP peers of the drain figures, each a subprocess of this process group: the counting
receiver (bench/counting_receiver.py) and the reference gateway (bench/gateway_host.py), plus
the raw client that replays the agent's own recorded requests byte for byte.

Nothing here imports agent/ or adapters/, so under ``python -m bench.compare`` both revisions
meet the same receivers and the same raw client.
"""

from __future__ import annotations

import json
import os
import pickle
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import HARNESS, REPO, _children

#: headers the raw client's own connection sets (httpx adds the same ones itself)
_CONNECTION_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def write_server_cert(d: Path) -> tuple[Path, Path, Path]:
    """A trustme CA and a loopback server certificate: (ca, cert, key) PEM files."""
    import trustme

    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert, key = d / "ca.pem", d / "server.pem", d / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return ca_file, cert, key


def _read_line(proc: subprocess.Popen[str], what: str, limit: float = 30) -> str:
    assert proc.stdout is not None
    end = time.monotonic() + limit
    line = proc.stdout.readline()  # the child prints one line once it listens, or exits
    if not line or time.monotonic() > end:
        raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
    return line.strip()


class CountingReceiver:
    """bench/counting_receiver.py on a free loopback port; ``tls`` = (ca, cert, key) or None."""

    def __init__(self, tls: tuple[Path, Path, Path] | None = None, record: bool = False) -> None:
        self.tls = tls
        self.record = record
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> CountingReceiver:
        cmd = [sys.executable, "-m", "bench.counting_receiver"]
        if self.tls:
            cmd += ["--cert", str(self.tls[1]), "--key", str(self.tls[2])]
        if self.record:
            cmd.append("--record")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        _children.append(self.proc)
        self.port = int(_read_line(self.proc, "counting receiver").rsplit(" ", 1)[1])
        return self

    @property
    def ca_file(self) -> Path | None:
        return self.tls[0] if self.tls else None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1/batches"

    def _control(self, method: str, path: str, body: bytes = b"") -> Any:
        verify: Any = ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else False
        url = self.url.rsplit("/v1/", 1)[0] + path
        r = httpx.request(method, url, content=body, verify=verify, timeout=60)
        r.raise_for_status()
        return r.json()

    def count(self) -> dict[str, Any]:
        return self._control("GET", "/_count")  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._control("POST", "/_reset")

    def recorded(self, path: Path) -> list[tuple[str, str, list[tuple[str, str]], bytes]]:
        """The requests recorded so far (then forgotten by the receiver)."""
        self._control("POST", "/_dump", str(path).encode())
        with open(path, "rb") as f:
            return pickle.load(f)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class GatewayHost:
    """The reference gateway (TLS) from the harness checkout, via bench/gateway_host.py."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.ca_file: Path | None = None
        self.db_path: Path | None = None

    def start(self) -> GatewayHost:
        env = dict(os.environ, PYTHONPATH=str(HARNESS))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.gateway_host", str(self.workdir)],
            cwd=HARNESS,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # not in _children (whose SIGKILL would orphan the gateway it started): the host
        # stops its gateway at end of input, which also comes when this process dies
        info = json.loads(_read_line(self.proc, "reference gateway", 60))
        self.url, self.ca_file, self.db_path = info["url"], Path(info["ca_file"]), info["db_path"]
        return self

    def count(self, stream: str) -> int:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"count {stream}\n")
        self.proc.stdin.flush()
        return int(_read_line(self.proc, "gateway count"))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)


async def replay(
    url: str, ca_file: Path | None, requests: list[tuple[str, str, list[tuple[str, str]], bytes]]
) -> float:
    """The raw limit: httpx POSTing the agent's recorded requests (same bodies, same headers,
    so the same gzip level), one at a time on one keep-alive connection like the agent.
    Returns events/s (events from the sequence headers)."""
    verify: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    prepared = []
    n = 0
    for _method, _path, headers, body in requests:
        h = [(k, v) for k, v in headers if k.lower() not in _CONNECTION_HEADERS]
        low = {k.lower(): v for k, v in h}
        n += int(low["x-edge-last-sequence"]) - int(low["x-edge-first-sequence"]) + 1
        prepared.append((h, body))
    if not prepared:
        raise RuntimeError("nothing recorded to replay: the agent sent no batch")
    async with httpx.AsyncClient(verify=verify, timeout=30) as c:
        t = time.perf_counter()
        for h, body in prepared:
            r = await c.post(url, content=body, headers=h)
            if r.status_code // 100 != 2:
                raise RuntimeError(f"receiver refused a raw batch: {r.status_code} {r.text[:200]}")
        return n / (time.perf_counter() - t)

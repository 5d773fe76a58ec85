"""The cheapest HTTP batch receiver there is: the raw limit for the HTTP(S) drain figures.

``python -m bench.counting_receiver [--cert PEM --key PEM] [--record]`` listens on a free
loopback port and prints ``listening on <port>``. Every POST is read to its end (keep-alive,
``Content-Length``), counted (events from the contract's ``X-Edge-First-Sequence`` and
``X-Edge-Last-Sequence`` headers, which every agent batch carries) and answered ``200`` with
an empty body: the contract's success response (docs/contract.md section 3, any 2xx). Nothing
is stored, parsed or decompressed, so the receiver costs as little as a server can.

With ``--record`` every batch request (method, path, headers, body) is kept in memory, so
the raw client can later replay the agent's own requests byte for byte. Control requests,
which are not counted:

    GET  /_count   -> {"requests": n, "events": n, "bytes": n, "first_at": monotonic or null}
    POST /_reset   zero the counters and stop recording
    POST /_dump    body = a file path: pickle the recorded requests there, then forget them

Imports nothing from agent/ or adapters/: both revisions of a comparison meet the same one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import ssl
import sys
import time
from typing import Any

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class State:
    def __init__(self, record: bool) -> None:
        self.record = record
        self.records: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.requests = self.events = self.bytes = 0
        #: time.monotonic() of the first batch since start or reset (system-wide clock)
        self.first_at: float | None = None


def _reply(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Counting(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = bytearray()
        self.head: tuple[str, str, list[tuple[str, str]]] | None = None
        self.need = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
                del self.buf[: end + 4]
                method, path, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:] if ln]
                self.head = (method, path, headers)  # type: ignore[assignment]
                low = {k.lower(): v for k, v in headers}
                if "chunked" in low.get("transfer-encoding", "").lower():
                    assert self.transport is not None
                    self.transport.write(
                        _reply(b'{"error":"chunked not supported"}', "411 Length Required")
                    )
                    self.transport.close()
                    return
                self.need = int(low.get("content-length", "0"))
            if len(self.buf) < self.need:
                return
            body = bytes(self.buf[: self.need])
            del self.buf[: self.need]
            method, path, headers = self.head
            self.head = None
            assert self.transport is not None
            self.transport.write(self.handle(method, path, headers, body))

    def handle(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        st = self.state
        if path == "/_count":
            return _reply(
                json.dumps(
                    {
                        "requests": st.requests,
                        "events": st.events,
                        "bytes": st.bytes,
                        "first_at": st.first_at,
                    }
                ).encode()
            )
        if path == "/_reset":
            st.requests = st.events = st.bytes = 0
            st.first_at = None
            st.record = False
            return _reply(b"{}")
        if path == "/_dump":
            with open(body.decode(), "wb") as f:
                pickle.dump(st.records, f, protocol=pickle.HIGHEST_PROTOCOL)
            n = len(st.records)
            st.records = []
            return _reply(json.dumps({"dumped": n}).encode())
        if method != "POST":
            return _reply(b'{"error":"POST batches here"}', "405 Method Not Allowed")
        first = last = None
        for k, v in headers:
            lk = k.lower()
            if lk == "x-edge-first-sequence":
                first = int(v)
            elif lk == "x-edge-last-sequence":
                last = int(v)
        if st.first_at is None:
            st.first_at = time.monotonic()
        st.requests += 1
        st.bytes += len(body)
        if first is not None and last is not None:
            st.events += last - first + 1
        if st.record:
            st.records.append((method, path, headers, body))
        return OK


async def serve(args: argparse.Namespace) -> None:
    state = State(args.record)
    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Counting(state), "127.0.0.1", args.port, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.counting_receiver", description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

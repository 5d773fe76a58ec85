"""A one-variable asyncua server for the Node-RED peer: ns=2;s=Seq counts up at RATE/s.
``python -m bench.peers_opcua_server PORT RATE COUNTER_FILE``; the last value written is
kept in COUNTER_FILE so the harness knows every value that existed."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from asyncua import Server, ua


async def main(port: int, rate: float, counter: Path) -> None:
    s = Server()
    await s.init()
    s.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    idx = await s.register_namespace("urn:bench")
    var = await s.nodes.objects.add_variable(
        ua.NodeId("Seq", idx), ua.QualifiedName("Seq", idx), 0, ua.VariantType.Int32
    )
    print(f"READY ns={idx}", flush=True)
    async with s:
        t0 = time.monotonic()
        i = 0
        end = t0 + 3600
        while time.monotonic() < end:
            i += 1
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await var.write_value(ua.Variant(i, ua.VariantType.Int32))
            if i % 10 == 0:
                counter.write_text(str(i))  # noqa: ASYNC240 (tiny file, 10 Hz)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])))

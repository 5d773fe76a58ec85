import asyncio
import sys
import time
from datetime import UTC, datetime

from asyncua import Server, ua

N = int(sys.argv[2])
PORT = int(sys.argv[1])


async def main():
    s = Server()
    await s.init()
    s.set_endpoint(f"opc.tcp://127.0.0.1:{PORT}/")
    idx = await s.register_namespace("urn:bench")
    vars_ = []
    for f in range(0, N, 250):
        folder = await s.nodes.objects.add_folder(
            ua.NodeId(f"F{f}", idx), ua.QualifiedName(f"F{f}", idx)
        )
        for i in range(f, min(N, f + 250)):
            vars_.append(
                await folder.add_variable(
                    ua.NodeId(f"V{i}", idx),
                    ua.QualifiedName(f"V{i}", idx),
                    0.0,
                    ua.VariantType.Double,
                )
            )
    print("READY", flush=True)
    async with s:
        n = 0
        while True:
            n += 1
            t0 = time.monotonic()
            ts = datetime.now(UTC)
            for v in vars_:
                await s.write_attribute_value(
                    v.nodeid,
                    ua.DataValue(
                        ua.Variant(float(n), ua.VariantType.Double),
                        SourceTimestamp=ts,
                        ServerTimestamp=ts,
                    ),
                )
            took = time.monotonic() - t0
            if n % 5 == 0:
                print(f"tick {n} took {took:.2f}s", file=sys.stderr, flush=True)
            await asyncio.sleep(max(0, 1 - took))


asyncio.run(main())

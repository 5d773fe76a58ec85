"""The MES side of the push figure, in its own process: POST batches, print events/s."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import orjson


def body(start: int, size: int) -> bytes:
    return orjson.dumps(
        [
            {
                "type": "mfg.production.completed",
                "time": "2026-11-23T10:15:02Z",
                "id": f"MES-{start + i}",
                "data": {
                    "work_order": "WO-4711",
                    "item": "PN-100",
                    "good": {"value": 480, "uom": "EA"},
                },
            }
            for i in range(size)
        ]
    )


async def main(url: str, n: int, size: int, conc: int) -> None:
    bodies = [body(s, size) for s in range(0, n, size)]
    accepted = 0
    async with httpx.AsyncClient(timeout=60) as c:
        queue = list(reversed(bodies))
        deadline = time.monotonic() + 300

        async def worker() -> None:
            nonlocal accepted
            while queue and time.monotonic() < deadline:
                b = queue.pop()
                r = await c.post(url, content=b, headers={"Content-Type": "application/json"})
                if r.status_code != 202:
                    raise RuntimeError(f"push refused: {r.status_code} {r.text[:200]}")
                accepted += size

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        el = time.perf_counter() - t
    print(f"{accepted} {accepted / el}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))

"""An edge node that only publishes, for bench/sparkplug.py (a child process, own GIL).

    python -m bench.sparkplug_publisher HOST PORT EDGE MESSAGES METRICS RATE

NBIRTH with METRICS Double metrics (aliases 1..METRICS), then MESSAGES NDATA payloads of
METRICS alias-only values each, seq incrementing mod 256, at RATE payloads/s (0: as fast as
the socket takes them). Payloads are encoded before the clock starts. Prints "done".
"""

from __future__ import annotations

import sys
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from adapters.sources.sparkplug import payload as sp


def payloads(messages: int, metrics: int) -> tuple[bytes, list[bytes]]:
    now = int(time.time() * 1000)
    birth = sp.Payload()
    birth.timestamp, birth.seq = now, 0
    m = birth.metrics.add()
    m.name, m.datatype, m.long_value = "bdSeq", sp.DATATYPE_CODES["UInt64"], 0
    for a in range(1, metrics + 1):
        m = birth.metrics.add()
        m.name, m.alias, m.datatype, m.double_value = f"Tag{a:03d}", a, 10, 0.0
        m.timestamp = now
    data = []
    for i in range(messages):
        p = sp.Payload()
        p.timestamp, p.seq = now + i, (i + 1) % 256
        for a in range(1, metrics + 1):
            x = p.metrics.add()
            x.alias, x.timestamp, x.double_value = a, now + i, i + a / 1000
        data.append(p.SerializeToString())
    return birth.SerializeToString(), data


def main() -> None:
    host, port, edge = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    messages, metrics, rate = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    birth, data = payloads(messages, metrics)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{edge}")
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    c.publish(f"spBv1.0/Bench/NBIRTH/{edge}", birth, qos=0).wait_for_publish(10)
    topic = f"spBv1.0/Bench/NDATA/{edge}"
    t0 = time.perf_counter()
    for i, body in enumerate(data):
        info = c.publish(topic, body, qos=0)
        if rate > 0:
            delay = t0 + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        elif i % 200 == 0:
            info.wait_for_publish(10)
    info.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()
    print("done", flush=True)


if __name__ == "__main__":
    main()

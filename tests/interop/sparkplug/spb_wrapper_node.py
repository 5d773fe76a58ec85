"""An edge node on mqtt-spb-wrapper (PyPI), a second Sparkplug B implementation we did not
write, for the interop tests. Runs in its own venv (tests/interop/sparkplug/.venv: the
package pins paho-mqtt 1.6.1 and protobuf 3.20.3), installed by
tests/interop/ensure_sparkplug_client.py.

    .venv/bin/python spb_wrapper_node.py HOST PORT GROUP EDGE_NODE COUNT

Connects, publishes NBIRTH with metrics Count (Int) and Speed (Float/Double) and an
attribute, then COUNT NDATA messages (Count = 1..COUNT, Speed = 1.5 * Count), then
disconnects cleanly (NDEATH). Prints one JSON line per step.
"""

import json
import sys
import time

from mqtt_spb_wrapper import MqttSpbEntityEdgeNode

host, port, group, edge, count = (
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3],
    sys.argv[4],
    int(sys.argv[5]),
)
node = MqttSpbEntityEdgeNode(group, edge)
node.attributes.set_value("Model", "spb-wrapper test node")
node.data.set_value("Count", 0)
node.data.set_value("Speed", 0.0)
node.connect(host, port)
deadline = time.monotonic() + 20
while not node.is_connected():
    if time.monotonic() > deadline:
        print(json.dumps({"event": "error", "text": "not connected"}), flush=True)
        sys.exit(1)
    time.sleep(0.05)
print(json.dumps({"event": "connected"}), flush=True)
node.publish_birth()
for i in range(1, count + 1):
    time.sleep(0.05)
    node.data.set_value("Count", i)
    node.data.set_value("Speed", i * 1.5)
    node.publish_data()
print(json.dumps({"event": "sent", "count": count}), flush=True)
time.sleep(0.3)
node.disconnect()
print(json.dumps({"event": "stopped"}), flush=True)

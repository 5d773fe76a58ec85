"""MQTT sink: batches as QoS 1 PUBLISHes to ``<prefix>/<plant>/<stream>`` (wire contract §4)."""

from adapters.sinks.mqtt.config import Config
from adapters.sinks.mqtt.sink import MqttSink, build

__all__ = ["Config", "MqttSink", "build"]

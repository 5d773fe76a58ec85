"""paho's Client, reading its socket 64 KiB at a time instead of a few bytes at a time.

Why: paho 2.x reads each packet with one ``recv`` for the command byte, one per byte of
the remaining length and one for the body, and handles one packet per ``select`` at QoS 0:
four or five system calls per Sparkplug message, each dropping the GIL and taking it back
from the event loop's thread while that one decodes and maps. The profile of the source
(docs/performance.md, issue 12) put paho's thread at 4-7 us per metric against the whole
raw paho + protobuf subscriber's 3-4; with this read-ahead it spends 2-2.5.

How: ``_sock_recv`` serves paho's small reads from the last chunk read from the socket;
``loop_read`` keeps handling packets until that chunk is used up, so it never returns
with bytes of ours left over and paho's ``select`` never waits on data we already hold.
After MAX_PACKETS it stops reading the socket (the chunk's last bytes go into paho's
partial packet, the rest of it comes with the next select), so that writes (PUBACKs after
commit, STATE, rebirth requests) and keepalives still get their turn under a steady
flood. A chunk belongs to the socket it came from: after a reconnect it is dropped. Everything else is paho's own (TLS, reconnects, the wire format); the two methods
overridden are paho's private ones of 2.1-2.2 (pyproject pins paho-mqtt < 3), and
tests/adapters/test_sparkplug_client.py holds them to paho's behaviour.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

#: bytes asked of the socket at a time
CHUNK = 65536
#: packets handled in one loop_read at most (then paho writes and checks its keepalive)
MAX_PACKETS = 1000


class ReadAheadClient(paho.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ra_buf = b""
        self._ra_pos = 0
        self._ra_sock: Any = None
        #: set once a loop_read has handled MAX_PACKETS: use up the chunk, read no more
        self._ra_enough = False

    def _buffered(self) -> bool:
        sock = self._sock
        return sock is not None and sock is self._ra_sock and self._ra_pos < len(self._ra_buf)

    def _sock_recv(self, bufsize: int) -> bytes:
        pos, buf = self._ra_pos, self._ra_buf
        if pos >= len(buf) or self._ra_sock is not self._sock:
            if self._ra_enough:
                raise BlockingIOError  # paho: "nothing more for now", back to its select
            buf = super()._sock_recv(max(bufsize, CHUNK))  # BlockingIOError: nothing yet
            if not buf:
                return buf  # the broker closed the connection: paho handles it
            self._ra_buf, self._ra_sock, pos = buf, self._sock, 0
        self._ra_pos = pos + bufsize
        return buf[pos : pos + bufsize]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        handled = 1
        try:
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffered():
                handled += 1
                if handled > MAX_PACKETS:
                    self._ra_enough = True
                rc = super().loop_read(max_packets)
        finally:
            self._ra_enough = False
        return rc

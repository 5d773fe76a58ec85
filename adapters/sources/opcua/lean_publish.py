"""A leaner decode of PublishResponses: data changes as plain tuples, not asyncua objects.

Why: for 10,000 items at 1 Hz, asyncua's generic decoder builds per notification a
MonitoredItemNotification, a DataValue, a Variant (whose ``__post_init__`` guesses and
checks its type), a StatusCode and two datetimes (a timedelta addition each), and the
source then reads five fields back out of them. That decode was about 40% of the source's
whole CPU (py-spy, docs/performance.md, issue 14). Here the DataChangeNotification body is
read with ``struct.unpack_from`` into ``(client_handle, value, variant_type_name,
status_code, source_timestamp, server_timestamp)`` tuples, and the few distinct
timestamps of a tick become datetimes once each (asyncua's own ``win_epoch_to_datetime``).

What it returns is what asyncua's decode would give, read through the same fields
(tests/adapters/test_opcua_lean_publish.py holds the two side by side): everything that is
not the common case is left to asyncua itself, for the whole notification it appears in:
arrays and matrices, variant types other than Null, the numbers and String, picoseconds,
and any ExtensionObject that is not a DataChangeNotification (status changes, events).
Malformed data goes to asyncua too, which raises as it always did.

``install(client)`` puts this decode into the client's session in place of asyncua's
``UaSession.publish`` (same request, same acknowledgements, same error on a parse
failure); with an asyncua whose session does not look like 2.x's it leaves the stock path
in place and says so, and the source works exactly as before (with ua.DataChangeNotification).
"""

from __future__ import annotations

import logging
import struct
from datetime import datetime
from typing import Any

from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import (
    extensionobject_from_binary,
    from_binary,
    get_string_encoding,
    nodeid_from_binary,
    struct_from_binary,
    unpack_uatype_array,
)
from asyncua.ua.uaerrors import UaStructParsingError
from asyncua.ua.uatypes import win_epoch_to_datetime

log = logging.getLogger("edge_agent.source.opcua")

#: (client_handle, value, variant type name, status code, source ts, server ts)
Change = tuple[int, Any, str | None, int, datetime | None, datetime | None]

_DCN = ua.FourByteNodeId(ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary)  # type: ignore[arg-type,attr-defined]
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_HEAD = struct.Struct("<IB")  # ClientHandle, DataValue encoding mask
_BOOL = struct.Struct("<?")

#: scalar variant types read here: type id -> (struct, name); the rest go to asyncua
_SCALARS: dict[int, tuple[struct.Struct, str]] = {
    1: (_BOOL, "Boolean"),
    2: (struct.Struct("<b"), "SByte"),
    3: (struct.Struct("<B"), "Byte"),
    4: (struct.Struct("<h"), "Int16"),
    5: (struct.Struct("<H"), "UInt16"),
    6: (_I32, "Int32"),
    7: (_U32, "UInt32"),
    8: (_I64, "Int64"),
    9: (struct.Struct("<Q"), "UInt64"),
    10: (struct.Struct("<f"), "Float"),
    11: (struct.Struct("<d"), "Double"),
}
_DOUBLE = _SCALARS[11][0]
_NULL = "Null"


class DataChanges:
    """A DataChangeNotification decoded by :func:`data_changes`: its items as tuples."""

    __slots__ = ("diagnostic_infos", "items")

    def __init__(self, items: list[Change], diagnostic_infos: list[Any] | None) -> None:
        self.items = items
        self.diagnostic_infos = diagnostic_infos

    def __repr__(self) -> str:
        return f"DataChanges({len(self.items)} items)"


class _NotCommon(Exception):
    """Something this decoder leaves to asyncua."""


def data_changes(body: bytes) -> DataChanges:
    """A DataChangeNotification's body as tuples; raises _NotCommon (or a struct/index
    error on malformed data) where asyncua has to decode it."""
    (n,) = _I32.unpack_from(body, 0)
    pos = 4
    out: list[Change] = []
    append = out.append
    times: dict[int, datetime] = {}  # the items of one tick share their timestamps
    head = _HEAD.unpack_from
    i64 = _I64.unpack_from
    for _ in range(n):
        handle, mask = head(body, pos)
        pos += 5
        if mask & 0x30:  # picoseconds
            raise _NotCommon
        if mask & 1:
            kind = body[pos]
            pos += 1
            if kind == 11:
                (value,) = _DOUBLE.unpack_from(body, pos)
                pos += 8
                vt = "Double"
            elif kind in _SCALARS:
                st, vt = _SCALARS[kind]
                (value,) = st.unpack_from(body, pos)
                pos += st.size
            elif kind == 12:
                (size,) = _I32.unpack_from(body, pos)
                pos += 4
                if size == -1:
                    value = None
                else:
                    end = pos + size
                    if size < -1 or end > len(body):
                        raise _NotCommon
                    value = body[pos:end].decode(get_string_encoding(), errors="surrogateescape")
                    pos = end
                vt = "String"
            elif kind == 0:
                value, vt = None, _NULL
            else:  # other types, arrays (0x80), dimensions (0x40)
                raise _NotCommon
        else:
            value, vt = None, _NULL
        code = 0
        if mask & 2:
            (code,) = _U32.unpack_from(body, pos)
            pos += 4
        src = srv = None
        if mask & 4:
            (raw,) = i64(body, pos)
            pos += 8
            src = times.get(raw)
            if src is None:
                src = times[raw] = win_epoch_to_datetime(raw)
        if mask & 8:
            (raw,) = i64(body, pos)
            pos += 8
            srv = times.get(raw)
            if srv is None:
                srv = times[raw] = win_epoch_to_datetime(raw)
        append((handle, value, vt, code, src, srv))
    rest = Buffer(body, pos)
    diagnostics = unpack_uatype_array(ua.VariantType.DiagnosticInfo, rest)
    if len(rest):
        raise _NotCommon  # trailing bytes: let asyncua judge
    return DataChanges(out, diagnostics)


def _notification(data: Buffer) -> Any:
    """One NotificationData ExtensionObject: DataChanges when it is the common case, else
    exactly what asyncua makes of it."""
    peek = data.copy()
    typeid = nodeid_from_binary(peek)
    encoding = ord(peek.read(1))
    if typeid == _DCN and encoding & 1:
        (length,) = _I32.unpack(peek.read(4))
        if length >= 1:
            body = peek.read(length)
            data.skip(peek.cur_pos - data.cur_pos)
            try:
                return data_changes(body)
            except Exception:  # noqa: BLE001 - anything unusual is asyncua's to decode
                return from_binary(ua.DataChangeNotification, Buffer(body))
    return extensionobject_from_binary(data)


def decode_publish_response(data: Buffer) -> ua.PublishResponse:
    """struct_from_binary(ua.PublishResponse, data), with data changes as DataChanges."""
    typeid = nodeid_from_binary(data)
    header = struct_from_binary(ua.ResponseHeader, data)
    sub_id = _U32.unpack(data.read(4))[0]
    available = unpack_uatype_array(ua.VariantType.UInt32, data)
    more = _BOOL.unpack(data.read(1))[0]
    seq = _U32.unpack(data.read(4))[0]
    publish_time = win_epoch_to_datetime(_I64.unpack(data.read(8))[0])
    (count,) = _I32.unpack(data.read(4))
    notes = [_notification(data) for _ in range(count)]
    results = unpack_uatype_array(ua.VariantType.StatusCode, data)
    diagnostics = unpack_uatype_array(ua.VariantType.DiagnosticInfo, data)
    return ua.PublishResponse(
        TypeId=typeid,
        ResponseHeader=header,
        Parameters=ua.PublishResult(
            SubscriptionId=sub_id,
            AvailableSequenceNumbers=available,  # type: ignore[arg-type]
            MoreNotifications=more,
            NotificationMessage=ua.NotificationMessage(
                SequenceNumber=seq, PublishTime=publish_time, NotificationData=notes
            ),
            Results=results,  # type: ignore[arg-type]
            DiagnosticInfos=diagnostics,  # type: ignore[arg-type]
        ),
    )


def install(client: Any) -> bool:
    """Decode this client's PublishResponses here. False (stock path kept) when its
    session is not asyncua 2.x's UaSession as this was written against."""
    session = getattr(getattr(client, "uaclient", None), "session", None)
    send = getattr(session, "_send_request", None)
    if session is None or send is None or not hasattr(session, "_publish_loop"):
        log.info("opcua: this asyncua has no UaSession.publish to replace; stock decode")
        return False

    async def publish(acks: list[ua.SubscriptionAcknowledgement]) -> ua.PublishResponse:
        # asyncua 2.1's UaSession.publish, but for the decode
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = acks if acks else []
        data = await send(request, timeout=0)
        try:
            return decode_publish_response(data)
        except Exception as ex:
            log.exception("opcua: error parsing a PublishResponse")
            raise UaStructParsingError from ex

    session.publish = publish
    return True

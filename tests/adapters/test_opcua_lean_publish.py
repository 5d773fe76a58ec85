"""The lean PublishResponse decode gives what asyncua's decode gives, field for field.

lean_publish reads data changes into tuples and leaves everything unusual to asyncua; both
decodes of the same bytes are compared here through the fields the source reads (value,
variant type name, status code, both timestamps), and the rest of the response as objects.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.sources.opcua.lean_publish import DataChanges, decode_publish_response

T0 = datetime(2026, 12, 2, 6, 0, 0, 123456, tzinfo=UTC)

SCALARS: list[tuple[ua.VariantType, Any]] = [
    (ua.VariantType.Boolean, st.booleans()),
    (ua.VariantType.SByte, st.integers(-128, 127)),
    (ua.VariantType.Byte, st.integers(0, 255)),
    (ua.VariantType.Int16, st.integers(-(2**15), 2**15 - 1)),
    (ua.VariantType.UInt16, st.integers(0, 2**16 - 1)),
    (ua.VariantType.Int32, st.integers(-(2**31), 2**31 - 1)),
    (ua.VariantType.UInt32, st.integers(0, 2**32 - 1)),
    (ua.VariantType.Int64, st.integers(-(2**63), 2**63 - 1)),
    (ua.VariantType.UInt64, st.integers(0, 2**64 - 1)),
    (ua.VariantType.Float, st.floats(width=32)),
    (ua.VariantType.Double, st.floats()),
    (ua.VariantType.String, st.one_of(st.none(), st.text(max_size=20))),
]
#: left to asyncua: other types, arrays
OTHERS: list[tuple[ua.VariantType, Any]] = [
    (ua.VariantType.DateTime, st.just(T0)),
    (ua.VariantType.ByteString, st.binary(max_size=8)),
    (ua.VariantType.LocalizedText, st.just(ua.LocalizedText("x", "en"))),
    (ua.VariantType.Double, st.lists(st.floats(), max_size=3)),
]


def fields_of(dv: Any) -> tuple[Any, ...]:
    """What the source reads from an asyncua DataValue (source.py's slow path)."""
    value = dv.Value.Value if dv.Value is not None else None
    vt = dv.Value.VariantType.name if dv.Value is not None else None
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    return value, vt, code, dv.SourceTimestamp, dv.ServerTimestamp


def norm(v: Any) -> Any:
    if isinstance(v, list):  # an array value: NaN inside it compares unequal too
        return [norm(x) for x in v]
    return "nan" if isinstance(v, float) and v != v else v  # noqa: PLR0124 - NaN test


def changes(notif: Any) -> list[tuple[Any, ...]]:
    if isinstance(notif, DataChanges):
        return [(h, *map(norm, rest)) for h, *rest in notif.items]
    return [(mi.ClientHandle, *map(norm, fields_of(mi.Value))) for mi in notif.MonitoredItems]


@st.composite
def datavalues(draw: Any, kinds: list[tuple[ua.VariantType, Any]]) -> ua.DataValue:
    vtype, values = draw(st.sampled_from(kinds))
    times = st.one_of(
        st.none(),
        st.just(T0),
        st.integers(-(10**6), 10**6).map(lambda us: T0 + timedelta(microseconds=us)),
        st.just(datetime(1601, 1, 1, tzinfo=UTC)),
        st.just(datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
    )
    dv = ua.DataValue(
        ua.Variant(draw(values), vtype),
        StatusCode=ua.StatusCode(draw(st.sampled_from([0, 0x40000000, 0x80000000, 0x00000480]))),
        SourceTimestamp=draw(times),
        ServerTimestamp=draw(times),
    )
    if draw(st.integers(0, 9)) == 0:
        dv.Value = None  # no value at all in the encoding mask
    if draw(st.integers(0, 9)) == 0:
        dv.StatusCode = None
    return dv


def response(dcns: list[list[ua.DataValue]], extra: list[Any] | None = None) -> bytes:
    data: list[Any] = [
        ua.DataChangeNotification(
            MonitoredItems=[
                ua.MonitoredItemNotification(ClientHandle=i + 1, Value=dv) for i, dv in enumerate(d)
            ]
        )
        for d in dcns
    ]
    data += extra or []
    msg = ua.NotificationMessage(SequenceNumber=7, PublishTime=T0, NotificationData=data)
    res = ua.PublishResponse(
        Parameters=ua.PublishResult(
            SubscriptionId=3,
            AvailableSequenceNumbers=[5, 6, 7],
            MoreNotifications=False,
            NotificationMessage=msg,
            Results=[ua.StatusCode(0)],
        )
    )
    return struct_to_binary(res)


def both(blob: bytes) -> tuple[ua.PublishResponse, ua.PublishResponse]:
    return struct_from_binary(ua.PublishResponse, Buffer(blob)), decode_publish_response(
        Buffer(blob)
    )


def same(blob: bytes) -> list[Any]:
    stock, lean = both(blob)
    assert lean.TypeId == stock.TypeId
    assert lean.ResponseHeader == stock.ResponseHeader
    sp, lp = stock.Parameters, lean.Parameters
    for f in ("SubscriptionId", "AvailableSequenceNumbers", "MoreNotifications", "Results"):
        assert getattr(lp, f) == getattr(sp, f), f
    assert lp.DiagnosticInfos == sp.DiagnosticInfos
    sm, lm = sp.NotificationMessage, lp.NotificationMessage
    assert (lm.SequenceNumber, lm.PublishTime) == (sm.SequenceNumber, sm.PublishTime)
    assert len(lm.NotificationData) == len(sm.NotificationData)
    for s, mine in zip(sm.NotificationData, lm.NotificationData, strict=True):
        if isinstance(s, ua.DataChangeNotification):
            assert changes(mine) == changes(s)
        else:
            assert mine == s
    return list(lm.NotificationData)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(datavalues(SCALARS), max_size=30), max_size=3))
def test_common_data_changes_decode_as_asyncua_does(dcns):
    notes = same(response(dcns))
    assert all(isinstance(n, DataChanges) for n in notes)


@settings(max_examples=100, deadline=None)
@given(st.lists(datavalues(SCALARS + OTHERS), min_size=1, max_size=20))
def test_anything_unusual_is_left_to_asyncua_for_the_whole_notification(dvs):
    same(response([dvs]))


def test_picoseconds_keep_asyncuas_decode():
    dv = ua.DataValue(ua.Variant(1.5, ua.VariantType.Double), SourceTimestamp=T0)
    dv.SourcePicoseconds = 7
    (note,) = same(response([[dv]]))
    assert isinstance(note, ua.DataChangeNotification)


def test_status_changes_events_and_keep_alives_are_asyncuas_objects():
    status = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    dv = ua.DataValue(ua.Variant(2.0, ua.VariantType.Double), SourceTimestamp=T0)
    notes = same(response([[dv]], [status]))
    assert isinstance(notes[0], DataChanges)
    assert notes[1] == status
    assert same(response([])) == []


def test_a_tick_shares_its_datetimes_and_keeps_the_bare_handles():
    dvs = [
        ua.DataValue(
            ua.Variant(float(i), ua.VariantType.Double), SourceTimestamp=T0, ServerTimestamp=T0
        )
        for i in range(100)
    ]
    (note,) = same(response([dvs]))
    assert isinstance(note, DataChanges)
    assert [h for h, *_ in note.items] == list(range(1, 101))
    assert len({id(src) for _, _, _, _, src, _ in note.items}) == 1


async def test_the_source_queues_the_same_records_from_either_decode(tmp_path):
    """_on_publish: lean DataChanges and asyncua's DataChangeNotification (what it gets for
    arrays, or from an asyncua it could not hook) become the same queued records."""
    import asyncio

    from adapters.sources.opcua import Config, build
    from agent.registry import AdapterContext

    cfg = Config.model_validate(
        {
            "endpoint": "opc.tcp://127.0.0.1:1",
            "nodes": [{"node_id": f"ns=2;s=V{i}"} for i in range(4)],
        }
    )
    dvs = [
        ua.DataValue(
            ua.Variant(1.5, ua.VariantType.Double), SourceTimestamp=T0, ServerTimestamp=T0
        ),
        ua.DataValue(ua.Variant("on", ua.VariantType.String), SourceTimestamp=T0),
        ua.DataValue(ua.Variant(None, ua.VariantType.Null), StatusCode=ua.StatusCode(0x80000000)),
        ua.DataValue(ua.Variant(7, ua.VariantType.UInt32)),
    ]
    blob = response([dvs])
    queued = []
    for decoded in both(blob):
        src = build("s", cfg, AdapterContext("a", "p", tmp_path, "test"))
        src._queue = asyncio.Queue()
        src._handles = {it.index + 1: it for it in src._items}
        await src._on_publish(decoded.Parameters)
        queued.append([src._queue.get_nowait()[1:6] for _ in range(4)])
        assert [type(n) for n in decoded.Parameters.NotificationMessage.NotificationData] in (
            [ua.DataChangeNotification],
            [DataChanges],
        )
    assert queued[0] == queued[1]
    assert queued[1][0] == (1.5, "Double", 0, T0, T0)
    assert queued[1][2] == (None, "Null", 0x80000000, None, None)

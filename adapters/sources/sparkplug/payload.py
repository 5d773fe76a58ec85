"""Sparkplug B payloads: decode the protobuf, and turn one metric's value into JSON.

The protobuf classes come from ``sparkplug_b.proto`` (written from the specification's
payload definition) compiled to ``sparkplug_b_pb2.py``; the upb runtime of the protobuf
package parses in C. Everything here is pure and synchronous, so the source, the watch
command and the bench share it.

Values are written the way the central side reads them best as JSON: integers as numbers
(signed types sign-extended as the specification encodes them in unsigned fields), DateTime
as RFC 3339 UTC text, Bytes and File as base64 text, arrays as JSON arrays, a DataSet as
``{"columns": [...], "types": [...], "rows": [[...], ...]}``. A Template instance is not a
value: the tracker flattens it into one metric per member (see tracker.py).
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from . import sparkplug_b_pb2

#: protoc's module builds its classes at import time: typed as Any for mypy
pb: Any = sparkplug_b_pb2
Payload: Any = pb.Payload
Metric: Any = pb.Payload.Metric

NAMESPACE = "spBv1.0"

#: DataType code -> name, as in the specification (Unknown = 0 ... DateTimeArray = 34)
DATATYPE_NAMES: dict[int, str] = {v.number: v.name for v in pb.DataType.DESCRIPTOR.values}
DATATYPE_CODES: dict[str, int] = {name: code for code, name in DATATYPE_NAMES.items()}

_INT_WIDTH = {1: 8, 2: 16, 3: 32, 5: 8, 6: 16, 7: 32}  # Int8..Int32, UInt8..UInt32
_SIGNED = {1, 2, 3, 4}
_ARRAY_FORMATS = {  # little-endian packed arrays of the 3.0 specification
    22: "b",
    23: "h",
    24: "i",
    25: "q",
    26: "B",
    27: "H",
    28: "I",
    29: "Q",
    30: "f",
    31: "d",
}


class Unsupported(Exception):
    """A metric value we cannot represent; ``reason`` is the counted reason."""

    def __init__(self, reason: str, text: str) -> None:
        self.reason = reason
        self.text = text
        super().__init__(text)


def decode(raw: bytes) -> Any:
    """Parse a Sparkplug B payload; raises ``Unsupported('not_protobuf', ...)``."""
    msg = Payload()
    try:
        msg.ParseFromString(raw)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise Unsupported("not_protobuf", f"not a Sparkplug B payload ({exc})") from None
    return msg


def ms_to_rfc3339(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def metric_value(metric: Any, datatype: int) -> Any:
    """The JSON value of ``metric`` read as ``datatype`` (from the metric or its birth).

    Raises Unsupported for a value that does not fit the datatype, for Template (the
    tracker flattens those), PropertySet types and extension values.
    """
    if metric.is_null:
        return None
    which = metric.WhichOneof("value")
    if which is None:
        return None
    if which == "extension_value":
        raise Unsupported("extension_value", "metric carries an extension value")
    reader = SCALAR_READERS.get(datatype)
    if reader is not None:
        if which != reader[0]:
            raise _mismatch(datatype, which)
        return reader[1](metric)
    if datatype == 13:  # DateTime: ms since the epoch
        if which != "long_value":
            raise _mismatch(datatype, which)
        return ms_to_rfc3339(int(metric.long_value))
    if datatype in (17, 18):  # Bytes, File
        if which != "bytes_value":
            raise _mismatch(datatype, which)
        return base64.b64encode(metric.bytes_value).decode("ascii")
    if datatype == 16:  # DataSet
        if which != "dataset_value":
            raise _mismatch(datatype, which)
        return dataset_value(metric.dataset_value)
    if 22 <= datatype <= 34:
        if which != "bytes_value":
            raise _mismatch(datatype, which)
        return array_value(datatype, bytes(metric.bytes_value))
    if datatype == 19:
        raise Unsupported("template", "a Template is flattened, not a value")
    name = DATATYPE_NAMES.get(datatype, str(datatype))
    raise Unsupported("unsupported_datatype", f"datatype {name} is not supported as a value")


def _int_reader(datatype: int) -> Callable[[Any], int]:
    bits = _INT_WIDTH[datatype]
    mask = (1 << bits) - 1
    if datatype in _SIGNED:
        return lambda m: _signed(int(m.int_value), bits)
    return lambda m: int(m.int_value) & mask


#: datatype -> (the oneof field its value must arrive in, the JSON value): the scalar
#: cases of metric_value as one lookup, which the tracker's hot path uses directly (a
#: metric that is null, empty or in another field goes through metric_value)
SCALAR_READERS: dict[int, tuple[str, Callable[[Any], Any]]] = {
    **{dt: ("int_value", _int_reader(dt)) for dt in _INT_WIDTH},
    4: ("long_value", lambda m: _signed(m.long_value, 64)),  # Int64
    8: ("long_value", lambda m: int(m.long_value)),  # UInt64
    9: ("float_value", lambda m: _finite(round_float(m.float_value))),  # Float
    10: ("double_value", lambda m: _finite(m.double_value)),  # Double
    11: ("boolean_value", lambda m: bool(m.boolean_value)),  # Boolean
    **{dt: ("string_value", lambda m: str(m.string_value)) for dt in (12, 14, 15)},
}


def round_float(v: float) -> float:
    """A 32-bit float as the shortest decimal that reads back the same (1.1, not 1.100000024)."""
    if not math.isfinite(v):
        return v
    f32 = _F32.unpack(_F32.pack(v))[0]
    for digits in (6, 7, 8):
        shorter = float(f"{f32:.{digits}g}")
        if _F32.unpack(_F32.pack(shorter))[0] == f32:
            return shorter
    return float(f32)


_F32 = struct.Struct("<f")


def _mismatch(datatype: int, which: str) -> Unsupported:
    return Unsupported(
        "value_mismatch",
        f"datatype {DATATYPE_NAMES.get(datatype, datatype)} carried in {which}",
    )


def array_value(datatype: int, raw: bytes) -> list[Any]:
    """The 3.0 array encodings: packed little-endian numbers, bit-packed booleans after a
    4-byte count, NUL-terminated UTF-8 strings, DateTime as int64 ms."""
    try:
        fmt = _ARRAY_FORMATS.get(datatype)
        if fmt is not None:
            size = struct.calcsize(fmt)
            if len(raw) % size:
                raise ValueError(f"{len(raw)} bytes is not a whole number of {size}-byte items")
            items = list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))
            if fmt == "f":
                return [_finite(round_float(x)) for x in items]
            if fmt == "d":
                return [_finite(x) for x in items]
            return items
        if datatype == 32:  # BooleanArray
            (count,) = struct.unpack_from("<I", raw)
            bits = raw[4:]
            if len(bits) * 8 < count:
                raise ValueError(f"{count} booleans need {math.ceil(count / 8)} bytes")
            return [bool(bits[i // 8] & (0x80 >> (i % 8))) for i in range(count)]
        if datatype == 33:  # StringArray
            if raw and not raw.endswith(b"\x00"):
                raise ValueError("strings must be NUL-terminated")
            return [s.decode("utf-8") for s in raw.split(b"\x00")[:-1]]
        if datatype == 34:  # DateTimeArray
            if len(raw) % 8:
                raise ValueError(f"{len(raw)} bytes is not a whole number of int64")
            return [ms_to_rfc3339(x) for x in struct.unpack(f"<{len(raw) // 8}q", raw)]
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise Unsupported("bad_array", f"{DATATYPE_NAMES[datatype]}: {exc}") from None
    raise Unsupported("unsupported_datatype", f"datatype {datatype} is not an array type")


def _dataset_cell(cell: Any, datatype: int) -> Any:
    which = cell.WhichOneof("value")
    if which is None:
        return None
    if which == "extension_value":
        raise Unsupported("extension_value", "a DataSet cell carries an extension value")
    if datatype in _INT_WIDTH and which == "int_value":
        bits = _INT_WIDTH[datatype]
        return _signed(cell.int_value, bits) if datatype in _SIGNED else int(cell.int_value)
    if datatype == 4 and which == "long_value":
        return _signed(cell.long_value, 64)
    if datatype == 13 and which == "long_value":
        return ms_to_rfc3339(int(cell.long_value))
    if which == "float_value":
        return _finite(round_float(cell.float_value))
    if which == "double_value":
        return _finite(cell.double_value)
    return getattr(cell, which)


def dataset_value(ds: Any) -> dict[str, Any]:
    types = list(ds.types)
    columns = list(ds.columns)
    if len(types) != len(columns):
        raise Unsupported("bad_dataset", f"{len(columns)} columns but {len(types)} types")
    rows = []
    for r, row in enumerate(ds.rows):
        if len(row.elements) != len(columns):
            raise Unsupported(
                "bad_dataset", f"row {r} has {len(row.elements)} cells for {len(columns)} columns"
            )
        rows.append([_dataset_cell(c, t) for c, t in zip(row.elements, types, strict=True)])
    return {
        "columns": columns,
        "types": [DATATYPE_NAMES.get(t, str(t)) for t in types],
        "rows": rows,
    }


def property_value(pv: Any) -> Any:
    """A scalar PropertyValue as JSON (nested property sets are not kept)."""
    if pv.is_null:
        return None
    which = pv.WhichOneof("value")
    if which in (None, "propertyset_value", "propertysets_value", "extension_value"):
        return None
    if which == "int_value" and pv.type in _INT_WIDTH:
        bits = _INT_WIDTH[pv.type]
        return _signed(pv.int_value, bits) if pv.type in _SIGNED else int(pv.int_value)
    if which == "long_value" and pv.type == 4:
        return _signed(pv.long_value, 64)
    if which == "float_value":
        return _finite(round_float(pv.float_value))
    return getattr(pv, which)


def properties(metric: Any) -> dict[str, Any]:
    if not metric.HasField("properties"):
        return {}
    ps = metric.properties
    return {k: property_value(v) for k, v in zip(ps.keys, ps.values, strict=False)}


def rebirth_request(timestamp_ms: int) -> bytes:
    """The NCMD payload that asks an edge node to publish its births again."""
    msg = Payload()
    msg.timestamp = timestamp_ms
    m = msg.metrics.add()
    m.name = "Node Control/Rebirth"
    m.timestamp = timestamp_ms
    m.datatype = DATATYPE_CODES["Boolean"]
    m.boolean_value = True
    return bytes(msg.SerializeToString())

"""Sparkplug B payloads: plain data in, protobuf bytes out, and back, with every value checked.

The wire format is the Sparkplug 3.0 specification's (``sparkplug_b.proto``
here, compiled with ``scripts/gen-sparkplug``); this module is the only
place that touches the generated classes. How values sit in the protobuf,
per datatype (as the specification and Eclipse Tahu's reference clients
write and read them)::

    Int8, Int16, Int32        int_value, two's complement in 32 bits
    UInt8, UInt16             int_value
    UInt32                    long_value (Tahu's clients write it there; int_value is read too)
    Int64                     long_value, two's complement in 64 bits
    UInt64, DateTime (ms)     long_value
    Float / Double            float_value / double_value
    Boolean                   boolean_value
    String, Text, UUID        string_value
    Bytes, File               bytes_value
    *Array (3.0)              bytes_value, little endian (decoded only)

A null value is ``is_null`` with the datatype and no value. Anything that
cannot be read (not protobuf, a value that does not fit its datatype, an
unknown datatype) raises ``PayloadError`` with the reason in one line.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

Value = bool | int | float | str | bytes | list[Any] | None

# How a factory-edge edge node marks its payloads (``Payload.uuid``), for its bridge: a data batch names its
# buffer seq (stored once, then confirmed on gw/{gw}/ack); a birth only repeats readings batches deliver.
BIRTH_UUID = "fe:birth"
BATCH_UUID = re.compile(r"^fe:(\d{1,19})$")


def batch_uuid(seq: int) -> str:
    return f"fe:{seq}"


class PayloadError(ValueError):
    """A Sparkplug payload that cannot be encoded or decoded; the message says why."""


class DataType(enum.IntEnum):
    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19
    PROPERTYSET = 20
    PROPERTYSETLIST = 21
    INT8_ARRAY = 22
    INT16_ARRAY = 23
    INT32_ARRAY = 24
    INT64_ARRAY = 25
    UINT8_ARRAY = 26
    UINT16_ARRAY = 27
    UINT32_ARRAY = 28
    UINT64_ARRAY = 29
    FLOAT_ARRAY = 30
    DOUBLE_ARRAY = 31
    BOOLEAN_ARRAY = 32
    STRING_ARRAY = 33
    DATETIME_ARRAY = 34


_INT_RANGES = {
    DataType.INT8: (-(2**7), 2**7 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT8: (0, 2**8 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, 2**64 - 1),
    DataType.DATETIME: (0, 2**64 - 1),
}
_ARRAYS = {  # element struct format, little endian
    DataType.INT8_ARRAY: "b",
    DataType.INT16_ARRAY: "h",
    DataType.INT32_ARRAY: "i",
    DataType.INT64_ARRAY: "q",
    DataType.UINT8_ARRAY: "B",
    DataType.UINT16_ARRAY: "H",
    DataType.UINT32_ARRAY: "I",
    DataType.UINT64_ARRAY: "Q",
    DataType.FLOAT_ARRAY: "f",
    DataType.DOUBLE_ARRAY: "d",
    DataType.DATETIME_ARRAY: "q",
}
_TEXT = (DataType.STRING, DataType.TEXT, DataType.UUID)
_NUMBER_TYPES = {DataType.FLOAT, DataType.DOUBLE}


@dataclass(frozen=True, slots=True)
class Metric:
    name: str | None
    datatype: DataType
    value: Value = None
    alias: int | None = None
    timestamp: int | None = None
    is_historical: bool = False
    is_transient: bool = False
    properties: dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Payload:
    metrics: list[Metric]
    timestamp: int | None = None
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None


# ---------------------------------------------------------------- encoding


def _pb() -> ModuleType:
    """The generated classes, imported on first use: a gateway without Sparkplug never loads protobuf."""
    from . import sparkplug_b_pb2

    return sparkplug_b_pb2


def encode(payload: Payload) -> bytes:
    """The protobuf bytes of ``payload``; PayloadError names the metric whose value does not fit."""
    message = _pb().Payload()
    if payload.timestamp is not None:
        message.timestamp = payload.timestamp
    if payload.seq is not None:
        message.seq = payload.seq
    if payload.uuid is not None:
        message.uuid = payload.uuid
    if payload.body is not None:
        message.body = payload.body
    for metric in payload.metrics:
        _encode_metric(metric, message.metrics.add())
    return message.SerializeToString()


def _encode_metric(metric: Metric, out: Any) -> None:
    if metric.name is not None:
        out.name = metric.name
    if metric.alias is not None:
        out.alias = metric.alias
    if metric.timestamp is not None:
        out.timestamp = metric.timestamp
    out.datatype = int(metric.datatype)
    if metric.is_historical:
        out.is_historical = True
    if metric.is_transient:
        out.is_transient = True
    if metric.properties:
        for key, value in metric.properties.items():
            out.properties.keys.append(key)
            _encode_property(value, out.properties.values.add(), f"{metric.name or metric.alias}.{key}")
    if metric.value is None:
        out.is_null = True
        return
    try:
        _set_value(out, metric.datatype, metric.value)
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        raise PayloadError(
            f"metric {metric.name or metric.alias}: {metric.value!r} is not a {metric.datatype.name}: {exc}"
        ) from None


def _set_value(out: Any, datatype: DataType, value: Value) -> None:
    if datatype in _INT_RANGES:
        if type(value) is not int:
            raise TypeError("not an integer")
        low, high = _INT_RANGES[datatype]
        if not low <= value <= high:
            raise ValueError("out of range")
        if datatype in (DataType.INT8, DataType.INT16, DataType.INT32, DataType.UINT8, DataType.UINT16):
            out.int_value = value & 0xFFFFFFFF
        else:
            out.long_value = value & 0xFFFFFFFFFFFFFFFF
    elif datatype is DataType.FLOAT:
        out.float_value = float(value)  # type: ignore[arg-type]
    elif datatype is DataType.DOUBLE:
        out.double_value = float(value)  # type: ignore[arg-type]
    elif datatype is DataType.BOOLEAN:
        if type(value) is not bool:
            raise TypeError("not true/false")
        out.boolean_value = value
    elif datatype in _TEXT:
        if not isinstance(value, str):
            raise TypeError("not text")
        out.string_value = value
    elif datatype in (DataType.BYTES, DataType.FILE):
        if not isinstance(value, bytes):
            raise TypeError("not bytes")
        out.bytes_value = value
    else:
        raise ValueError(f"datatype {datatype.name} is not written by this implementation")


def _encode_property(value: Value, out: Any, where: str) -> None:
    if value is None:
        out.type, out.is_null = int(DataType.STRING), True
    elif type(value) is bool:
        out.type, out.boolean_value = int(DataType.BOOLEAN), value
    elif type(value) is int:
        out.type, out.int_value = int(DataType.INT32), value & 0xFFFFFFFF
        if not -(2**31) <= value < 2**31:
            out.type, out.long_value = int(DataType.INT64), value & 0xFFFFFFFFFFFFFFFF
    elif type(value) is float:
        out.type, out.double_value = int(DataType.DOUBLE), value
    elif isinstance(value, str):
        out.type, out.string_value = int(DataType.STRING), value
    else:
        raise PayloadError(f"property {where}: {type(value).__name__} values are not written")


# ---------------------------------------------------------------- decoding


def decode(data: bytes) -> Payload:
    """A payload from its bytes; PayloadError says what is wrong with them."""
    from google.protobuf.message import DecodeError

    message = _pb().Payload()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError) as exc:
        raise PayloadError(f"not a Sparkplug B payload: {exc or 'protobuf refused it'}") from None
    metrics = [_decode_metric(m, i) for i, m in enumerate(message.metrics)]
    return Payload(
        metrics=metrics,
        timestamp=message.timestamp if message.HasField("timestamp") else None,
        seq=message.seq if message.HasField("seq") else None,
        uuid=message.uuid if message.HasField("uuid") else None,
        body=message.body if message.HasField("body") else None,
    )


def _decode_metric(m: Any, index: int) -> Metric:
    name = m.name if m.HasField("name") else None
    where = f"metric {name!r}" if name is not None else f"metric #{index}"
    if m.HasField("alias") and name is None:
        where = f"metric alias {m.alias}"
    try:
        datatype = DataType(m.datatype) if m.HasField("datatype") else DataType.UNKNOWN
    except ValueError:
        raise PayloadError(f"{where}: unknown datatype {m.datatype}") from None
    value: Value = None
    if not m.is_null and m.WhichOneof("value") is not None:
        value = _value(m, datatype, where)
    properties: dict[str, Value] = {}
    if m.HasField("properties"):
        keys, values = m.properties.keys, m.properties.values
        if len(keys) != len(values):
            raise PayloadError(f"{where}: {len(keys)} property names for {len(values)} values")
        for key, pv in zip(keys, values):
            properties[key] = _property(pv)
    return Metric(
        name=name,
        datatype=datatype,
        value=value,
        alias=m.alias if m.HasField("alias") else None,
        timestamp=m.timestamp if m.HasField("timestamp") else None,
        is_historical=m.is_historical,
        is_transient=m.is_transient,
        properties=properties,
    )


def _value(m: Any, datatype: DataType, where: str) -> Value:
    kind = m.WhichOneof("value")
    if datatype in _INT_RANGES:
        if kind == "int_value":
            raw, bits = m.int_value, 32
        elif kind == "long_value":
            raw, bits = m.long_value, 64
        else:
            raise PayloadError(f"{where}: a {datatype.name} carried as {kind}")
        low, high = _INT_RANGES[datatype]
        value = raw - (1 << bits) if low < 0 and raw >= 1 << (bits - 1) else raw
        if not low <= value <= high:
            raise PayloadError(f"{where}: {value} does not fit {datatype.name}")
        return int(value)
    expected = {
        DataType.FLOAT: "float_value",
        DataType.DOUBLE: "double_value",
        DataType.BOOLEAN: "boolean_value",
        DataType.BYTES: "bytes_value",
        DataType.FILE: "bytes_value",
        **{t: "string_value" for t in _TEXT},
        **{t: "bytes_value" for t in _ARRAYS},
        DataType.BOOLEAN_ARRAY: "bytes_value",
        DataType.STRING_ARRAY: "bytes_value",
    }.get(datatype)
    if expected is None:
        raise PayloadError(f"{where}: {datatype.name} values are not supported")
    if kind != expected:
        raise PayloadError(f"{where}: a {datatype.name} carried as {kind}")
    raw = getattr(m, kind)
    if datatype in _ARRAYS:
        fmt = _ARRAYS[datatype]
        size = struct.calcsize(fmt)
        if len(raw) % size:
            raise PayloadError(f"{where}: {len(raw)} bytes is not a whole {datatype.name}")
        return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))
    if datatype is DataType.BOOLEAN_ARRAY:
        if len(raw) < 4:
            raise PayloadError(f"{where}: BooleanArray shorter than its count")
        (count,) = struct.unpack("<I", raw[:4])
        bits = raw[4:]
        if len(bits) < (count + 7) // 8:
            raise PayloadError(f"{where}: BooleanArray of {count} has {len(bits)} bytes")
        return [bool(bits[i // 8] & (0x80 >> (i % 8))) for i in range(count)]
    if datatype is DataType.STRING_ARRAY:
        if raw and not raw.endswith(b"\x00"):
            raise PayloadError(f"{where}: StringArray not terminated")
        try:
            return [s.decode() for s in raw.split(b"\x00")[:-1]]
        except UnicodeDecodeError:
            raise PayloadError(f"{where}: StringArray is not UTF-8") from None
    if datatype is DataType.FLOAT and not math.isfinite(raw):
        return float(raw)  # kept as it is; the consumer decides what a NaN reading means
    return raw


def _property(pv: Any) -> Value:
    if pv.is_null:
        return None
    kind = pv.WhichOneof("value")
    if kind in (None, "propertyset_value", "propertysets_value", "extension_value"):
        return None  # nested property sets carry nothing the store keeps
    raw = getattr(pv, kind)
    try:
        datatype = DataType(pv.type)
    except ValueError:
        datatype = DataType.UNKNOWN
    if kind in ("int_value", "long_value") and datatype in _INT_RANGES and _INT_RANGES[datatype][0] < 0:
        bits = 32 if kind == "int_value" else 64
        return int(raw - (1 << bits) if raw >= 1 << (bits - 1) else raw)
    return raw


def metrics_named(payload: Payload, names: Iterable[str]) -> dict[str, Metric]:
    """The payload's metrics with these names (e.g. ``bdSeq``, ``Node Control/Rebirth``)."""
    wanted = set(names)
    return {m.name: m for m in payload.metrics if m.name in wanted}

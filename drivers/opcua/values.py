"""OPC UA data values as points, and point values as OPC UA variants.

Pure functions over asyncua's ``ua`` types; no I/O. A ``DataValue`` carries
a status code (its quality), a source timestamp (when the machine sampled
it) and a server timestamp (when the server last saw it); a point keeps the
first timestamp it finds in that order.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
import uuid
from typing import Any

from asyncua import ua

from ..points import Point, Quality, Value, now_ms

_INTEGER_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MILLISECOND = dt.timedelta(milliseconds=1)
_TRUE_WORDS = {"true", "1", "on", "yes"}
_FALSE_WORDS = {"false", "0", "off", "no"}


def quality_of(status: ua.StatusCode | None) -> tuple[Quality, str | None]:
    """Quality of a status code, and the code's name as the error when it is not good."""
    if status is None or status.value == 0 or status.is_good():
        return Quality.GOOD, None
    if status.is_uncertain():
        return Quality.UNCERTAIN, status.name
    return Quality.BAD, status.name


def timestamp_ms(value: ua.DataValue, *, default_ms: int | None = None) -> int:
    """Epoch milliseconds of the source timestamp, else the server timestamp, else ``default_ms`` (or now)."""
    for stamp in (value.SourceTimestamp, value.ServerTimestamp):
        if stamp is not None and stamp.year > 1601:  # 1601-01-01 is OPC UA's "no timestamp"
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.UTC)
            return (dt.datetime.fromisoformat(stamp.isoformat()) - _EPOCH) // _MILLISECOND
    return now_ms() if default_ms is None else default_ms


def float32(value: float) -> float:
    """The shortest decimal that reads back as the same 32-bit float (``71.2``, not ``71.19999694824219``)."""
    if not math.isfinite(value):
        return value
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


def json_value(value: Any, variant_type: ua.VariantType | None = None) -> Value:
    """A JSON-friendly scalar for an OPC UA value: bool, int, float, str or None.

    Date-times become ISO 8601 strings, byte strings hex, arrays a JSON text,
    anything else its ``str()``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum members become plain numbers
    if isinstance(value, float):
        return float32(value) if variant_type is ua.VariantType.Float else value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.QualifiedName | ua.NodeId):
        return value.to_string()
    if isinstance(value, ua.StatusCode):
        return value.name
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return json.dumps([json_value(item, variant_type) for item in value], default=str)
    return str(value)


def point_from_datavalue(device: str, tag: str, value: ua.DataValue, *, default_ms: int | None = None) -> Point:
    """One point from a read result or a data-change notification.

    A bad status carries no value (OPC UA says it is meaningless); an
    uncertain one keeps it. A float that is not finite cannot travel as
    JSON and becomes a bad point saying so.
    """
    quality, error = quality_of(value.StatusCode)
    ts = timestamp_ms(value, default_ms=default_ms)
    if quality is Quality.BAD:
        return Point(device, tag, ts, None, quality, error)
    variant = value.Value
    if variant is None:
        return Point(device, tag, ts, None, quality, error)
    raw = variant.Value
    # Doubles are the bulk of plant data: skip the general conversion for them.
    converted = (
        raw
        if type(raw) is float and variant.VariantType is ua.VariantType.Double
        else json_value(raw, variant.VariantType)
    )
    if isinstance(converted, float) and not math.isfinite(converted):
        return Point(device, tag, ts, None, Quality.BAD, f"non-finite value {converted}")
    return Point(device, tag, ts, converted, quality, error)


def coerce_for_write(value: Any, variant_type: ua.VariantType) -> Any:
    """Convert a command's value to the node's type; ``ValueError`` says why it does not fit."""
    if variant_type is ua.VariantType.Boolean:
        return _to_bool(value)
    if variant_type in _INTEGER_RANGES:
        number = _to_int(value)
        low, high = _INTEGER_RANGES[variant_type]
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range for {variant_type.name} ({low}..{high})")
        return number
    if variant_type in (ua.VariantType.Float, ua.VariantType.Double):
        real = _to_float(value)
        if variant_type is ua.VariantType.Float and math.isfinite(real) and abs(real) > _FLOAT32_MAX:
            raise ValueError(f"{real} is out of range for Float")
        return real
    if variant_type is ua.VariantType.String:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected text, got {value!r}")
        return str(value)
    raise ValueError(f"writing {variant_type.name} values is not supported")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(f"expected true or false, got {value!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a whole number, got {value!r}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")

"""The Sparkplug B payload codec against an independent implementation: Eclipse Tahu's sparkplug-payload.

Hypothesis makes payloads of every datatype the agent writes (nulls and
64-bit extremes included); Tahu decodes what we encode, and we decode what
Tahu encodes, and both must read the same metrics.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory_edge.sparkplug.payload import DataType, Metric, Payload, PayloadError, decode, encode
from tests.sparkplug_fixtures import CodecPeer, tahu_codec, tahu_modules

__all__ = ["tahu_codec", "tahu_modules"]

WRITTEN = [
    DataType.INT8,
    DataType.INT16,
    DataType.INT32,
    DataType.INT64,
    DataType.UINT8,
    DataType.UINT16,
    DataType.UINT32,
    DataType.UINT64,
    DataType.FLOAT,
    DataType.DOUBLE,
    DataType.BOOLEAN,
    DataType.STRING,
    DataType.DATETIME,
]
RANGES = {DataType.INT8: 7, DataType.INT16: 15, DataType.INT32: 31, DataType.INT64: 63}
UNSIGNED = {DataType.UINT8: 8, DataType.UINT16: 16, DataType.UINT32: 32, DataType.UINT64: 64, DataType.DATETIME: 64}
TAHU_NAMES = {
    DataType.INT8: "Int8",
    DataType.INT16: "Int16",
    DataType.INT32: "Int32",
    DataType.INT64: "Int64",
    DataType.UINT8: "UInt8",
    DataType.UINT16: "UInt16",
    DataType.UINT32: "UInt32",
    DataType.UINT64: "UInt64",
    DataType.FLOAT: "Float",
    DataType.DOUBLE: "Double",
    DataType.BOOLEAN: "Boolean",
    DataType.STRING: "String",
    DataType.DATETIME: "DateTime",
}


def values(datatype: DataType) -> st.SearchStrategy[Any]:
    if datatype in RANGES:
        bits = RANGES[datatype]
        return st.one_of(st.integers(-(2**bits), 2**bits - 1), st.sampled_from([-(2**bits), 2**bits - 1, 0, -1]))
    if datatype in UNSIGNED:
        bits = UNSIGNED[datatype]
        return st.one_of(st.integers(0, 2**bits - 1), st.sampled_from([0, 2**bits - 1]))
    if datatype is DataType.FLOAT:
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if datatype is DataType.DOUBLE:
        return st.floats(allow_nan=False, allow_infinity=False)
    if datatype is DataType.BOOLEAN:
        return st.booleans()
    return st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)


@st.composite
def metrics(draw: st.DrawFn) -> Metric:
    datatype = draw(st.sampled_from(WRITTEN))
    value = draw(st.one_of(st.none(), values(datatype)))
    return Metric(
        name=draw(st.text(alphabet="abcdefgh/_ 0123456789", min_size=1, max_size=20)),
        datatype=datatype,
        value=value,
        alias=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
        timestamp=draw(st.integers(0, 2**63 - 1)),
        is_historical=draw(st.booleans()),
    )


def tahu_value(raw: Any, datatype: DataType) -> Any:
    """Tahu's reading, in Python terms (64-bit integers arrive as strings)."""
    if raw is None:
        return None
    if datatype in RANGES or datatype in UNSIGNED:
        value = int(raw)
        if datatype is DataType.UINT32:
            value %= 2**32  # Tahu's JavaScript reads a UInt32 through Long.toInt(): signed; same bits
        return value
    if datatype in (DataType.FLOAT, DataType.DOUBLE):
        return float(raw)  # JSON from JavaScript may print a large double in integer form
    return raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(metrics(), min_size=1, max_size=8), st.integers(0, 255), st.integers(0, 2**63 - 1))
def test_tahu_reads_what_we_write(tahu_codec: CodecPeer, ms: list[Metric], seq: int, ts: int) -> None:
    decoded = tahu_codec.decode(encode(Payload(metrics=ms, timestamp=ts, seq=seq)))
    assert int(decoded["seq"]) == seq and int(decoded["timestamp"]) == ts
    for ours, theirs in zip(ms, decoded["metrics"], strict=True):
        assert theirs["name"] == ours.name and theirs["type"] == TAHU_NAMES[ours.datatype]
        assert bool(theirs.get("isHistorical", False)) == ours.is_historical
        if ours.alias is not None:
            assert int(theirs["alias"]) == ours.alias
        value = tahu_value(theirs["value"], ours.datatype)
        if ours.datatype is DataType.FLOAT and ours.value is not None:
            assert value == struct.unpack("f", struct.pack("f", ours.value))[0]
        else:
            assert value == ours.value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(metrics(), min_size=1, max_size=8), st.integers(0, 255))
def test_we_read_what_tahu_writes(tahu_codec: CodecPeer, ms: list[Metric], seq: int) -> None:
    def wire(value: Any, datatype: DataType) -> Any:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and datatype in (DataType.INT64, DataType.UINT64, DataType.DATETIME, DataType.UINT32)
        ):
            return f"{value}n"  # a 64-bit Long on the JavaScript side
        return value

    request = {
        "timestamp": f"{1_732_280_000_000}n",
        "seq": seq,
        "metrics": [
            {
                "name": m.name,
                "type": TAHU_NAMES[m.datatype],
                "value": wire(m.value, m.datatype),
                "timestamp": f"{m.timestamp}n",
                **({"alias": f"{m.alias}n"} if m.alias is not None else {}),
            }
            for m in ms
        ],
    }
    payload = decode(tahu_codec.encode(request))
    assert payload.seq == seq
    for ours, read in zip(ms, payload.metrics, strict=True):
        assert (read.name, read.datatype, read.timestamp, read.alias) == (
            ours.name,
            ours.datatype,
            ours.timestamp,
            ours.alias,
        )
        if ours.datatype is DataType.FLOAT and ours.value is not None:
            assert read.value == struct.unpack("f", struct.pack("f", ours.value))[0]
        else:
            assert read.value == ours.value


def test_values_that_do_not_fit_their_datatype_are_refused_with_the_metric_named() -> None:
    for datatype, value in [
        (DataType.INT8, 128),
        (DataType.UINT16, -1),
        (DataType.BOOLEAN, 1),
        (DataType.STRING, 5),
        (DataType.INT64, 2**63),
    ]:
        with pytest.raises(PayloadError, match=f"metric press/temp: .* is not a {datatype.name}"):
            encode(Payload(metrics=[Metric("press/temp", datatype, value)]))


def test_garbage_and_out_of_range_wire_values_are_refused_in_one_line() -> None:
    with pytest.raises(PayloadError, match="not a Sparkplug B payload"):
        decode(b"\xff\xff\xff")
    from factory_edge.sparkplug import sparkplug_b_pb2 as pb

    wrong = pb.Payload()
    metric = wrong.metrics.add()
    metric.name, metric.datatype, metric.int_value = "t", int(DataType.UINT8), 300
    with pytest.raises(PayloadError, match="metric 't': 300 does not fit UINT8"):
        decode(wrong.SerializeToString())
    metric.datatype = 99
    with pytest.raises(PayloadError, match="unknown datatype 99"):
        decode(wrong.SerializeToString())


def test_arrays_of_sparkplug_3_are_read() -> None:
    from factory_edge.sparkplug import sparkplug_b_pb2 as pb

    message = pb.Payload()
    for name, datatype, raw in [
        ("i16", DataType.INT16_ARRAY, struct.pack("<3h", -1, 0, 300)),
        ("f64", DataType.DOUBLE_ARRAY, struct.pack("<2d", 1.5, -2.25)),
        ("bits", DataType.BOOLEAN_ARRAY, struct.pack("<I", 3) + bytes([0b10100000])),
        ("names", DataType.STRING_ARRAY, b"ab\x00cd\x00"),
    ]:
        metric = message.metrics.add()
        metric.name, metric.datatype, metric.bytes_value = name, int(datatype), raw
    read = {m.name: m.value for m in decode(message.SerializeToString()).metrics}
    assert read == {"i16": [-1, 0, 300], "f64": [1.5, -2.25], "bits": [True, False, True], "names": ["ab", "cd"]}
    doubles = read["f64"]
    assert isinstance(doubles, list) and not math.isnan(doubles[0])

"""Decoding and encoding registers, checked against byte layouts written out by hand."""

from __future__ import annotations

import struct

import pytest

from drivers.config import ModbusTag
from drivers.modbus import codec
from factory_edge.errors import WriteRefused

# Byte positions of the big-endian value (A=0, B=1, …) in wire order, per
# register: written out literally, independent of the codec's swap logic.
LAYOUT = {
    2: {"ABCD": [(0, 1), (2, 3)], "CDAB": [(2, 3), (0, 1)], "BADC": [(1, 0), (3, 2)], "DCBA": [(3, 2), (1, 0)]},
    4: {
        "ABCD": [(0, 1), (2, 3), (4, 5), (6, 7)],
        "CDAB": [(6, 7), (4, 5), (2, 3), (0, 1)],
        "BADC": [(1, 0), (3, 2), (5, 4), (7, 6)],
        "DCBA": [(7, 6), (5, 4), (3, 2), (1, 0)],
    },
}


def wire(fmt: str, value: float | int, order: str) -> list[int]:
    data = struct.pack(">" + fmt, value)
    if len(data) == 2:
        return [data[0] << 8 | data[1]] if order in ("ABCD", "CDAB") else [data[1] << 8 | data[0]]
    return [data[hi] << 8 | data[lo] for hi, lo in LAYOUT[len(data) // 2][order]]


CASES = [
    ("int16", "h", -12345),
    ("uint16", "H", 54321),
    ("int32", "i", -123456789),
    ("uint32", "I", 3_000_000_123),
    ("int64", "q", -(2**62) - 12345),
    ("uint64", "Q", 2**64 - 2),
    ("float32", "f", 71.2),
    ("float64", "d", -12345.678901234),
]


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize(("kind", "fmt", "value"), CASES)
def test_every_type_and_order_decodes_and_encodes_exactly(kind: str, fmt: str, value: float, order: str) -> None:
    tag = ModbusTag(name="t", address=0, type=kind, order=order)
    registers = wire(fmt, value, order)
    assert codec.decode(tag, registers) == value
    assert codec.encode(tag, value) == registers


def test_known_float32_vector() -> None:
    # 123.456 is 0x42F6E979: the register pairs every Modbus manual shows.
    tag = ModbusTag(name="t", address=0, type="float32", order="CDAB")
    assert codec.decode(tag, [0xE979, 0x42F6]) == 123.456


def test_scale_and_offset() -> None:
    tag = ModbusTag(name="t", address=0, type="int16", scale=0.1, offset=-40)
    assert codec.decode(tag, [713]) == 31.3
    assert codec.encode(tag, 31.3) == [713]


def test_bits_and_strings() -> None:
    bit = ModbusTag(name="b", address="7.3")
    assert bit.address == 7 and bit.bit == 3
    assert codec.decode(bit, [0b1000]) is True
    assert codec.decode(bit, [0b0111]) is False
    assert codec.set_bit(0b0111, 3, True) == 0b1111
    text = ModbusTag(name="s", address=0, type="string", length=3)
    assert codec.decode(text, [0x4142, 0x4344, 0x4500]) == "ABCDE"
    swapped = ModbusTag(name="s", address=0, type="string", length=2, order="BADC")
    assert codec.decode(swapped, [0x4241, 0x0043]) == "ABC"
    assert codec.encode(swapped, "ABC") == [0x4241, 0x0043]


def test_writes_out_of_range_or_wrong_type_are_refused() -> None:
    with pytest.raises(WriteRefused, match=r"t: 70000 is out of range for int16"):
        codec.encode(ModbusTag(name="t", address=0, type="int16"), 70000)
    with pytest.raises(WriteRefused, match="expected a number"):
        codec.encode(ModbusTag(name="t", address=0, type="uint16"), "warm")
    with pytest.raises(WriteRefused, match="do not fit in 2 registers"):
        codec.encode(ModbusTag(name="t", address=0, type="string", length=2), "TOO LONG")

"""Registers to values and back: types, byte/word order, bits, scale and offset.

Pure functions over plain data. A register is a 16-bit unsigned int as it
arrives on the wire (high byte first). ``order`` names the byte order of the
whole value: ABCD is big endian, CDAB swaps 16-bit words, BADC swaps the
bytes in each word, DCBA is little endian.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

from factory_edge.errors import WriteRefused

from ..configtypes import ByteOrder, DataType, ModbusTag

_STRUCT = {
    DataType.INT16: "h",
    DataType.UINT16: "H",
    DataType.INT32: "i",
    DataType.UINT32: "I",
    DataType.INT64: "q",
    DataType.UINT64: "Q",
    DataType.FLOAT32: "f",
    DataType.FLOAT64: "d",
}
_INT_RANGE = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


def _swaps(order: ByteOrder) -> tuple[bool, bool]:
    """(swap words, swap bytes in each word) for a byte order."""
    return order in (ByteOrder.CDAB, ByteOrder.DCBA), order in (ByteOrder.BADC, ByteOrder.DCBA)


def bytes_to_registers(data: bytes, order: ByteOrder) -> list[int]:
    """Big-endian value bytes to the registers that carry them on the wire in ``order``."""
    swap_words, swap_bytes = _swaps(order)
    words = [int.from_bytes(data[i : i + 2], "little" if swap_bytes else "big") for i in range(0, len(data), 2)]
    return list(reversed(words)) if swap_words else words


def _shortest_float32(value: float, raw: bytes) -> float:
    """The shortest decimal that is the same float32 (71.2, not 71.19999694824219)."""
    if not math.isfinite(value):
        return value
    for digits in (7, 6, 8, 9):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack(">f", candidate) == raw:
            return candidate
    return value


Decoder = Callable[[Sequence[int]], "bool | int | float | str"]


def make_decoder(tag: ModbusTag) -> Decoder:
    """A function decoding this tag from its ``tag.register_count`` registers.

    Built once per tag: the type, order and scale are resolved here, not on
    every poll (a 1,000-tag device decodes 1,000 values per cycle).
    """
    kind = tag.data_type
    swap_words, swap_bytes = _swaps(tag.order)
    if kind is DataType.BOOL:
        if tag.bit is not None:
            mask = 1 << tag.bit
            return lambda registers: bool(registers[0] & mask)
        return lambda registers: registers[0] != 0
    word_format = ("<" if swap_bytes else ">") + f"{tag.register_count}H"
    if kind is DataType.STRING:

        def decode_string(registers: Sequence[int]) -> str:
            data = struct.pack(word_format, *registers)
            return data.split(b"\x00", 1)[0].decode("utf-8", errors="replace").rstrip(" ")

        return decode_string
    value_struct = struct.Struct(">" + _STRUCT[kind])
    scaled = tag.scale != 1.0 or tag.offset != 0.0
    scale, offset = tag.scale, tag.offset
    is_float32 = kind is DataType.FLOAT32

    def decode_number(registers: Sequence[int]) -> int | float:
        # Packing the words little-endian is the per-word byte swap.
        data = struct.pack(word_format, *(reversed(registers) if swap_words else registers))
        raw = value_struct.unpack(data)[0]
        if is_float32:
            raw = _shortest_float32(raw, data)
        if not scaled:
            return raw
        value = raw * scale + offset
        # 713 * 0.1 is 71.30000000000001 in binary floating point; a reading
        # carries no more than 12 significant digits of meaning.
        return float(f"{value:.12g}") if math.isfinite(value) else value

    return decode_number


def is_plain_word(tag: ModbusTag) -> bool:
    """True when the register as it arrives is the value: a uint16 with no byte swap, scale or offset."""
    return tag.data_type is DataType.UINT16 and not _swaps(tag.order)[1] and tag.scale == 1.0 and tag.offset == 0.0


def decode(tag: ModbusTag, registers: Sequence[int]) -> bool | int | float | str:
    """Decode a register-table tag from exactly ``tag.register_count`` registers."""
    return make_decoder(tag)(registers)


def _coerce_bool(tag: ModbusTag, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "1", "0"):
        return value.lower() in ("true", "on", "1")
    raise WriteRefused(f"{tag.name}: expected true or false, got {value!r}")


def coerce_write_value(tag: ModbusTag, value: Any) -> bool | int | float | str:
    """Check a value for a tag's type before it is encoded; WriteRefused says why not."""
    kind = tag.data_type
    if kind is DataType.BOOL:
        return _coerce_bool(tag, value)
    if kind is DataType.STRING:
        if not isinstance(value, str):
            raise WriteRefused(f"{tag.name}: expected a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise WriteRefused(f"{tag.name}: expected a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise WriteRefused(f"{tag.name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise WriteRefused(f"{tag.name}: {value!r} is not a finite number")
    return number


def encode(tag: ModbusTag, value: Any) -> list[int]:
    """Registers to write for a register-table value (not for register bits or coils)."""
    kind = tag.data_type
    value = coerce_write_value(tag, value)
    if kind is DataType.BOOL:
        return [1 if value else 0]
    if kind is DataType.STRING:
        data = str(value).encode("utf-8")
        size = 2 * (tag.length or 1)
        if len(data) > size:
            raise WriteRefused(f"{tag.name}: {len(data)} bytes do not fit in {tag.length} registers ({size} bytes)")
        data = data.ljust(size, b"\x00")
        _, swap_bytes = _swaps(tag.order)
        return [int.from_bytes(data[i : i + 2], "little" if swap_bytes else "big") for i in range(0, size, 2)]
    raw: float = (float(value) - tag.offset) / tag.scale if (tag.scale != 1.0 or tag.offset != 0.0) else value
    if kind in _INT_RANGE:
        if isinstance(raw, float):
            raw = round(raw)
        low, high = _INT_RANGE[kind]
        if not low <= raw <= high:
            raise WriteRefused(f"{tag.name}: {value!r} is out of range for {kind} (raw {raw}, {low}..{high})")
        data = struct.pack(">" + _STRUCT[kind], int(raw))
    else:
        try:
            data = struct.pack(">" + _STRUCT[kind], float(raw))
        except OverflowError:
            raise WriteRefused(f"{tag.name}: {value!r} is out of range for {kind}") from None
    return bytes_to_registers(data, tag.order)


def set_bit(word: int, bit: int, on: bool) -> int:
    """A register with one bit changed (read-modify-write of a register bit)."""
    return (word | (1 << bit)) if on else (word & ~(1 << bit) & 0xFFFF)

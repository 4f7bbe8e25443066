"""Read planning: a device's tags coalesced into the fewest Modbus requests.

Tags of one table are sorted by address and merged while the merged read
stays within the protocol limit (125 registers, 2000 bits), the device's
``max_registers_per_read`` / ``max_bits_per_read``, and spans no more than
``max_gap`` unused addresses between tags. A device with holes in its map
refuses a merged read with "illegal data address"; ``split`` then divides
that read until the hole is isolated, and the driver plans again around
the holes it learned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from factory_edge.units import plural

from ..configtypes import ModbusDeviceBase, ModbusTag, Table

TABLE_ORDER = (Table.COIL, Table.DISCRETE, Table.HOLDING, Table.INPUT)
FUNCTION_CODE = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}


@dataclass(frozen=True, slots=True)
class Read:
    """One request: ``count`` registers (or bits) of ``table`` from ``start``, serving ``tags``."""

    table: Table
    start: int
    count: int
    tags: tuple[ModbusTag, ...]

    @property
    def end(self) -> int:
        return self.start + self.count

    def __str__(self) -> str:
        unit = "bit" if self.table.is_bits else "register"
        return (
            f"{self.table} {self.start}..{self.end - 1} ({plural(self.count, unit)}, {plural(len(self.tags), 'tag')})"
        )


@dataclass(frozen=True, slots=True)
class Limits:
    max_gap: int = 16
    max_registers: int = 125
    max_bits: int = 2000

    @classmethod
    def of(cls, device: ModbusDeviceBase) -> Limits:
        return cls(device.max_gap, device.max_registers_per_read, device.max_bits_per_read)

    def size(self, table: Table) -> int:
        return self.max_bits if table.is_bits else self.max_registers


def _span(tags: Sequence[ModbusTag]) -> tuple[int, int]:
    start = min(t.address for t in tags)
    end = max(t.address + t.register_count for t in tags)
    return start, end


def read_for(table: Table, tags: Sequence[ModbusTag]) -> Read:
    """The single read covering ``tags`` (all of one table)."""
    start, end = _span(tags)
    return Read(table, start, end - start, tuple(sorted(tags, key=lambda t: (t.address, t.bit or 0))))


Hole = tuple[Table, int, int]
"""Addresses ``[start, end)`` of a table that the device refuses to read."""


def _hits(holes: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    return any(h_start < end and h_end > start for h_start, h_end in holes)


def plan_table(
    table: Table, tags: Iterable[ModbusTag], limits: Limits, holes: Sequence[tuple[int, int]] = ()
) -> list[Read]:
    """Greedy coalescing of one table's tags (optimal for sorted intervals under a size cap).

    A read never spans a known hole; a tag inside a hole is read on its own
    (and fails alone).
    """
    ordered = sorted(tags, key=lambda t: (t.address, t.bit or 0))
    size = limits.size(table)
    reads: list[Read] = []
    group: list[ModbusTag] = []
    start = end = 0
    for tag in ordered:
        tag_end = tag.address + tag.register_count
        if _hits(holes, tag.address, tag_end):
            if group:
                reads.append(read_for(table, group))
            reads.append(read_for(table, [tag]))
            group = []
            continue
        new_end = max(end, tag_end)
        if (
            group
            and tag.address - end <= limits.max_gap
            and new_end - start <= size
            and not _hits(holes, start, new_end)
        ):
            group.append(tag)
            end = new_end
            continue
        if group:
            reads.append(read_for(table, group))
        group, start, end = [tag], tag.address, tag_end
    if group:
        reads.append(read_for(table, group))
    return reads


def plan_reads(tags: Iterable[ModbusTag], limits: Limits, holes: Iterable[Hole] = ()) -> list[Read]:
    """All reads for one poll of a device, coils first, input registers last."""
    by_table: dict[Table, list[ModbusTag]] = {}
    for tag in tags:
        by_table.setdefault(tag.table, []).append(tag)
    holes_of: dict[Table, list[tuple[int, int]]] = {}
    for table, start, end in holes:
        holes_of.setdefault(table, []).append((start, end))
    return [
        read
        for table in TABLE_ORDER
        for read in plan_table(table, by_table.get(table, []), limits, holes_of.get(table, []))
    ]


def split(read: Read) -> list[Read]:
    """Divide a refused read in two by its tags (addresses in order), to isolate a hole.

    Repeated on the half that is refused again, a hole among n tags is found
    in about log2(n) extra requests, once; the driver keeps the result.
    """
    if len(read.tags) < 2:
        return [read]
    # Tags sharing a register (bits of one word) stay together.
    groups: list[list[ModbusTag]] = []
    for tag in read.tags:
        if groups and tag.address < max(t.address + t.register_count for t in groups[-1]):
            groups[-1].append(tag)
        else:
            groups.append([tag])
    if len(groups) < 2:
        return [read]
    half = len(groups) // 2
    left = [t for g in groups[:half] for t in g]
    right = [t for g in groups[half:] for t in g]
    return [read_for(read.table, left), read_for(read.table, right)]


def describe(reads: Sequence[Read]) -> list[str]:
    """Human-readable plan lines for ``agent check-config``."""
    return [str(r) for r in reads]

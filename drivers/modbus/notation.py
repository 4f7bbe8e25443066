"""Register addresses as PLC manuals write them, and as the agent's config takes them.

The config takes the 0-based protocol address, as sent on the wire:
holding register 40001 in a manual's 1-based "Modicon" notation is
``table: holding, address: 0``. A tag written in that notation
(``address: 40001``) is a valid protocol address too, so it validates and
then reads "illegal data address" from most devices; ``agent check-config``
warns about it, and ``agent read`` says so next to the error. A device
with ``addressing: modicon`` takes that notation instead, for every tag
(``agent/expand.py`` converts it).
"""

from __future__ import annotations

from typing import Any

from ..configtypes import ModbusDeviceBase, ModbusTag, Table

# The 5-digit Modicon ranges: the leading digit names the table, the rest is 1-based.
_PREFIX = {Table.COIL: 0, Table.DISCRETE: 1, Table.INPUT: 3, Table.HOLDING: 4}


def modicon_hint(tag: ModbusTag) -> str | None:
    """Why ``tag.address`` looks like Modicon notation, and the address it probably means; None otherwise."""
    address = tag.address
    if not 10001 <= address <= 49999 or address % 10000 == 0:
        return None
    prefix, offset = divmod(address, 10000)
    table = next((t for t, p in _PREFIX.items() if p == prefix), None)
    if table is None:
        return None
    return (
        f"address {address} looks like 1-based Modicon notation ({table} register {address}); "
        f"this field takes the 0-based protocol address: table: {table}, address: {offset - 1} "
        "(or give the device addressing: modicon)"
    )


def address_warnings(config: Any, source: str) -> list[str]:
    """One line per Modbus tag whose address looks like Modicon notation."""
    out = []
    for device in config.devices:
        if isinstance(device, ModbusDeviceBase) and device.addressing == "protocol":
            for tag in device.tags:
                hint = modicon_hint(tag)
                if hint:
                    out.append(f"{source}: devices[{device.name}].tags[{tag.name}].address: {hint}")
    return out

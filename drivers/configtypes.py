"""Devices and tags as the running agent holds them: plain attributes, no pydantic.

The models in ``drivers/config.py`` validate a config and inherit from these
classes (same names), so drivers take either: a model instance from
``load_config`` or its plain copy from ``agent/configproc.py``. The enums,
``Deadband`` and the register counts live here because both sides use them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from factory_edge.frozen import Frozen


@dataclass(frozen=True, slots=True)
class Deadband:
    """Report-by-exception threshold: absolute units, or percent of the last value."""

    value: float
    percent: bool = False

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{self.value:g}"


class Table(enum.StrEnum):
    """The four Modbus data tables."""

    HOLDING = "holding"
    INPUT = "input"
    COIL = "coil"
    DISCRETE = "discrete"

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)


class DataType(enum.StrEnum):
    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"


REGISTERS_PER_TYPE = {
    DataType.BOOL: 1,
    DataType.INT16: 1,
    DataType.UINT16: 1,
    DataType.INT32: 2,
    DataType.UINT32: 2,
    DataType.FLOAT32: 2,
    DataType.INT64: 4,
    DataType.UINT64: 4,
    DataType.FLOAT64: 4,
}


class ByteOrder(enum.StrEnum):
    """Byte order of the whole value as its registers arrive."""

    ABCD = "ABCD"  # big endian
    BADC = "BADC"  # bytes swapped in each 16-bit word
    CDAB = "CDAB"  # 16-bit words swapped
    DCBA = "DCBA"  # little endian


class TagBase(Frozen):
    if TYPE_CHECKING:
        name: str
        unit: str | None
        description: str | None
        deadband: Deadband | None
        max_silence: float | None
        writable: bool


class ModbusTag(TagBase):
    if TYPE_CHECKING:
        table: Table
        address: int
        bit: int | None
        type: DataType | None
        order: ByteOrder
        length: int | None
        scale: float
        offset: float

    @property
    def data_type(self) -> DataType:
        if self.type is not None:
            return self.type
        return DataType.BOOL if (self.table.is_bits or self.bit is not None) else DataType.UINT16

    @property
    def register_count(self) -> int:
        """Registers (or bits, for coil/discrete) this tag occupies."""
        if self.table.is_bits:
            return 1
        if self.data_type is DataType.STRING:
            return self.length or 1
        return REGISTERS_PER_TYPE[self.data_type]


class DeviceBase(Frozen):
    if TYPE_CHECKING:  # what every device has; each protocol's class declares protocol, tags and address
        protocol: str
        tags: Sequence[TagBase]
        name: str
        profile: str | None
        poll: float
        timeout: float
        enabled: bool
        backoff_max: float

        @property
        def address(self) -> str: ...


class ModbusDeviceBase(DeviceBase):
    if TYPE_CHECKING:
        unit: int
        addressing: Literal["protocol", "modicon"]
        retries: int
        max_gap: int
        max_registers_per_read: int
        max_bits_per_read: int
        max_concurrent_requests: int
        tags: Sequence[ModbusTag]


class ModbusTcpDevice(ModbusDeviceBase):
    if TYPE_CHECKING:
        protocol: Literal["modbus-tcp"]
        host: str
        port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ModbusRtuDevice(ModbusDeviceBase):
    if TYPE_CHECKING:
        protocol: Literal["modbus-rtu"]
        serial: str
        baudrate: int
        parity: Literal["N", "E", "O"]
        stopbits: Literal[1, 2]
        bytesize: Literal[7, 8]

    @property
    def address(self) -> str:
        return f"{self.serial}@{self.baudrate}{self.parity}{self.stopbits}"


class OpcuaSecurity(Frozen):
    if TYPE_CHECKING:
        policy: Literal["None", "Basic256Sha256"]
        mode: Literal["None", "Sign", "SignAndEncrypt"]
        cert_file: str | None
        key_file: str | None
        server_cert_file: str | None


class OpcuaTag(TagBase):
    if TYPE_CHECKING:
        node: str | None
        path: str | None


class OpcuaDevice(DeviceBase):
    if TYPE_CHECKING:
        protocol: Literal["opcua"]
        endpoint: str
        security: OpcuaSecurity
        username: str | None
        password: str | None
        mode: Literal["subscribe", "poll"]
        tags: Sequence[OpcuaTag]

    @property
    def address(self) -> str:
        return self.endpoint


Device = ModbusTcpDevice | ModbusRtuDevice | OpcuaDevice
AnyTag = ModbusTag | OpcuaTag

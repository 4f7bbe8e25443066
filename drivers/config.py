"""Typed models of devices and tags, as written in the agent's config.

Parsed once from YAML (see ``factory_edge.configfile``); code below the CLI
only ever sees these frozen models, or their plain twins in
``drivers/configtypes.py`` (each model inherits from its twin, which holds
the properties drivers use).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from factory_edge.configfile import YamlFloat
from factory_edge.configmodel import NAME_PATTERN, Duration, Model

from . import configtypes as plain
from .configtypes import REGISTERS_PER_TYPE, ByteOrder, DataType, Deadband, Table

__all__ = ["REGISTERS_PER_TYPE", "ByteOrder", "DataType", "Deadband", "Table"]  # re-exported: one import for both


def _parse_deadband(value: Any) -> Deadband | None:
    if value is None or isinstance(value, Deadband):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a number or a percentage like 2%")
    if isinstance(value, (int, float)):
        number, percent = float(value), False
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(value))
        if not match:
            raise ValueError("expected a number or a percentage like 2%")
        number, percent = float(match.group(1)), bool(match.group(2))
    if number < 0:
        raise ValueError("a deadband cannot be negative")
    return Deadband(number, percent)


DeadbandField = Annotated[Deadband | None, BeforeValidator(_parse_deadband)]


class TagBase(Model, plain.TagBase):
    """What every tag has, whatever the protocol."""

    name: str = Field(pattern=NAME_PATTERN, max_length=128)
    unit: str | None = None
    description: str | None = None
    deadband: DeadbandField = None
    max_silence: Duration | None = None
    writable: bool = False


# ---------------------------------------------------------------- Modbus


def _split_address(value: Any) -> Any:
    """``40.3`` (or ``"40.3"``) means bit 3 of register 40."""
    if isinstance(value, YamlFloat):
        value = value.text
    elif isinstance(value, float):
        value = repr(value)
    if isinstance(value, str) and "." in value:
        reg, _, bit = value.strip().partition(".")
        if not (reg.isdigit() and bit.isdigit()):
            raise ValueError("expected a register number, or register.bit like 40.3")
        return {"register": int(reg), "bit": int(bit)}
    return value


class ModbusTag(TagBase, plain.ModbusTag):
    """A value in a Modbus device's register map (addresses are 0-based, as sent on the wire)."""

    table: Table = Table.HOLDING
    address: int
    bit: int | None = Field(default=None, ge=0, le=15)
    type: DataType | None = None
    order: ByteOrder = ByteOrder.ABCD
    length: int | None = Field(default=None, ge=1, le=125, description="string length in registers")
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _address_with_bit(cls, data: Any) -> Any:
        if isinstance(data, dict):
            split = _split_address(data.get("address"))
            if isinstance(split, dict):
                if data.get("bit") is not None and data["bit"] != split["bit"]:
                    raise ValueError(f"address {data['address']} and bit {data['bit']} disagree")
                data = {**data, "address": split["register"], "bit": split["bit"]}
        return data

    @field_validator("address", mode="before")
    @classmethod
    def _address_range(cls, value: Any) -> int:
        # register.bit was split off by _address_with_bit; what is left must be a register number.
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("expected a register number, or register.bit like 40.3")
        if not 0 <= value <= 65535:
            raise ValueError("must be between 0 and 65535 (0-based protocol address)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTag:
        kind = self.data_type
        if self.table.is_bits:
            if kind is not DataType.BOOL:
                raise ValueError(f"a {self.table} tag is a single bit: type must be bool, not {kind}")
            if self.bit is not None:
                raise ValueError(f"bit: is for registers; a {self.table} address already is one bit")
        if self.bit is not None and kind is not DataType.BOOL:
            raise ValueError(f"a register bit (bit: {self.bit}) is read as bool, not {kind}")
        if kind is DataType.STRING and self.length is None:
            raise ValueError("a string tag needs length: (number of registers, 2 characters each)")
        if kind is not DataType.STRING and self.length is not None:
            raise ValueError("length: is only for string tags")
        if kind in (DataType.STRING, DataType.BOOL) and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to {kind} tags")
        if self.scale == 0:
            raise ValueError("scale cannot be 0")
        if self.writable and self.table in (Table.INPUT, Table.DISCRETE):
            raise ValueError(
                f"{self.table} {'registers' if self.table is Table.INPUT else 'inputs'} are read-only: remove writable"
            )
        if self.address + self.register_count > 65536:
            raise ValueError(f"{self.name} runs past the last address 65535")
        return self


def _unique_names(items: list[Any], what: str) -> list[Any]:
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{what} name {item.name!r} is used twice")
        seen.add(item.name)
    return items


class DeviceBase(Model, plain.DeviceBase):
    name: str = Field(pattern=NAME_PATTERN, max_length=128)
    profile: str | None = Field(default=None, description="the profile this device starts from (agent/expand.py)")
    poll: Duration = Field(default=1.0, gt=0)
    timeout: Duration = Field(default=1.0, gt=0)
    enabled: bool = True
    backoff_max: Duration = Field(default=30.0, gt=0, description="longest wait between reconnect attempts")


class ModbusDeviceBase(DeviceBase, plain.ModbusDeviceBase):
    unit: int = Field(default=1, ge=0, le=255)
    addressing: Literal["protocol", "modicon"] = Field(
        default="protocol",
        description="how the file wrote the addresses: protocol (0-based, as sent) or modicon (40001, 400001); "
        "the tags below hold protocol addresses either way",
    )
    retries: int = Field(default=1, ge=0, le=10)
    max_gap: int = Field(default=16, ge=0, le=124, description="unused registers a merged read may span")
    max_registers_per_read: int = Field(default=125, ge=1, le=125)
    max_bits_per_read: int = Field(default=2000, ge=1, le=2000)
    max_concurrent_requests: int = Field(
        default=1, ge=1, le=32, description="requests outstanding at once on the device's TCP connection"
    )
    tags: list[ModbusTag] = Field(min_length=1)

    @field_validator("tags")
    @classmethod
    def _tags_unique(cls, tags: list[ModbusTag]) -> list[ModbusTag]:
        return _unique_names(tags, "tag")


class ModbusTcpDevice(ModbusDeviceBase, plain.ModbusTcpDevice):
    protocol: Literal["modbus-tcp"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)


class ModbusRtuDevice(ModbusDeviceBase, plain.ModbusRtuDevice):
    protocol: Literal["modbus-rtu"]
    serial: str = Field(min_length=1)
    baudrate: int = Field(default=19200, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8

    @field_validator("max_concurrent_requests")
    @classmethod
    def _one_at_a_time(cls, value: int) -> int:
        if value != 1:
            raise ValueError("a serial line carries one request at a time: only 1 is possible for modbus-rtu")
        return value


# ---------------------------------------------------------------- OPC UA


class OpcuaSecurity(Model, plain.OpcuaSecurity):
    policy: Literal["None", "Basic256Sha256"] = "None"
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    cert_file: str | None = Field(
        default=None, description="client certificate (PEM or DER); generated on first use if absent"
    )
    key_file: str | None = None
    server_cert_file: str | None = Field(default=None, description="pin the server certificate")

    @model_validator(mode="after")
    def _consistent(self) -> OpcuaSecurity:
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError("policy None goes with mode None; Basic256Sha256 needs mode Sign or SignAndEncrypt")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class OpcuaTag(TagBase, plain.OpcuaTag):
    """A node, by NodeId (``ns=2;s=Oven.Zone1.Temp``) or by browse path from Objects (``2:Oven/2:Zone1/2:Temp``)."""

    node: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> OpcuaTag:
        if (self.node is None) == (self.path is None):
            raise ValueError("give exactly one of node: (a NodeId) or path: (a browse path)")
        if self.node is not None and not re.fullmatch(r"(ns=\d+;)?[isgb]=.+", self.node):
            raise ValueError(f"node {self.node!r} is not a NodeId like ns=2;s=Oven.Zone1.Temp or i=2258")
        return self


class OpcuaDevice(DeviceBase, plain.OpcuaDevice):
    protocol: Literal["opcua"]
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="opc.tcp://host:port[/path]")
    security: OpcuaSecurity = OpcuaSecurity()
    username: str | None = None
    password: str | None = None
    mode: Literal["subscribe", "poll"] = "subscribe"
    tags: list[OpcuaTag] = Field(min_length=1)

    @field_validator("tags")
    @classmethod
    def _tags_unique(cls, tags: list[OpcuaTag]) -> list[OpcuaTag]:
        return _unique_names(tags, "tag")

    @model_validator(mode="after")
    def _credentials(self) -> OpcuaDevice:
        if self.password is not None and self.username is None:
            raise ValueError("password: given without username:")
        return self


Device = Annotated[ModbusTcpDevice | ModbusRtuDevice | OpcuaDevice, Field(discriminator="protocol")]
AnyTag = ModbusTag | OpcuaTag

"""Simulated machines for the demo, tests and benchmarks: their register maps and behaviour.

Each machine is a register map (the documentation a vendor would ship) and a
``step`` that moves its values on with time: a CNC whose spindle heats up
toward an alarm, a press counting cycles, a compressor holding pressure.
Setpoints written over Modbus take effect on the next step. Pure logic: the
server in ``modbus_server.py`` does the I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ByteOrder, DataType, ModbusTag, Table


@dataclass(frozen=True)
class Field:
    """One documented value of a machine's register map."""

    name: str
    table: Table
    address: int
    type: DataType = DataType.UINT16
    order: ByteOrder = ByteOrder.ABCD
    scale: float = 1.0
    unit: str = ""
    writable: bool = False
    length: int | None = None
    bit: int | None = None
    description: str = ""

    def tag(self) -> ModbusTag:
        """The agent-config tag that reads this field."""
        return ModbusTag(
            name=self.name,
            table=self.table,
            address=self.address,
            type=None if self.bit is not None else self.type,
            order=self.order,
            scale=self.scale,
            unit=self.unit or None,
            writable=self.writable,
            length=self.length,
            bit=self.bit,
        )


Step = Callable[[dict[str, Any], float, float], dict[str, Any]]


@dataclass
class Machine:
    """A simulated machine: unit id, register map, initial values and behaviour."""

    name: str
    kind: str
    unit: int
    fields: list[Field]
    values: dict[str, Any]
    step: Step = field(repr=False)

    def advance(self, t: float, dt: float) -> None:
        """Move the machine's values on by ``dt`` seconds (``t`` is seconds since start)."""
        self.values.update(self.step(dict(self.values), t, dt))


def _toward(current: float, target: float, rate: float, dt: float, noise: float) -> float:
    return current + (target - current) * (1 - math.exp(-rate * dt)) + random.gauss(0, noise) * math.sqrt(max(dt, 0))


def _cnc_step(v: dict[str, Any], t: float, dt: float) -> dict[str, Any]:
    running = bool(v["running"])
    speed_target = 12000 * v["feed_override"] / 100 if running else 0
    speed = _toward(v["spindle_speed"], speed_target, 0.8, dt, 20)
    # The spindle heats with speed: about 65 degC at full speed with coolant,
    # toward 90 degC without it, crossing the 85 degC alarm within half a minute.
    heat = 35 + speed / 12000 * (55 if not v["coolant"] else 30)
    temp = _toward(v["spindle_temp"], heat, 0.08, dt, 0.05)
    alarm = temp > 85
    return {
        "spindle_speed": max(0, min(65535, round(speed))),
        "spindle_temp": round(temp, 2),
        "overtemp_alarm": alarm,
        "part_count": v["part_count"] + (1 if running and random.random() < dt / 20 else 0),
        "alarm_word": 1 if alarm else 0,
    }


def _press_step(v: dict[str, Any], t: float, dt: float) -> dict[str, Any]:
    rate = v["stroke_setpoint"] if v["running"] and not v["door_open"] else 0
    strokes = v["_stroke_acc"] + rate / 60 * dt
    cycles = int(strokes)
    phase = (t * max(rate, 1) / 60) % 1.0
    tonnage = (1800 * math.sin(math.pi * phase) ** 4 + random.gauss(0, 5)) if rate else 0.0
    return {
        "cycle_count": (v["cycle_count"] + cycles) % 2**32,
        "_stroke_acc": strokes - cycles,
        "stroke_rate": rate,
        "tonnage": round(max(0.0, tonnage), 1),
        "hydraulic_temp": round(_toward(v["hydraulic_temp"], 48 + rate / 10, 0.01, dt, 0.05), 1),
        "door_open": (t % 300) > 285,  # the operator opens the guard every 5 minutes
    }


def _compressor_step(v: dict[str, Any], t: float, dt: float) -> dict[str, Any]:
    loaded = v["pressure"] < v["pressure_setpoint"] - 0.3 or (
        v["loaded"] and v["pressure"] < v["pressure_setpoint"] + 0.3
    )
    demand = 0.6 + 0.3 * math.sin(t / 60)
    pressure = v["pressure"] + ((1.2 if loaded else 0.0) - demand) * dt * 0.2 + random.gauss(0, 0.005)
    current = 85.0 if loaded else 32.0
    return {
        "pressure": round(max(0.0, pressure), 3),
        "loaded": loaded,
        "motor_current": round(_toward(v["motor_current"], current, 2.0, dt, 0.3), 2),
        "flow": max(0, round(demand * 1000 + random.gauss(0, 10))),
        "energy_kwh": round(v["energy_kwh"] + current * 0.4 * dt / 3600, 4),
    }


def demo_machines() -> list[Machine]:
    """The machines ``agent simulate`` plays, one Modbus unit id each."""
    H, IN, C, D = Table.HOLDING, Table.INPUT, Table.COIL, Table.DISCRETE
    return [
        Machine(
            "cnc-1",
            "CNC milling machine",
            1,
            [
                Field("spindle_speed", H, 0, DataType.UINT16, unit="rpm", description="spindle speed"),
                Field(
                    "spindle_temp",
                    H,
                    1,
                    DataType.FLOAT32,
                    ByteOrder.ABCD,
                    unit="degC",
                    description="spindle bearing temperature; alarm above 85",
                ),
                Field("alarm_word", H, 3, DataType.UINT16, description="alarm bits: bit 0 spindle overtemp"),
                Field("overtemp_alarm", H, 3, DataType.BOOL, bit=0, description="bit 0 of alarm_word"),
                Field("part_count", H, 10, DataType.UINT32, ByteOrder.CDAB, description="parts made (word-swapped)"),
                Field("program", H, 20, DataType.STRING, length=8, description="active NC program, 16 characters"),
                Field(
                    "feed_override",
                    H,
                    30,
                    DataType.INT16,
                    unit="%",
                    writable=True,
                    description="feed override 0..150 (writable)",
                ),
                Field("running", C, 0, DataType.BOOL, writable=True, description="cycle running (writable)"),
                Field(
                    "coolant",
                    C,
                    1,
                    DataType.BOOL,
                    writable=True,
                    description="coolant pump on (writable); off makes the spindle overheat",
                ),
            ],
            {
                "spindle_speed": 0,
                "spindle_temp": 38.0,
                "alarm_word": 0,
                "overtemp_alarm": False,
                "part_count": 1042,
                "program": "O1234-BRACKET",
                "feed_override": 100,
                "running": True,
                "coolant": True,
            },
            _cnc_step,
        ),
        Machine(
            "press-1",
            "Hydraulic stamping press",
            2,
            [
                Field("cycle_count", H, 0, DataType.UINT32, ByteOrder.ABCD, description="strokes since commissioning"),
                Field("tonnage", H, 2, DataType.INT16, scale=0.1, unit="kN", description="ram force, 0.1 kN per count"),
                Field("stroke_rate", H, 3, DataType.UINT16, unit="1/min", description="actual strokes per minute"),
                Field(
                    "stroke_setpoint",
                    H,
                    10,
                    DataType.UINT16,
                    unit="1/min",
                    writable=True,
                    description="stroke rate setpoint (writable)",
                ),
                Field(
                    "hydraulic_temp",
                    IN,
                    0,
                    DataType.INT16,
                    scale=0.1,
                    unit="degC",
                    description="hydraulic oil temperature",
                ),
                Field("door_open", D, 0, DataType.BOOL, description="safety guard open"),
                Field("running", C, 0, DataType.BOOL, writable=True, description="press enabled (writable)"),
            ],
            {
                "cycle_count": 250_000,
                "_stroke_acc": 0.0,
                "tonnage": 0.0,
                "stroke_rate": 0,
                "stroke_setpoint": 30,
                "hydraulic_temp": 45.0,
                "door_open": False,
                "running": True,
            },
            _press_step,
        ),
        Machine(
            "compressor-1",
            "Screw air compressor",
            3,
            [
                Field(
                    "pressure",
                    IN,
                    0,
                    DataType.FLOAT32,
                    ByteOrder.CDAB,
                    unit="bar",
                    description="discharge pressure (word-swapped float)",
                ),
                Field("flow", IN, 2, DataType.UINT32, ByteOrder.ABCD, unit="l/min", description="free air delivery"),
                Field(
                    "motor_current",
                    IN,
                    4,
                    DataType.UINT16,
                    scale=0.01,
                    unit="A",
                    description="motor current, 0.01 A per count",
                ),
                Field(
                    "energy_kwh",
                    IN,
                    10,
                    DataType.FLOAT64,
                    ByteOrder.DCBA,
                    unit="kWh",
                    description="energy meter (little endian double)",
                ),
                Field(
                    "pressure_setpoint",
                    H,
                    0,
                    DataType.UINT16,
                    scale=0.1,
                    unit="bar",
                    writable=True,
                    description="pressure setpoint, 0.1 bar per count (writable)",
                ),
                Field(
                    "serial_number",
                    H,
                    1,
                    DataType.STRING,
                    ByteOrder.BADC,
                    length=4,
                    description="serial number, byte-swapped string",
                ),
                Field("loaded", C, 0, DataType.BOOL, description="compressor loaded"),
            ],
            {
                "pressure": 7.0,
                "flow": 600,
                "motor_current": 32.0,
                "energy_kwh": 18250.5,
                "pressure_setpoint": 7.5,
                "serial_number": "SC7-0042",
                "loaded": False,
            },
            _compressor_step,
        ),
    ]


def register_map_lines(machines: list[Machine]) -> list[str]:
    """The register map as a plain-text table (printed by ``agent simulate``)."""
    lines = []
    for m in machines:
        lines.append(f"unit {m.unit}  {m.name}  ({m.kind})")
        for f in m.fields:
            where = f"{f.table} {f.address}" + (f".{f.bit}" if f.bit is not None else "")
            kind = (
                f"{f.type}"
                + (f"[{f.length}]" if f.length else "")
                + (f" {f.order}" if f.order is not ByteOrder.ABCD else "")
            )
            extra = (f" x{f.scale:g}" if f.scale != 1 else "") + (f" {f.unit}" if f.unit else "")
            lines.append(f"  {f.name:<18} {where:<14} {kind:<16}{extra:<14} {f.description}")
    return lines

"""User mapping rules: any other topic into a named table (machines that publish MQTT themselves).

::

    mappings:
      - topic: "plant/{line}/{machine}/temp"     # {name} is one topic level, kept as a column
        table: temps
        fields:
          value: {path: "$.value", type: float}
          ts: "$.ts"                             # the reading's time; absent: the time it was received
        key: [line, machine, ts]                 # optional: a redelivered message is stored once

Each row holds the named wildcards, the fields, ``ts`` (epoch ms) and
``received_at``. A payload that does not fit (not JSON, a field missing, a
value that does not convert) is a ``Malformed`` reason for the dead letters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from factory_edge.configmodel import Model

from .messages import INT64, MAX_TS_MS, Malformed, _json_type, check_json, check_scalar, check_text, parse_json

COLUMN_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_TABLES = frozenset(
    {
        "points",
        "batches",
        "status",
        "events",
        "alerts",
        "alert_state",
        "dead_letters",
        "latest",
        "webhook_outbox",
        "alert_series",
        "schema_version",
        "gateway_buffer",
        "device_meta",
        "series",
        "samples",
        "points_minute",
    }
)
RESERVED_PREFIX = "samples_"  # PostgreSQL's day partitions of samples
FieldType = Literal["auto", "float", "int", "str", "bool", "json", "timestamp"]


def _shorthand(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


class FieldSpec(Model):
    """Where a column's value is in the payload, and what it becomes."""

    path: str = "$"
    type: FieldType = "auto"
    unit: Literal["ms", "s"] = "ms"
    required: bool = True
    default: Any = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        parse_path(value)
        return value


FieldEntry = Annotated[FieldSpec, BeforeValidator(_shorthand)]


class MappingRule(Model):
    """One topic pattern into one table."""

    topic: str
    table: str
    payload: Literal["json", "text"] = "json"
    fields: dict[str, FieldEntry] = Field(default_factory=dict)
    key: list[str] = Field(default_factory=list)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        parse_topic(value)
        return value

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        if not COLUMN_RE.match(value):
            raise ValueError("must be a lowercase SQL name: letters, digits and '_', starting with a letter or '_'")
        if value in RESERVED_TABLES or value.startswith(RESERVED_PREFIX):
            raise ValueError(f"{value!r} is one of the bridge's own tables; choose another name")
        return value

    @model_validator(mode="after")
    def _columns(self) -> MappingRule:
        wildcards = parse_topic(self.topic)[1]
        for name in self.fields:
            if not COLUMN_RE.match(name):
                raise ValueError(f"fields: {name!r} is not a lowercase SQL column name")
            if name in wildcards:
                raise ValueError(f"fields: {name!r} is also a topic wildcard")
            if name == "received_at":
                raise ValueError("fields: received_at is set by the bridge")
        if self.payload == "text":
            bad = [n for n, f in self.fields.items() if f.path != "$"]
            if bad:
                raise ValueError(f'fields.{bad[0]}: a text payload has only one value: path must be "$"')
        ts = self.fields.get("ts")
        if ts is not None and ts.type not in ("auto", "timestamp"):
            raise ValueError("fields.ts: the timestamp column must have type timestamp")
        for name in self.key:
            if name not in self.columns:
                raise ValueError(f"key: {name!r} is not a column (columns: {', '.join(self.columns)})")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        wildcards = parse_topic(self.topic)[1]
        names = [*wildcards, *(n for n in self.fields if n != "ts")]
        return (*names, "ts", "received_at")

    def column_types(self) -> dict[str, str]:
        """Column -> field type (wildcards are text, ``ts`` and ``received_at`` timestamps)."""
        types = {name: "str" for name in parse_topic(self.topic)[1]}
        types.update({n: f.type for n, f in self.fields.items() if n != "ts"})
        types["ts"] = "timestamp"
        types["received_at"] = "timestamp"
        return types


# ---------------------------------------------------------------- topics and paths


def parse_topic(template: str) -> tuple[str, list[str], dict[int, str]]:
    """``plant/{line}/+/temp`` -> (``plant/+/+/temp``, ``[line]``, ``{1: "line"}``)."""
    if not template or template.startswith("$"):
        raise ValueError("must be a topic filter such as plant/{line}/{machine}/temp (not empty, not $SYS)")
    levels = template.split("/")
    filters, names, captures = [], [], {}
    for i, level in enumerate(levels):
        if level.startswith("{") and level.endswith("}"):
            name = level[1:-1]
            if not COLUMN_RE.match(name):
                raise ValueError(f"{level}: a wildcard name must be a lowercase SQL column name")
            if name in names:
                raise ValueError(f"{level}: the name is used twice")
            if name in ("ts", "received_at"):
                raise ValueError(f"{level}: {name} is a column the bridge sets")
            names.append(name)
            captures[i] = name
            filters.append("+")
        elif level == "#":
            if i != len(levels) - 1:
                raise ValueError("'#' must be the last level")
            filters.append("#")
        elif level == "+" or not any(c in level for c in "+#{}"):
            filters.append(level)
        else:
            raise ValueError(f"level {level!r}: use {{name}}, + or # as a whole level")
    return "/".join(filters), names, captures


_STEP = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\[(?:"([^"]*)"|'([^']*)')\]""")


def parse_path(path: str) -> tuple[str | int, ...]:
    """``$.a.b[0]["c d"]`` -> ``("a", "b", 0, "c d")``; ``$`` is the whole payload."""
    if not path.startswith("$"):
        raise ValueError(f"{path!r}: a path starts with $ (the payload), e.g. $.value or $.data[0].temp")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        match = _STEP.match(path, pos)
        if not match:
            raise ValueError(f"{path!r}: cannot read the path at {path[pos:]!r}")
        name, index, quoted1, quoted2 = match.groups()
        steps.append(int(index) if index is not None else (name or quoted1 or quoted2 or ""))
        pos = match.end()
    return tuple(steps)


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    f_levels, t_levels = filter_.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
        if i == 0 and level == "+" and topic.startswith("$"):
            return False
    return len(f_levels) == len(t_levels)


# ---------------------------------------------------------------- applying a rule


@dataclass(frozen=True)
class Mapping:
    """A compiled rule: extract a row from a message."""

    rule: MappingRule
    filter: str
    captures: dict[int, str]
    paths: dict[str, tuple[str | int, ...]]

    @classmethod
    def of(cls, rule: MappingRule) -> Mapping:
        filter_, _, captures = parse_topic(rule.topic)
        return cls(rule, filter_, captures, {n: parse_path(f.path) for n, f in rule.fields.items()})

    @property
    def table(self) -> str:
        return self.rule.table

    def row(self, topic: str, payload: bytes, received_at: int) -> dict[str, Any]:
        """The row for this message, or Malformed naming the field that does not fit."""
        levels = topic.split("/")
        row: dict[str, Any] = {name: check_text(levels[i], f"topic level {name}") for i, name in self.captures.items()}
        if self.rule.payload == "text":
            try:
                doc: Any = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise Malformed("payload: not UTF-8 text") from None
        else:
            doc = parse_json(payload)
        for name, spec in self.rule.fields.items():
            found, value = _extract(doc, self.paths[name])
            if not found or value is None:
                if spec.required and spec.default is None:
                    raise Malformed(f"fields.{name}: {spec.path} not found in the payload")
                value = spec.default
                if value is None:
                    row[name] = None
                    continue
            row[name] = convert(
                value,
                "timestamp" if name == "ts" and spec.type == "auto" else spec.type,
                f"fields.{name}",
                unit=spec.unit,
            )
        row.setdefault("ts", received_at)
        row["received_at"] = received_at
        return row


def _extract(doc: Any, steps: tuple[str | int, ...]) -> tuple[bool, Any]:
    for step in steps:
        if isinstance(step, int):
            if type(doc) is not list or step >= len(doc):
                return False, None
        elif type(doc) is not dict or step not in doc:
            return False, None
        doc = doc[step]
    return True, doc


_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


def convert(value: Any, kind: str, where: str, *, unit: str = "ms") -> Any:
    """One extracted value into its column type, or Malformed."""
    if kind == "auto":
        if isinstance(value, (dict, list)):
            check_json(value, where)
            return value  # each store serializes objects and arrays as JSON
        return check_scalar(value, where)
    if kind == "json":
        check_json(value, where)
        return value
    if kind == "str":
        if isinstance(value, (dict, list)):
            raise Malformed(f"{where}: expected text, got {_json_type(value)}")
        text = (
            value
            if isinstance(value, str)
            else (
                "true"
                if value is True
                else "false"
                if value is False
                else repr(value)
                if isinstance(value, float)
                else str(value)
            )
        )
        return check_text(text, where)
    if kind == "bool":
        if type(value) is bool:
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise Malformed(f"{where}: expected true/false, got {_describe(value)}")
    if kind == "float":
        number = _number(value, where)
        result = float(number) if abs(number) < 1e308 or isinstance(number, float) else math.inf
        if not math.isfinite(result):
            raise Malformed(f"{where}: {_describe(value)} is not a finite number")
        return result
    if kind == "int":
        number = _number(value, where)
        if isinstance(number, float):
            if not number.is_integer():
                raise Malformed(f"{where}: expected an integer, got {_describe(value)}")
            number = int(number)
        if not -INT64 <= number < INT64:
            raise Malformed(f"{where}: integer out of the 64-bit range")
        return number
    if kind == "timestamp":
        return _timestamp(value, where, unit)
    raise AssertionError(kind)


def _number(value: Any, where: str) -> int | float:
    if type(value) in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise Malformed(f"{where}: {value} is not a finite number")
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            number = float(value.strip())
        except ValueError:
            raise Malformed(f"{where}: expected a number, got {_describe(value)}") from None
        if not math.isfinite(number):
            raise Malformed(f"{where}: {_describe(value)} is not a finite number")
        return number
    raise Malformed(f"{where}: expected a number, got {_describe(value)}")


def _timestamp(value: Any, where: str, unit: str) -> int:
    if isinstance(value, str) and not value.strip().lstrip("-").replace(".", "", 1).isdigit():
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Malformed(f"{where}: expected epoch {unit} or an ISO 8601 time, got {_describe(value)}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # documented: times without a zone are UTC
        ms = round(moment.timestamp() * 1000)
    else:
        number = _number(value, where)
        ms = round(number * 1000) if unit == "s" else round(number)
    if not 0 <= ms <= MAX_TS_MS:
        raise Malformed(f"{where}: {_describe(value)} is not a time between 1970 and 9999")
    return ms


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

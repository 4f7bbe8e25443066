"""Alert rules as configured, and what one reading means for a rule: trigger, hold or clear.

::

    rules:
      - {name: spindle-overtemp, device: "cnc-*", tag: spindle_temp,
         above: 85, for: 30s, clear_below: 80, severity: critical, notify: [ops]}
      - {name: silent, device: "*", stale: 60s, severity: warning}
      - {name: gw-offline, offline: true, for: 1m}

A rule has exactly one condition. Between the trigger and the clear
condition (``clear_below`` for ``above``, …) a firing alert holds: that is
the hysteresis that keeps a value hovering at the limit from flapping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from factory_edge.configmodel import NAME_PATTERN, Duration, Model
from factory_edge.units import format_duration

from .template import DEFAULTS, check_template

Severity = Literal["info", "warning", "critical"]
CONDITIONS = ("above", "below", "outside", "equals", "rate_above", "rate_below", "stale", "offline")


class WebhookConfig(Model):
    """An HTTP endpoint that receives alert changes as signed JSON POSTs."""

    url: str = Field(pattern=r"^https?://[^\s]+$")
    secret: str | None = None
    timeout: Duration = 5.0
    max_attempts: int = Field(default=10, ge=1, le=1000)
    max_backoff: Duration = 300.0
    headers: dict[str, str] = Field(default_factory=dict)


class AlertRule(Model):
    """One alert rule (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN, max_length=128)
    gateway: str = "*"
    device: str = "*"
    tag: str | None = None
    above: float | None = None
    below: float | None = None
    outside: tuple[float, float] | None = None
    equals: bool | int | float | str | None = None
    rate_above: float | None = None
    rate_below: float | None = None
    stale: Duration | None = None
    offline: bool = False
    for_: Duration = Field(default=0.0, alias="for")
    clear_below: float | None = None
    clear_above: float | None = None
    clear_inside: tuple[float, float] | None = None
    severity: Severity = "warning"
    message: str | None = None
    notify: list[str] = Field(default_factory=list)

    @field_validator("message")
    @classmethod
    def _message(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value)

    @field_validator("outside", "clear_inside")
    @classmethod
    def _band(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"the band's low end {value[0]:g} is above its high end {value[1]:g}")
        return value

    @model_validator(mode="after")
    def _one_condition(self) -> AlertRule:
        given = [c for c in CONDITIONS if self._has(c)]
        if len(given) != 1:
            raise ValueError(
                f"rule {self.name!r}: give exactly one condition of {', '.join(CONDITIONS)} "
                f"(got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind in ("above", "below", "outside", "equals", "rate_above", "rate_below") and self.tag is None:
            raise ValueError(f"rule {self.name!r}: {kind} needs tag: (a tag name or a glob)")
        if kind == "offline" and (self.tag is not None or self.device != "*"):
            raise ValueError(f"rule {self.name!r}: offline is about gateways: no device: or tag:")
        if kind == "stale" and self.for_:
            raise ValueError(f"rule {self.name!r}: stale is a duration already; for: does not apply")
        allowed = {
            "above": {"clear_below"},
            "rate_above": {"clear_below"},
            "below": {"clear_above"},
            "rate_below": {"clear_above"},
            "outside": {"clear_inside"},
        }.get(kind, set())
        for clear in ("clear_below", "clear_above", "clear_inside"):
            if getattr(self, clear) is not None and clear not in allowed:
                raise ValueError(
                    f"rule {self.name!r}: {clear} does not go with {kind}"
                    + (f" (use {', '.join(sorted(allowed))})" if allowed else "")
                )
        limit = getattr(self, kind)
        if self.clear_below is not None and self.clear_below > limit:
            raise ValueError(
                f"rule {self.name!r}: clear_below {self.clear_below:g} must not be above "
                f"{kind} {limit:g} (it is the lower end of the hysteresis)"
            )
        if self.clear_above is not None and self.clear_above < limit:
            raise ValueError(
                f"rule {self.name!r}: clear_above {self.clear_above:g} must not be below "
                f"{kind} {limit:g} (it is the upper end of the hysteresis)"
            )
        if (
            self.clear_inside is not None
            and self.outside is not None
            and not (self.outside[0] <= self.clear_inside[0] <= self.clear_inside[1] <= self.outside[1])
        ):
            raise ValueError(f"rule {self.name!r}: clear_inside must lie within outside")
        return self

    @property
    def kind(self) -> str:
        return next(c for c in CONDITIONS if self._has(c))

    def _has(self, condition: str) -> bool:
        value = getattr(self, condition)
        return value is True if condition == "offline" else value is not None


class Verdict(enum.Enum):
    TRIGGER = "trigger"
    HOLD = "hold"  # between the trigger and the clear condition: a firing alert stays firing
    CLEAR = "clear"


def _plain(limit: float) -> float | int:
    """``85.0`` as written ``85`` in messages."""
    return int(limit) if limit.is_integer() else limit


def _number(value: Any) -> bool:
    return type(value) in (int, float)


@dataclass(frozen=True)
class Rule:
    """A rule ready to judge readings."""

    config: AlertRule
    kind: str  # value | rate | stale | offline
    for_ms: int
    stale_ms: int
    condition: str
    threshold: Any

    @classmethod
    def of(cls, config: AlertRule) -> Rule:
        kind = config.kind
        family = {"rate_above": "rate", "rate_below": "rate", "stale": "stale", "offline": "offline"}.get(kind, "value")
        threshold: Any  # a number for value and rate rules (alert payloads carry it as one), else text
        if kind == "outside":
            lo, hi = config.outside  # type: ignore[misc]
            condition, threshold = f"outside {lo:g}..{hi:g}", f"{lo:g}..{hi:g}"
        elif kind == "equals":
            value = config.equals
            shown = ("true" if value else "false") if isinstance(value, bool) else str(value)
            condition, threshold = f"equals {shown}", shown
        elif kind in ("above", "below"):
            number = _plain(getattr(config, kind))
            condition, threshold = f"{kind} {number:g}", number
        elif kind in ("rate_above", "rate_below"):
            number = _plain(getattr(config, kind))
            condition, threshold = f"rate {kind[5:]} {number:g}/s", number
        elif kind == "stale":
            threshold = format_duration(config.stale or 0)
            condition = f"no data for {threshold}"
        else:
            condition, threshold = "gateway offline", "offline"
        return cls(config, family, round(config.for_ * 1000), round((config.stale or 0) * 1000), condition, threshold)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def template(self) -> str:
        return self.config.message or DEFAULTS[self.kind]

    def matches(self, gw: str, device: str, tag: str | None) -> bool:
        c = self.config
        return (
            fnmatchcase(gw, c.gateway)
            and (self.kind == "offline" or fnmatchcase(device, c.device))
            and (c.tag is None or (tag is not None and fnmatchcase(tag, c.tag)))
        )

    def judge(self, value: Any, rate: float | None) -> Verdict | None:
        """What a reading (or, for rate rules, its rate of change per second) means; None: not applicable."""
        c = self.config
        if self.kind == "rate":
            if rate is None:
                return None
            value = rate
        if c.equals is not None:
            if isinstance(c.equals, str) != isinstance(value, str):
                return Verdict.CLEAR  # "1" is not 1
            return Verdict.TRIGGER if value == c.equals else Verdict.CLEAR
        if not _number(value):
            return None
        if c.above is not None or c.rate_above is not None:
            limit = c.above if c.above is not None else c.rate_above
            if value > limit:
                return Verdict.TRIGGER
            return Verdict.HOLD if c.clear_below is not None and value >= c.clear_below else Verdict.CLEAR
        if c.below is not None or c.rate_below is not None:
            limit = c.below if c.below is not None else c.rate_below
            if value < limit:
                return Verdict.TRIGGER
            return Verdict.HOLD if c.clear_above is not None and value <= c.clear_above else Verdict.CLEAR
        if c.outside is not None:
            lo, hi = c.outside
            if value < lo or value > hi:
                return Verdict.TRIGGER
            if c.clear_inside is not None and not c.clear_inside[0] <= value <= c.clear_inside[1]:
                return Verdict.HOLD
            return Verdict.CLEAR
        return None

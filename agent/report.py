"""Report by exception: which readings are worth buffering and publishing.

Per tag, compared with the last *reported* point (so a slow drift is
reported once it adds up to the deadband):

- a tag without ``deadband`` reports every reading;
- with ``deadband`` (absolute, or percent of the last reported value) a
  number is reported when it moves by more than the deadband; other values
  when they change;
- a change of quality or error is always reported;
- ``max_silence`` republishes an unchanged value at least that often
  (default with a deadband: ``DEFAULT_MAX_SILENCE_S``), so consumers can tell
  a steady value from a dead gateway.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.configtypes import Deadband
from drivers.points import Point

DEFAULT_MAX_SILENCE_S = 300.0


@dataclass(frozen=True, slots=True)
class Rule:
    deadband: Deadband | None
    max_silence_ms: int | None


def _moved(value: object, last: object, deadband: Deadband) -> bool:
    numbers = (int, float)
    if (
        isinstance(value, bool)
        or isinstance(last, bool)
        or not (isinstance(value, numbers) and isinstance(last, numbers))
    ):
        return value != last
    limit = abs(last) * deadband.value / 100 if deadband.percent else deadband.value
    return abs(value - last) > limit or (limit == 0 and value != last)


class ReportFilter:
    """Keeps the last reported point of every tag; ``select`` returns the points to report."""

    def __init__(self, rules: dict[tuple[str, str], Rule]) -> None:
        self.rules = rules
        self._last: dict[tuple[str, str], Point] = {}

    @classmethod
    def for_devices(cls, devices: Iterable[object]) -> ReportFilter:
        rules = {}
        for device in devices:
            for tag in device.tags:  # type: ignore[attr-defined]
                silence = tag.max_silence
                if silence is None and tag.deadband is None:
                    continue  # reports every reading: no rule, nothing to remember
                if silence is None:
                    silence = DEFAULT_MAX_SILENCE_S
                rules[(device.name, tag.name)] = Rule(  # type: ignore[attr-defined]
                    tag.deadband, None if silence is None else int(silence * 1000)
                )
        return cls(rules)

    def select(self, points: Sequence[Point]) -> list[Point]:
        rules = self.rules
        if not rules:  # no deadband or max_silence anywhere: every reading, as it is (the common case)
            return list(points)
        out = []
        for point in points:
            key = (point.device, point.tag)
            rule = rules.get(key)
            if rule is None:
                out.append(point)
                continue
            last = self._last.get(key)
            if last is None or self._report(point, last, rule):
                self._last[key] = point
                out.append(point)
        return out

    @staticmethod
    def _report(point: Point, last: Point, rule: Rule) -> bool:
        if point.quality is not last.quality or point.error != last.error:
            return True
        if rule.max_silence_ms is not None and point.ts - last.ts >= rule.max_silence_ms:
            return True
        if rule.deadband is None:
            return rule.max_silence_ms is None or point.value != last.value
        return _moved(point.value, last.value, rule.deadband)

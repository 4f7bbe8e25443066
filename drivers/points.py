"""Points: one reading of one tag, the unit of data from driver to broker."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

Value = bool | int | float | str | None


class Quality(enum.StrEnum):
    """Quality of a reading, as in the payload contract."""

    GOOD = "good"
    BAD = "bad"
    UNCERTAIN = "uncertain"


def now_ms() -> int:
    """Current time as epoch milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Point:
    """One reading: ``ts`` is epoch milliseconds at the source.

    Not frozen: a frozen dataclass pays for ``object.__setattr__`` on every
    field, and a busy gateway makes tens of thousands of points a second.
    Treat points as values all the same.
    """

    device: str
    tag: str
    ts: int
    value: Value
    quality: Quality = Quality.GOOD
    error: str | None = None

    def to_payload(self) -> dict[str, Any]:
        """The point as it appears in a data batch (``tag``, ``ts``, ``v``, ``q``, ``err``)."""
        doc: dict[str, Any] = {"tag": self.tag, "ts": self.ts, "v": self.value, "q": str(self.quality)}
        if self.error is not None:
            doc["err"] = self.error
        return doc

    @classmethod
    def bad(cls, device: str, tag: str, error: str, ts: int | None = None) -> Point:
        """A failed read: ``bad`` quality, no value, the reason in ``err``."""
        return cls(device, tag, now_ms() if ts is None else ts, None, Quality.BAD, error)

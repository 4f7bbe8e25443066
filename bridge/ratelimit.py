"""A tenant's ingest rate limit (``limits.points_per_s``): a token bucket that delays, never drops.

The bucket fills at ``points_per_s`` up to one second's worth. Each commit
window takes its points out of it (a batch's points even when it was
stored before: a replay costs a decode and a claim all the same; any other
message, a status, an event or a dead letter, one point), and may leave it in debt; the
tenant's ingest loop then waits for the debt to be paid before it takes
the next window. Meanwhile nothing is acknowledged beyond what was stored,
so MQTT flow control (the bridge's Receive Maximum) keeps the rest in the
tenant broker's queue for the bridge's session, and the agents keep their
unconfirmed batches: a tenant over its rate is slowed, nothing is lost.

Each tenant has its own bucket, ingest task and store thread, so waiting
here never delays another tenant. While a tenant is over its rate its
windows are also cut to what its bucket holds, or about ``WINDOW_S`` of
its rate when it is empty (from the points per message seen so far), so
its work comes in small, even slices instead of rare big ones that would
compete with the other tenants for the CPU.

The points of a window that found the bucket empty are its *delayed
points*: counted in ``usage_hourly.delayed_points`` in the window's own
transaction, logged (at most once a minute per tenant) and exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW_S = 0.1  # a throttled tenant's commit window: about this much of its rate
BURST_S = 1.0  # the bucket holds one second of the rate


class TokenBucket:
    """``points_per_s`` tokens a second, up to ``points_per_s * BURST_S``; None: no limit."""

    def __init__(self, points_per_s: int | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rate: int | None = None
        self._tokens = 0.0
        self._at = clock()
        self._points = 0  # points and messages seen: the window size estimate
        self._messages = 0
        self.rate = points_per_s

    @property
    def rate(self) -> int | None:
        return self._rate

    @rate.setter
    def rate(self, points_per_s: int | None) -> None:
        if points_per_s == self._rate:
            return
        self._refill()
        self._rate = points_per_s
        if points_per_s is not None:
            self._tokens = min(self._tokens, points_per_s * BURST_S) if self._tokens else points_per_s * BURST_S

    def _refill(self) -> float:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self._rate * BURST_S, self._tokens + (now - self._at) * self._rate)
        self._at = now
        return self._tokens

    def over(self, points: int) -> int:
        """How many of ``points`` would come above the rate now (nothing is taken)."""
        if self._rate is None or points <= 0:
            return 0
        return max(0, points - max(0, int(self._refill())))

    def take(self, points: int, messages: int) -> None:
        """A window with ``points`` new points in ``messages`` messages was stored."""
        self._points += points
        self._messages += messages
        if self._rate is not None and points > 0:
            self._refill()
            self._tokens -= points

    def delay_s(self) -> float:
        """How long to wait before the next window (0: the bucket is not in debt)."""
        if self._rate is None:
            return 0.0
        tokens = self._refill()
        return 0.0 if tokens >= 0 else -tokens / self._rate

    def window(self, max_messages: int) -> int:
        """Messages to take in the next window: what the bucket holds (at most one second of the rate), or about
        ``WINDOW_S`` of the rate when it is empty; never every queued message at once once the debt is paid."""
        if self._rate is None:
            return max_messages
        if not self._messages:
            return 1  # nothing known yet of the points per message: one, to learn it (a backlog is not one debt)
        per_message = max(1.0, self._points / self._messages)
        allowed = max(self._refill(), self._rate * WINDOW_S)
        return max(1, min(max_messages, int(allowed / per_message)))


__all__ = ["BURST_S", "WINDOW_S", "TokenBucket"]

"""Failed attempts per client: after ``max_failures`` within ``window_s``, refuse that client (429).

Every refused request (401, 403, 409, 422) counts; once a client has too
many in the window, every request of it is refused with ``Retry-After``
until the oldest failure leaves the window, before any key is looked up,
so guessing keys costs the guesser time and the service nothing.

Clients are told apart by their address as the API sees it. Behind a
reverse proxy that would be the proxy's: run the API on its own port, or
extend this with a trusted forwarded-for header. State is in memory, per
process: a restart forgets it, which only ever favours legitimate clients.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

MAX_CLIENTS = 10_000


class FailureLimiter:
    def __init__(
        self, *, max_failures: int = 10, window_s: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_failures < 1 or window_s <= 0:
            raise ValueError("max_failures must be >= 1 and window_s > 0")
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, at: float) -> deque[float]:
        failures = self._failures.get(client)
        if failures is None:
            return deque()
        while failures and failures[0] <= at - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
        return failures

    def _wait(self, client: str, at: float) -> int:
        failures = self._recent(client, at)
        if len(failures) < self.max_failures:
            return 0
        return max(1, math.ceil(failures[-self.max_failures] + self.window_s - at))

    def _record(self, client: str, at: float) -> None:
        if len(self._failures) >= MAX_CLIENTS:  # many addresses: forget the ones whose window has passed
            for other in list(self._failures):
                self._recent(other, at)
        self._recent(client, at)
        self._failures.setdefault(client, deque()).append(at)

    def blocked_for(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        with self._lock:
            return self._wait(client, self._clock())

    def failed(self, client: str) -> None:
        with self._lock:
            self._record(client, self._clock())

    def attempt(self, client: str) -> int:
        """``blocked_for``, and when not blocked, this attempt counted as a failure at once, in the same lock.

        Checking first and counting only after a slow check (a password hash) lets concurrent attempts
        all pass the check before any is counted; counting first closes that. ``forgive`` takes the
        count back when the attempt succeeded.
        """
        with self._lock:
            at = self._clock()
            wait = self._wait(client, at)
            if not wait:
                self._record(client, at)
            return wait

    def forgive(self, client: str) -> None:
        """Take back one counted attempt of ``client`` (it succeeded)."""
        with self._lock:
            failures = self._failures.get(client)
            if failures:
                failures.pop()
                if not failures:
                    del self._failures[client]


__all__ = ["FailureLimiter"]

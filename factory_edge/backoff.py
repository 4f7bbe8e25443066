"""Exponential backoff with jitter, for every reconnect loop (devices, the agent's broker link, the bridge)."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter: 0.5 s, 1 s, 2 s … capped, each scaled by a random factor."""

    def __init__(self, *, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        # Jitter in [50%, 100%] of the ceiling: spreads reconnect storms
        # after a network blip while keeping the schedule predictable.
        return ceiling * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0

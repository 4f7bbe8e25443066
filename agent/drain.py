"""The "old" stream of a connection: what the publisher sends besides live batches, oldest first.

    backlog   batches buffered before the connection (or, in Sparkplug mode, before the births) and never
              accepted by the broker: one pass, in seq order
    replay    broker mode: what the broker accepted just before the last connection was lost: one pass
    resend    storage mode: accepted batches the gap rule says were lost (``delivery.py``): a pass every
              ``RESCAN_S``, each with the cutoffs of its start

The publisher fills its window alternately from this and the live batches,
so neither starves. Every query walks an index and stops at ``limit``.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from .buffer import Batch
from .bufferread import BufferReader
from .delivery import DeliveryPolicy

RESCAN_S = 2.0


class OldStream:
    def __init__(
        self, reader: BufferReader, policy: DeliveryPolicy, *, boundary: int, replay_from: int | None, limit: int
    ) -> None:
        self.reader = reader
        self.policy = policy
        self.boundary = boundary
        self.replay_from = replay_from
        self.limit = limit
        self.phase = "backlog"
        self._after = 0
        self._cutoffs: tuple[int, int] | None = None
        self._next_scan = 0.0

    @property
    def replaying(self) -> bool:
        """Broker mode, until the replay pass is over: accepted batches it still needs must not be forgotten."""
        return self.replay_from is not None and self.phase in ("backlog", "replay")

    def take(self, now_ms: int, busy: Collection[int]) -> list[Batch]:
        """The next batches to send (none in flight or being recorded), or [] when there is nothing now."""
        while True:
            fetched = self._fetch(now_ms)
            if fetched is None:
                return []
            if not fetched:
                self._next_phase()
                continue
            self._after = fetched[-1].seq
            chosen = [b for b in fetched if b.seq not in busy]
            if chosen:
                return chosen

    def _fetch(self, now_ms: int) -> list[Batch] | None:
        if self.phase == "backlog":
            return self.reader.pending(self._after, self.limit, below=self.boundary)
        if self.phase == "replay":
            assert self.replay_from is not None
            return self.reader.replay(self._after, self.limit, accepted_from=self.replay_from)
        if self.phase == "resend":
            if self._cutoffs is None:
                return []
            first_before, sent_before = self._cutoffs
            return self.reader.resend(self._after, self.limit, first_before=first_before, sent_before=sent_before)
        # idle: start a resend pass when one is due
        if not self.policy.storage or time.monotonic() < self._next_scan:
            return None
        self._cutoffs = self.policy.resend_cutoffs(now_ms)
        self._next_scan = time.monotonic() + RESCAN_S
        if self._cutoffs is None:
            return None
        self.phase, self._after = "resend", 0
        return self._fetch(now_ms)

    def _next_phase(self) -> None:
        self._after = 0
        if self.phase == "backlog" and self.replay_from is not None:
            self.phase = "replay"
        else:
            self.phase = "idle"
            self.replay_from = None

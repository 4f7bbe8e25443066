"""When to send an accepted batch again: the agent's half of storage-confirmed delivery.

A broker's PUBACK says it has the batch in memory, not that the tenant's
storage has it: Mosquitto saves its state every ``autosave_interval``, so a
``kill -9`` loses what it acknowledged since, including everything it held
for a bridge that was away. So, in ``storage`` mode, a batch stays in the
buffer, *accepted*, until the bridge confirms it on ``gw/{gw}/ack``, and is
sent again when there is evidence it was lost:

- **gap**: a batch the broker accepted *later* has been confirmed, and this
  one was last sent more than ``confirm_timeout`` ago. "Later" compares the
  *first* acceptances (the order the broker queued them in): sending a
  batch again moves only its last-sent time, so a probe whose original
  copy the bridge then confirms does not make the whole backlog look lost. A broker hands a
  session's messages over in order, so the bridge has passed this batch by:
  the broker lost it (or lost its confirmation; the bridge stores a repeat
  once and confirms it again). The timeout absorbs the reordering of several
  bridges on a shared subscription.
- **probe**: nothing accepted after the oldest unconfirmed batch has been
  confirmed for ``confirm_timeout``, e.g. a quiet gateway whose last batches
  the broker lost. The oldest one is sent again, alone; once the bridge
  confirms it, the gap rule takes the rest. While nothing is confirmed
  (the bridge is stopped for hours), probes back off to one per
  ``MAX_PROBE_INTERVAL_S``: the backlog waits in the broker's queue and in
  the buffer, not on the wire again.

In ``broker`` mode (consumers other than our bridge) a PUBACK is the end:
accepted batches are kept ``replay`` seconds and, after a reconnect, those
accepted within ``replay`` before the connection was lost are sent again
(the broker may have crashed before saving them); then forgotten.

Pure logic over times in epoch milliseconds; the publisher asks, the buffer
answers with SQL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .buffer import Confirm

MAX_PROBE_INTERVAL_S = 600.0


class SteadyClock:
    """Epoch milliseconds that never jump: the wall clock at start, advanced by the monotonic clock.

    Acceptance times and the delivery timeouts use it, so an NTP step (a
    gateway that booted with a wrong clock) neither sends the whole
    backlog again nor holds a lost batch back. Across restarts the wall
    clock anchors it again; the buffer moves acceptance times it finds in
    the future back to the present (``Buffer.clamp_accepted``).
    """

    def __init__(self) -> None:
        self._anchor_ms = time.time_ns() // 1_000_000 - time.monotonic_ns() // 1_000_000

    def __call__(self) -> int:
        return self._anchor_ms + time.monotonic_ns() // 1_000_000


@dataclass
class DeliveryPolicy:
    mode: Confirm
    confirm_timeout_s: float
    replay_s: float
    newest_confirmed_ms: int | None = None  # first broker acceptance of the newest confirmed batch
    _probe_interval_s: float = 0.0
    _probe_at_ms: int = 0

    def __post_init__(self) -> None:
        self._probe_interval_s = self.confirm_timeout_s

    @property
    def storage(self) -> bool:
        return self.mode == "storage"

    # ---------------------------------------------------------------- storage mode

    def confirmed(self, newest_first_ms: int | None) -> None:
        """The bridge confirmed batches; the latest first acceptance among them (None if not known)."""
        if newest_first_ms is not None and (
            self.newest_confirmed_ms is None or newest_first_ms > self.newest_confirmed_ms
        ):
            self.newest_confirmed_ms = newest_first_ms
        self._probe_interval_s = self.confirm_timeout_s  # the bridge is there: probe promptly again

    def resend_cutoffs(self, now_ms: int) -> tuple[int, int] | None:
        """Gap rule: accepted batches first accepted before the first value and last sent before the second
        are sent again; None: none are."""
        if not self.storage or self.newest_confirmed_ms is None:
            return None
        return self.newest_confirmed_ms, now_ms - int(self.confirm_timeout_s * 1000)

    def probe_due(self, first_ms: int | None, sent_ms: int | None, now_ms: int) -> bool:
        """Send the oldest unconfirmed batch (first accepted at ``first_ms``, last sent at ``sent_ms``) again now?"""
        if not self.storage or first_ms is None or sent_ms is None or now_ms < self._probe_at_ms:
            return False
        if now_ms - sent_ms < self.confirm_timeout_s * 1000:
            return False
        return self.newest_confirmed_ms is None or first_ms >= self.newest_confirmed_ms  # else: the gap rule

    def probed(self, now_ms: int) -> None:
        self._probe_at_ms = now_ms + int(self._probe_interval_s * 1000)
        self._probe_interval_s = min(MAX_PROBE_INTERVAL_S, self._probe_interval_s * 2)

    # ---------------------------------------------------------------- broker mode

    def replay_from(self, last_accepted_ms: int | None) -> int | None:
        """After a reconnect: batches accepted from this time on are sent again (None: none)."""
        if self.storage or not self.replay_s or last_accepted_ms is None:
            return None
        return last_accepted_ms - int(self.replay_s * 1000)

    def forget_before(self, now_ms: int, replay_from: int | None) -> int | None:
        """Accepted batches older than this are forgotten (never one a pending replay still needs)."""
        if self.storage:
            return None
        cutoff = now_ms - int(self.replay_s * 1000)
        return cutoff if replay_from is None else min(cutoff, replay_from)

"""When an accepted batch is sent again (pure policy), and the confirmation payload."""

from __future__ import annotations

import itertools
import json

import pytest

from agent.delivery import MAX_PROBE_INTERVAL_S, DeliveryPolicy
from factory_edge.acks import decode_acks, encode_acks, ranges

S = 1000  # ms


def test_nothing_is_sent_again_before_the_bridge_has_confirmed_anything_newer() -> None:
    policy = DeliveryPolicy("storage", confirm_timeout_s=30, replay_s=10)
    assert policy.resend_cutoffs(1_000 * S) is None  # no confirmation yet: no evidence of loss
    policy.confirmed(500 * S)  # the batch first accepted at t=500 s is stored
    # First accepted before it (the broker had it earlier in its queue) and last sent over 30 s ago: lost.
    assert policy.resend_cutoffs(1_000 * S) == (500 * S, 970 * S)
    policy.confirmed(400 * S)  # an older one confirmed later changes nothing
    assert policy.resend_cutoffs(1_000 * S) == (500 * S, 970 * S)


def test_probe_only_when_nothing_newer_was_confirmed_and_backing_off_while_nothing_answers() -> None:
    policy = DeliveryPolicy("storage", confirm_timeout_s=30, replay_s=10)
    assert not policy.probe_due(100 * S, 100 * S, 120 * S)  # sent too recently
    assert policy.probe_due(100 * S, 100 * S, 131 * S)
    policy.probed(131 * S)
    assert not policy.probe_due(100 * S, 100 * S, 150 * S)  # once per interval
    times = []
    now = 131 * S
    for _ in range(12):
        while not policy.probe_due(100 * S, 100 * S, now):
            now += S
        times.append(now)
        policy.probed(now)
    gaps = [(b - a) / S for a, b in itertools.pairwise(times)]
    assert gaps[0] == 60 and gaps[1] == 120 and max(gaps) == MAX_PROBE_INTERVAL_S  # doubling, capped
    policy.confirmed(50 * S)  # the bridge answers: probing becomes prompt again
    policy.probed(now)
    assert policy.probe_due(100 * S, 100 * S, now + 30 * S)


def test_a_probe_sent_again_does_not_make_the_backlog_look_lost() -> None:
    """A probe moves the batch's last-sent time, not its first acceptance: when the bridge confirms the copy
    the broker had queued long ago, only batches queued before that copy count as lost."""
    policy = DeliveryPolicy("storage", confirm_timeout_s=30, replay_s=10)
    policy.confirmed(100 * S)  # seq 1, first accepted at 100 s, probed (sent again) at 900 s, now confirmed
    first_before, _ = policy.resend_cutoffs(1_000 * S) or (0, 0)
    assert first_before == 100 * S  # not 900 s: the 800 s of backlog behind it is not "lost"


def test_no_probe_when_the_gap_rule_already_covers_the_batch() -> None:
    policy = DeliveryPolicy("storage", confirm_timeout_s=30, replay_s=10)
    policy.confirmed(200 * S)
    assert not policy.probe_due(100 * S, 100 * S, 1_000 * S)  # first accepted before a confirmed one
    assert policy.probe_due(300 * S, 300 * S, 1_000 * S)


def test_broker_mode_replays_from_before_the_connection_was_lost_not_before_the_reconnect() -> None:
    policy = DeliveryPolicy("broker", confirm_timeout_s=30, replay_s=10)
    assert policy.resend_cutoffs(10**9) is None and not policy.probe_due(0, 0, 10**9)
    last_puback = 1_000 * S  # the connection was lost after this; the agent reconnects much later
    replay_from = policy.replay_from(last_puback)
    assert replay_from == 990 * S
    assert policy.forget_before(5_000 * S, replay_from) == 990 * S  # nothing the replay needs is forgotten
    assert policy.forget_before(5_000 * S, None) == 4_990 * S


def test_confirmation_payload_round_trip_and_refusals() -> None:
    assert ranges([5, 1, 2, 3, 9, 10, 3]) == [(1, 3), (5, 5), (9, 10)]
    payload = encode_acks([1, 2, 3, 5])
    assert json.loads(payload) == {"v": 1, "seqs": [[1, 3], [5, 5]]}
    assert decode_acks(payload) == [(1, 3), (5, 5)]
    for bad, why in [
        (b"{", "not JSON"),
        (b'{"v":2,"seqs":[]}', "expected"),
        (b'{"v":1,"seqs":[[3,1]]}', "range"),
        (b'{"v":1,"seqs":[[1,"2"]]}', "range"),
        (b'{"v":1,"seqs":[[-1,2]]}', "range"),
        (b'{"v":1,"seqs":[[1,2,3]]}', "range"),
    ]:
        with pytest.raises(ValueError, match=why):
            decode_acks(bad)

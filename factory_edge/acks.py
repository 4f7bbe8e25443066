"""Storage confirmations: which of a gateway's batches are committed to the tenant's storage.

The bridge publishes them after each commit on ``gw/{gw}/ack`` (QoS 1, not
retained); the agent deletes a batch from its buffer only when one names
its ``seq``. The payload is JSON, readable in ``mosquitto_sub``::

    {"v":1,"seqs":[[1040,1042],[1045,1045]]}

``seqs`` holds inclusive ranges, ascending and merged where contiguous. A
range names only seqs that are stored (as data, as duplicates of stored
data, or as a dead letter); the ACL lets only bridge identities publish on
this topic, so a gateway cannot confirm its own data into oblivion.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

VERSION = 1
MAX_RANGES = 10_000  # one message per window: far more than any window holds
MAX_SEQ = 2**63 - 1

Range = tuple[int, int]


def ack_topic(gateway: str) -> str:
    return f"gw/{gateway}/ack"


def ranges(seqs: Iterable[int]) -> list[Range]:
    """Sorted, merged inclusive ranges of the given seqs."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return [(a, b) for a, b in out]


def encode_acks(seqs: Iterable[int]) -> bytes:
    return json.dumps({"v": VERSION, "seqs": ranges(seqs)}, separators=(",", ":")).encode()


def decode_acks(payload: bytes) -> list[Range]:
    """The ranges of a confirmation; ValueError with a one-line reason when it is not one."""
    if len(payload) > 64 * MAX_RANGES:
        raise ValueError(f"{len(payload)} bytes: longer than any confirmation")
    try:
        doc = json.loads(payload)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION or not isinstance(doc.get("seqs"), list):
        raise ValueError('expected {"v":1,"seqs":[[first,last],…]}')
    items = doc["seqs"]
    if len(items) > MAX_RANGES:
        raise ValueError(f"more than {MAX_RANGES} ranges")
    out: list[Range] = []
    for item in items:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or any(type(v) is not int for v in item)
            or not 0 <= item[0] <= item[1] <= MAX_SEQ
        ):
            raise ValueError(f"not a range of seqs: {json.dumps(item)[:40]}")
        out.append((item[0], item[1]))
    return out


__all__ = ["Range", "ack_topic", "decode_acks", "encode_acks", "ranges"]

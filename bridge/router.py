"""Which subscription a message came through, and what it decodes into.

Every subscription carries an MQTT v5 Subscription Identifier, so a
message is decoded by the rules of the subscription(s) it matched, as the
broker says: overlapping filters (a mapping under ``gw/``, two mappings
that overlap) each get their copy, never a copy decoded twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from factory_edge.logs import fields

from .decode import decode_batch, decode_event, decode_meta, decode_status
from .mapping import Mapping, MappingRule, topic_matches
from .messages import DeadLetter, Decoded, Malformed, Received
from .sparkplug import SparkplugHost

log = logging.getLogger(__name__)

BUILTINS = {
    "data": "gw/+/data/+",
    "status": "gw/+/status",
    "meta": "gw/+/meta/+",
    "events": "gw/+/events",
    "sparkplug": "spBv1.0/#",
    # With a shared subscription a birth reaches one process only, but every process must know the
    # aliases to read data: each also reads the births itself, not shared, to learn them (not to store).
    "spb_nbirth": "spBv1.0/+/NBIRTH/+",
    "spb_dbirth": "spBv1.0/+/DBIRTH/+/+",
}
LEARN_ONLY = frozenset({"spb_nbirth", "spb_dbirth"})


@dataclass(frozen=True)
class Subscription:
    id: int
    filter: str
    builtin: str | None
    mappings: tuple[Mapping, ...]

    def topic(self, shared_group: str | None) -> str:
        shared = shared_group and self.builtin not in LEARN_ONLY
        return f"$share/{shared_group}/{self.filter}" if shared else self.filter


def ingest_builtins(shared_group: str | None) -> tuple[str, ...]:
    """What a tenant's ingest connection subscribes to (with a shared group, the births unshared too)."""
    return ("data", "status", "meta", "events", "sparkplug", *(("spb_nbirth", "spb_dbirth") if shared_group else ()))


def plan(
    mappings: Sequence[MappingRule], *, builtins: Sequence[str] = ("data", "status", "meta", "events", "sparkplug")
) -> list[Subscription]:
    """One subscription per distinct filter: the built-in ones, then the mappings'."""
    by_filter: dict[str, tuple[str | None, list[Mapping]]] = {BUILTINS[b]: (b, []) for b in builtins}
    for rule in mappings:
        compiled = Mapping.of(rule)
        by_filter.setdefault(compiled.filter, (None, []))[1].append(compiled)
    return [Subscription(i, f, builtin, tuple(ms)) for i, (f, (builtin, ms)) in enumerate(by_filter.items(), start=1)]


class Router:
    """Decodes a commit window's messages into rows, and anything that does not fit into dead letters."""

    def __init__(self, subscriptions: Sequence[Subscription]) -> None:
        self.subscriptions = list(subscriptions)
        self.by_id = {s.id: s for s in subscriptions}
        self.sparkplug = SparkplugHost()  # the births it has seen: decoding is stateful for Sparkplug

    def decode(self, window: Sequence[Received]) -> Decoded:
        out = Decoded()
        for message in window:
            subs = [self.by_id[i] for i in message.sub_ids if i in self.by_id] or [
                s for s in self.subscriptions if topic_matches(s.filter, message.topic)
            ]
            for sub in subs:
                self._one(message, sub, out)
        return out

    def _one(self, message: Received, sub: Subscription, out: Decoded) -> None:
        topic, payload, at = message.topic, message.payload, message.received_at
        try:
            if sub.builtin is not None:
                levels = topic.split("/")
                if sub.builtin == "sparkplug":
                    self.sparkplug.decode(message, out)
                elif sub.builtin in LEARN_ONLY:
                    self.sparkplug.decode(message, Decoded())  # the aliases, nothing stored
                elif sub.builtin == "data":
                    out.batches.append(decode_batch(levels[1], levels[3], payload, at))
                elif sub.builtin == "status":
                    out.statuses.append(decode_status(levels[1], payload, at))
                elif sub.builtin == "meta":
                    out.metas.append(decode_meta(levels[1], levels[3], payload, at))
                else:
                    out.events.append(decode_event(levels[1], payload, at))
        except Malformed as exc:
            out.dead.append(DeadLetter(topic, payload, exc.reason, at))
        except Exception as exc:  # a bug must cost one message, never the tenant's stream
            log.error("cannot decode message", exc_info=True, extra=fields(topic=topic))
            out.dead.append(DeadLetter(topic, payload, f"internal error while decoding: {exc!r}", at))
        for mapping in sub.mappings:
            try:
                out.mapped.setdefault(mapping.table, []).append(mapping.row(topic, payload, at))
            except Malformed as exc:
                out.dead.append(DeadLetter(topic, payload, f"table {mapping.table}: {exc.reason}", at))
            except Exception as exc:
                log.error("cannot map message", exc_info=True, extra=fields(topic=topic, table=mapping.table))
                out.dead.append(DeadLetter(topic, payload, f"table {mapping.table}: internal error: {exc!r}", at))

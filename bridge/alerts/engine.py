"""The alert engine: pending → firing → resolved, per rule, gateway and device.

Pure logic over plain data: the ingest pipeline feeds it readings and
gateway status inside a commit window's transaction, and stores the
changes it reports together with that window. Nothing changes in the
engine until the window is committed (``apply``): a failed commit is
retried from the same state.

The engine keeps its own record of the newest reading it evaluated per
series (``alert_series``), committed with the alert states: with shared
subscriptions the stored data and the alerts are written by different
sessions, and neither may tell the other what it has seen.

Time: a value condition's duration (``for:``) counts from the reading's
own timestamp; the bridge's clock promotes a pending alert when no newer
reading arrives, and drives ``stale:`` and gateway-offline. Each series
moves forward only: a reading older than the newest one seen (a backlog
draining after an outage, a redelivered batch) is stored but does not
change any alert. A rule whose ``tag`` glob matches several tags of one
device gives one alert for the device: it triggers when any of them
triggers and resolves when all of them have cleared.

Bounded whatever a gateway sends: a gateway that invents a new device or
tag name in every batch would otherwise grow the engine (and
``alert_series``) by one series per name, for ever, and give a ``stale:``
rule one alert per name. So a gateway has at most
``max_series_per_gateway`` series (``alerts.max_series_per_gateway``);
readings of further series are stored but not evaluated, and the bridge
warns once per gateway. Resolved alerts are forgotten (in memory) after
``forget_resolved_ms``, and the per-series rule cache is cleared when it
outgrows ``RULE_CACHE_MAX``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from factory_edge.logs import fields as log_fields

from .model import GATEWAY_DEVICE, Change, Instance, SeriesLast, State
from .rules import AlertRule, Rule, Verdict
from .template import render

log = logging.getLogger(__name__)

DEFAULT_MAX_SERIES_PER_GATEWAY = 10_000
DEFAULT_FORGET_RESOLVED_MS = 7 * 86_400_000
RULE_CACHE_MAX = 200_000
FORGET_SCAN_MS = 60_000  # how often the clock looks for resolved alerts to forget

SeriesKey = tuple[str, str, str]
Series = tuple[int, Any, str, int | None]  # (ts, value, quality, seen_at) of the newest reading evaluated
_NUMBER = (int, float)


class AlertEngine:
    """One tenant's rules and alert states."""

    def __init__(
        self,
        tenant: str,
        rules: Sequence[AlertRule],
        *,
        max_series_per_gateway: int = DEFAULT_MAX_SERIES_PER_GATEWAY,
        forget_resolved_ms: int = DEFAULT_FORGET_RESOLVED_MS,
    ) -> None:
        self.tenant = tenant
        self.max_series_per_gateway = max_series_per_gateway
        self.forget_resolved_ms = forget_resolved_ms
        self.series_per_gateway: Counter[str] = Counter()
        self.limited: set[str] = set()  # gateways that reached the limit (warned once)
        self.forget_scanned_at = 0
        self.rules = [Rule.of(r) for r in rules]
        self.by_name = {r.name: r for r in self.rules}
        self.instances: dict[tuple[str, str, str], Instance] = {}
        self.pending: set[tuple[str, str, str]] = set()
        self.series: dict[SeriesKey, Series] = {}
        self.stale_seen: dict[tuple[str, str, str], int] = {}  # (gw, device, rule) -> last reading's arrival
        self.started_at = 0
        self._series_rules: dict[SeriesKey, tuple[Rule, ...]] = {}
        self._gateway_rules: dict[str, tuple[Rule, ...]] = {}
        self._point_rules = [r for r in self.rules if r.kind != "offline"]
        self._offline_rules = [r for r in self.rules if r.kind == "offline"]

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def tick_s(self) -> float:
        """How often the bridge's clock should look at pending and stale alerts."""
        durations = [r.for_ms for r in self.rules if r.for_ms] + [r.stale_ms for r in self.rules if r.stale_ms]
        return min(1.0, max(0.05, min(durations, default=1000) / 10_000))

    def rules_for(self, gw: str, device: str, tag: str) -> tuple[Rule, ...]:
        key = (gw, device, tag)
        rules = self._series_rules.get(key)
        if rules is None:
            if len(self._series_rules) >= RULE_CACHE_MAX:  # names a gateway made up: a cache, not a record
                self._series_rules.clear()
            rules = self._series_rules[key] = tuple(r for r in self._point_rules if r.matches(gw, device, tag))
        return rules

    def gateway_rules(self, gw: str) -> tuple[Rule, ...]:
        rules = self._gateway_rules.get(gw)
        if rules is None:
            rules = self._gateway_rules[gw] = tuple(r for r in self._offline_rules if r.matches(gw, "", None))
        return rules

    # ---------------------------------------------------------------- resuming after a restart

    def load(self, states: Iterable[Instance], series: Iterable[SeriesLast], *, now_ms: int) -> None:
        """Continue from the stored alert states and the newest reading of every series."""
        self.started_at = now_ms
        for inst in states:
            self.instances[inst.key] = inst
            if inst.state is State.PENDING:
                self.pending.add(inst.key)
        for s in series:
            rules = self.rules_for(s.gw, s.device, s.tag)
            if not rules:
                continue
            if (s.gw, s.device, s.tag) not in self.series:
                self.series_per_gateway[s.gw] += 1
            self.series[(s.gw, s.device, s.tag)] = (s.ts, s.value, s.quality, s.seen_at)
            for rule in rules:
                if rule.kind == "stale" and s.seen_at is not None:
                    key = (s.gw, s.device, rule.name)
                    self.stale_seen[key] = max(self.stale_seen.get(key, 0), s.seen_at)

    # ---------------------------------------------------------------- one window

    def evaluation(self, now_ms: int) -> Evaluation:
        return Evaluation(self, now_ms)

    def apply(self, evaluation: Evaluation) -> None:
        """The window is committed: its state becomes the engine's."""
        for key, inst in evaluation.instances.items():
            if inst.state is State.OK and not inst.tags:
                self.instances.pop(key, None)
            else:
                self.instances[key] = inst
            if inst.state is State.PENDING:
                self.pending.add(key)
            else:
                self.pending.discard(key)
        for key in evaluation.series:
            if key not in self.series:
                self.series_per_gateway[key[0]] += 1
        self.series.update(evaluation.series)
        self.stale_seen.update(evaluation.stale_seen)
        for key in evaluation.forgotten:
            kept = self.instances.get(key)
            if kept is not None and kept.state is State.RESOLVED:
                del self.instances[key]

    def over_limit(self, gw: str, new: int) -> bool:
        """Whether ``gw`` may not get another series (``new`` already added in this window); warns once."""
        if self.series_per_gateway[gw] + new < self.max_series_per_gateway:
            return False
        if gw not in self.limited:
            self.limited.add(gw)
            log.warning(
                "alert series limit reached: readings of further devices and tags are stored, not evaluated",
                extra=log_fields(tenant=self.tenant, gw=gw, max_series_per_gateway=self.max_series_per_gateway),
            )
        return True


class Evaluation:
    """The alert consequences of one commit window, kept apart from the engine until it is committed."""

    def __init__(self, engine: AlertEngine, now_ms: int) -> None:
        self.engine = engine
        self.now = now_ms
        self.instances: dict[tuple[str, str, str], Instance] = {}
        self.series: dict[SeriesKey, Series] = {}
        self.stale_seen: dict[tuple[str, str, str], int] = {}
        self.changes: list[Change] = []
        self.new_series: Counter[str] = Counter()  # series this window adds, per gateway
        self.forgotten: list[tuple[str, str, str]] = []  # resolved long ago: dropped from memory at apply

    # ---------------------------------------------------------------- inputs

    def point(self, gw: str, device: str, tag: str, ts: int, value: Any, quality: str, received_at: int) -> None:
        engine = self.engine
        rules = engine.rules_for(gw, device, tag)
        if not rules:
            return
        key = (gw, device, tag)
        prev = self.series.get(key) or engine.series.get(key)
        if prev is None and key not in self.series:
            if engine.over_limit(gw, self.new_series[gw]):
                return
            self.new_series[gw] += 1
        if prev is not None and ts <= prev[0]:
            return  # not newer than what the alerts already saw
        if quality == "bad":
            # A failed read says nothing about the value, and is not data for stale:.
            self.series[key] = (ts, value, quality, prev[3] if prev is not None else None)
            return
        self.series[key] = (ts, value, quality, received_at)
        rate = None
        if prev is not None and prev[2] != "bad" and type(value) in _NUMBER and type(prev[1]) in _NUMBER:
            rate = (value - prev[1]) * 1000.0 / (ts - prev[0])
        for rule in rules:
            if rule.kind == "stale":
                self._seen(rule, gw, device, received_at)
                continue
            verdict = rule.judge(value, rate)
            if verdict is not None:
                self._judge(rule, gw, device, tag, verdict, value, ts)

    def status(self, gw: str, state: str, received_at: int) -> None:
        for rule in self.engine.gateway_rules(gw):
            verdict = Verdict.TRIGGER if state == "offline" else Verdict.CLEAR
            self._judge(rule, gw, GATEWAY_DEVICE, "status", verdict, state, received_at)

    def tick(self) -> None:
        """The bridge's clock: promote pending alerts whose ``for:`` has passed, fire stale ones."""
        engine, now = self.engine, self.now
        pending = set(engine.pending) | {k for k, i in self.instances.items() if i.state is State.PENDING}
        for key in sorted(pending):
            rule = engine.by_name.get(key[2])
            inst = self._existing(key)
            if rule is None or inst is None or inst.state is not State.PENDING or inst.since is None:
                continue
            if now - inst.since >= rule.for_ms:
                self._change(rule, inst, State.FIRING, since=inst.since, value=inst.value, tag=inst.tag)
        if now - engine.forget_scanned_at >= FORGET_SCAN_MS:
            engine.forget_scanned_at = now
            for key, inst in engine.instances.items():
                if inst.state is State.RESOLVED and now - inst.changed_at >= engine.forget_resolved_ms:
                    self.forgotten.append(key)
        stale = {**engine.stale_seen, **self.stale_seen}
        for (gw, device, name), seen in stale.items():
            rule = engine.by_name.get(name)
            # Right after a start the backlog is still arriving: the start counts as data.
            if rule is None or now - max(seen, engine.started_at) < rule.stale_ms:
                continue
            inst = self._instance(rule, gw, device)
            if inst.state is not State.FIRING:
                self._change(rule, inst, State.FIRING, since=seen, value=None, tag=None)

    # ---------------------------------------------------------------- outputs

    def series_rows(self) -> list[SeriesLast]:
        """The series this window moved forward (stored in ``alert_series`` with the alert states)."""
        return [SeriesLast(gw, device, tag, *state) for (gw, device, tag), state in self.series.items()]

    def dirty(self) -> list[Instance]:
        """Instances whose stored row must change."""
        out = []
        for key, inst in self.instances.items():
            base = self.engine.instances.get(key)
            if base is None and inst.state is State.OK and not inst.tags:
                continue
            if inst != base:
                out.append(inst)
        return out

    # ---------------------------------------------------------------- transitions

    def _existing(self, key: tuple[str, str, str]) -> Instance | None:
        inst = self.instances.get(key)
        if inst is None:
            base = self.engine.instances.get(key)
            if base is None:
                return None
            inst = self.instances[key] = base.copy()
        return inst

    def _instance(self, rule: Rule, gw: str, device: str) -> Instance:
        key = (gw, device, rule.name)
        inst = self._existing(key)
        if inst is None:
            inst = self.instances[key] = Instance(gw, device, rule.name)
        return inst

    def _seen(self, rule: Rule, gw: str, device: str, received_at: int) -> None:
        key = (gw, device, rule.name)
        self.stale_seen[key] = received_at
        inst = self._existing(key)
        if inst is not None and inst.state is State.FIRING:
            self._change(rule, inst, State.RESOLVED, since=received_at, value=None, tag=None)

    def _judge(self, rule: Rule, gw: str, device: str, tag: str, verdict: Verdict, value: Any, ts: int) -> None:
        inst = self._instance(rule, gw, device)
        tags = inst.tags
        if verdict is Verdict.TRIGGER:
            tags[tag] = "trigger"
        elif verdict is Verdict.HOLD:
            if tag in tags:
                tags[tag] = "hold"  # only a tag that triggered can hold the alert
        else:
            tags.pop(tag, None)
        triggering = "trigger" in tags.values()
        state = inst.state
        if state is State.OK or state is State.RESOLVED:
            if triggering:
                inst.fired = False
                self._change(
                    rule, inst, State.FIRING if rule.for_ms == 0 else State.PENDING, since=ts, value=value, tag=tag
                )
            else:
                tags.clear()
        elif state is State.PENDING:
            if not triggering:
                tags.clear()
                self._change(rule, inst, State.RESOLVED, since=ts, value=value, tag=tag)
            elif inst.since is not None and ts - inst.since >= rule.for_ms:
                self._change(rule, inst, State.FIRING, since=inst.since, value=value, tag=tag)
            elif verdict is Verdict.TRIGGER:
                inst.value, inst.tag = value, tag  # the newest reading is what firing will report
        elif state is State.FIRING and not tags:
            self._change(rule, inst, State.RESOLVED, since=ts, value=value, tag=tag)

    def _change(
        self, rule: Rule, inst: Instance, state: State, *, since: int | None, value: Any, tag: str | None
    ) -> None:
        previous = inst.state
        notify: tuple[str, ...] = ()
        if state is State.FIRING:
            inst.fired = True
            notify = tuple(rule.config.notify)
        elif state is State.RESOLVED:
            if inst.fired:
                notify = tuple(rule.config.notify)  # the end of an alert that was sent
            inst.fired = False
        inst.state, inst.since, inst.value, inst.tag, inst.changed_at = state, since, value, tag, self.now
        fields = {
            "rule": rule.name,
            "state": str(state),
            "severity": rule.config.severity,
            "tenant": self.engine.tenant,
            "gw": inst.gw,
            "device": inst.device,
            "tag": tag,
            "value": value,
            "condition": rule.condition,
            "threshold": rule.threshold,
            "since": since,
        }
        self.changes.append(
            Change(
                tenant=self.engine.tenant,
                gw=inst.gw,
                device=inst.device,
                rule=rule.name,
                state=state,
                previous=previous,
                severity=rule.config.severity,
                since=since,
                ts=self.now,
                value=value,
                tag=tag,
                condition=rule.condition,
                message=render(rule.template, fields),
                notify=notify,
            )
        )

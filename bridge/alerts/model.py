"""Alert states as stored, published and sent: plain data shared by the engine and the stores."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

GATEWAY_DEVICE = "_gateway"  # the device level of gateway alerts (no device name starts with '_')


class State(enum.StrEnum):
    """An alert instance's state; ``ok`` is never stored (no row means ok)."""

    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass
class Instance:
    """One rule applied to one gateway's device: the ``alert_state`` row."""

    gw: str
    device: str
    rule: str
    state: State = State.OK
    since: int | None = None  # epoch ms the condition began (pending/firing) or ended (resolved)
    value: Any = None
    tag: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # tag -> "trigger" | "hold" while not clear
    fired: bool = False  # reached firing in this episode: its end is worth a notification
    changed_at: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.gw, self.device, self.rule)

    def copy(self) -> Instance:
        return Instance(
            self.gw,
            self.device,
            self.rule,
            self.state,
            self.since,
            self.value,
            self.tag,
            dict(self.tags),
            self.fired,
            self.changed_at,
        )


@dataclass(frozen=True)
class Change:
    """A state change: one row in ``alerts``, one retained message, and webhook deliveries."""

    tenant: str
    gw: str
    device: str
    rule: str
    state: State
    previous: State
    severity: str
    since: int | None
    ts: int
    value: Any
    tag: str | None
    condition: str
    message: str
    notify: tuple[str, ...]  # webhook names to send this change to

    @property
    def topic(self) -> str:
        return f"alerts/{self.gw}/{self.device}/{self.rule}"

    def document(self, alert_id: int | None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": alert_id,
            "tenant": self.tenant,
            "rule": self.rule,
            "state": str(self.state),
            "previous": str(self.previous),
            "severity": self.severity,
            "gw": self.gw,
            "device": self.device,
            "tag": self.tag,
            "value": self.value,
            "since": self.since,
            "ts": self.ts,
            "condition": self.condition,
            "message": self.message,
        }
        return doc

    def payload(self, alert_id: int | None) -> bytes:
        return json.dumps(self.document(alert_id), separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class OutboxItem:
    """A webhook delivery waiting in the tenant's ``webhook_outbox`` until the endpoint takes it."""

    id: int
    webhook: str
    payload: bytes
    created_at: int


@dataclass(frozen=True)
class SeriesLast:
    """The newest reading of one series the alert engine evaluated (``alert_series`` row)."""

    gw: str
    device: str
    tag: str
    ts: int
    value: Any
    quality: str
    seen_at: int | None  # when the last reading that was not bad arrived (the stale clock)

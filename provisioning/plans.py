"""Plans: what the operator allows each tenant, and where each limit is enforced.

A plan is one row of ``tenant_plans`` (a missing row, or a NULL column, is
no limit). Each limit is enforced by the part that owns the resource:

| limit | enforced by | how |
|---|---|---|
| ``gateways`` | this service | provisioning a gateway beyond it is refused (403), in the transaction that records it |
| ``technicians`` | this service | a certificate for one more technician is refused |
| ``message_size`` | the tenant's Mosquitto | ``max_packet_size``: a bigger packet ends the publisher's connection |
| ``points_per_s`` | the bridge | read from ``tenants.json``; the tenant's ingest is delayed above it |
| ``retention_days`` | the bridge's retention job | read from ``tenants.json`` |

The counts are checked inside the registry's write transaction
(``BEGIN IMMEDIATE``), so concurrent enrolments cannot pass the limit
together; a revoked gateway, or a technician whose certificates are all
revoked or expired, frees its place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from factory_edge.errors import ProvisioningError
from factory_edge.logs import fields
from factory_edge.units import parse_size
from provisioning import brokers, render
from provisioning.errors import Forbidden
from provisioning.layout import DataDir
from provisioning.registry import Registry, now
from provisioning.tenants import get_tenant, render_proxy, render_tenant

log = logging.getLogger(__name__)

MIN_MESSAGE_SIZE = 1024  # below this, a gateway's status or a small batch would not fit
MAX_MESSAGE_SIZE = 268_435_455  # MQTT's largest remaining length
# The largest of each count: beyond them a value is a typo (and would overflow the registry's integers).
HIGHEST = {"gateways": 10_000_000, "technicians": 1_000_000, "points_per_s": 1_000_000_000, "retention_days": 36_500}
NONE = "none"  # what the command line and the API take to remove a limit


@dataclass(frozen=True)
class Plan:
    """A tenant's limits; None: no limit (``message_size`` None: the broker's default, ``render.MAX_PACKET_SIZE``)."""

    gateways: int | None = None
    technicians: int | None = None
    points_per_s: int | None = None
    retention_days: int | None = None
    message_size: int | None = None

    @property
    def max_packet_size(self) -> int:
        return self.message_size or render.MAX_PACKET_SIZE

    def as_json(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)

    def bridge_limits(self) -> dict[str, int | None]:
        """What ``tenants.json`` carries for the bridge (``limits``)."""
        return {"points_per_s": self.points_per_s, "retention_days": self.retention_days}


FIELDS = tuple(f.name for f in dataclasses.fields(Plan))


class PlanLimit(Forbidden):
    """A request refused by the tenant's plan (403). Not a failed attempt: it does not count towards a 429."""

    counts_as_failure = False


def load(registry: Registry, tenant: str) -> Plan:
    row = registry.plan_row(tenant)
    return Plan(**{k: row[k] for k in FIELDS}) if row else Plan()


def parse_limit(field: str, value: Any) -> int | None:
    """One limit as given on the command line or in the API: a count, a size for message_size, or ``none``."""
    if field not in FIELDS:
        raise ProvisioningError(f"no plan limit {field!r} (limits: {', '.join(FIELDS)})")
    option = f"--{field.replace('_', '-')}"
    if value is None or (isinstance(value, str) and value.strip().lower() == NONE):
        return None
    if isinstance(value, bool):
        raise ProvisioningError(f"{option}: expected a number or 'none', got {value!r}")
    if field == "message_size":
        try:
            size = parse_size(value.strip() if isinstance(value, str) else value)
        except ValueError as exc:
            raise ProvisioningError(f"{option}: {exc}, or 'none'") from None
        if not MIN_MESSAGE_SIZE <= size <= MAX_MESSAGE_SIZE:
            raise ProvisioningError(
                f"{option}: {size} bytes is not within {MIN_MESSAGE_SIZE}..{MAX_MESSAGE_SIZE} (1KiB..256MiB)"
            )
        return size
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, int):
        number = value
    elif text is not None and text.isascii() and text.isdigit():  # not "1_000", "٣" or "1e3"
        number = int(text)
    else:
        raise ProvisioningError(f"{option}: expected a whole number or 'none', got {value!r}")
    lowest, highest = (0 if field in ("gateways", "technicians") else 1), HIGHEST[field]
    if not lowest <= number <= highest:
        raise ProvisioningError(f"{option}: must be within {lowest}..{highest:,}, got {number:,}")
    return number


def show(data: DataDir, tenant_name: str) -> tuple[Plan, dict[str, int]]:
    """The tenant's plan and what it uses now (active gateways and technicians)."""
    data.require()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        return load(registry, tenant.name), _usage(registry, tenant.name)


def _usage(registry: Registry, tenant: str) -> dict[str, int]:
    return {
        "gateways": registry.active_gateways(tenant),
        "technicians": len(registry.technicians(tenant, now())),
    }


def update(data: DataDir, tenant_name: str, changes: dict[str, Any]) -> tuple[Plan, list[str]]:
    """Change some limits (``field -> value``, ``none`` removes one); returns the plan and what was applied.

    A message size is rendered into the tenant's mosquitto.conf (tried by
    Mosquitto first) and the broker reloaded; the rate and retention go to
    ``tenants.json``, which running bridges re-read. Lowering a count below
    what is in use is allowed: nothing is revoked, further enrolments are
    refused until the count is under the limit.
    """
    parsed = {field: parse_limit(field, value) for field, value in changes.items()}
    data.require()
    steps: list[str] = []
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        before = load(registry, tenant.name)
        plan = dataclasses.replace(before, **parsed)
        if plan == before:
            return plan, ["unchanged"]
        with registry.transaction():  # a config Mosquitto or HAProxy refuses rolls the plan back
            registry.set_plan_row(tenant.name, plan.as_json(), now())
            if plan.message_size != before.message_size:
                render_tenant(data, registry, tenant)
            if plan.bridge_limits() != before.bridge_limits():
                render_proxy(data, registry)
                steps.append(f"{data.tenants_index}: limits {plan.bridge_limits()} (bridges re-read it)")
        usage = _usage(registry, tenant.name)
    log.info("tenant plan changed", extra=fields(tenant=tenant.name, **plan.as_json()))
    if plan.message_size != before.message_size:
        files = data.tenant(tenant.name)
        # Mosquitto 2.0.11 keeps the max_packet_size it started with through a reload (SIGHUP), whatever its
        # manual says: the new size applies from the broker's next start.
        running = brokers.find_process("mosquitto", ("-c", "--config-file"), files.conf)
        steps.append(
            f"{files.conf}: max_packet_size {plan.max_packet_size}; "
            + (
                f"restart the tenant's broker (pid {', '.join(map(str, running))}) to apply it: Mosquitto reads "
                "it at start only"
                if running
                else "applies when the tenant's broker starts"
            )
        )
    for field in ("gateways", "technicians"):
        limit = getattr(plan, field)
        if limit is not None and usage[field] > limit:
            steps.append(
                f"{usage[field]} {field} are in use, above the new limit of {limit}: none is revoked; "
                f"new ones are refused until fewer than {limit} remain"
            )
    return plan, steps


def check_gateway_room(registry: Registry, tenant: str, gateway: str) -> None:
    """Refuse a new gateway beyond the plan (call inside the registry transaction that records it)."""
    limit = load(registry, tenant).gateways
    if limit is None or registry.active_device(tenant, gateway) is not None:
        return
    active = registry.active_gateways(tenant)
    if active >= limit:
        raise PlanLimit(
            f"tenant {tenant} has {active} of {limit} gateways its plan allows: gateway {gateway!r} is refused; "
            f"revoke one (provisioning device revoke {tenant} GW) or raise the limit "
            f"(provisioning tenant plan {tenant} --gateways N)"
        )


def check_technician_room(registry: Registry, tenant: str, identity: str, at: dt.datetime) -> None:
    """Refuse a certificate for one more technician beyond the plan (a known technician renews freely)."""
    limit = load(registry, tenant).technicians
    if limit is None:
        return
    holding = registry.technicians(tenant, at)
    if identity not in holding and len(holding) >= limit:
        raise PlanLimit(
            f"tenant {tenant} has {len(holding)} of {limit} technicians its plan allows: {identity} is refused; "
            f"revoke one (provisioning technician revoke {tenant} NAME) or raise the limit "
            f"(provisioning tenant plan {tenant} --technicians N)"
        )


__all__ = [
    "FIELDS",
    "NONE",
    "Plan",
    "PlanLimit",
    "check_gateway_room",
    "check_technician_room",
    "load",
    "parse_limit",
    "show",
    "update",
]

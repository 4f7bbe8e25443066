"""The grammar of every name factory-edge accepts, checked in full before anything is written.

Names end up in DNS names, certificate subjects, MQTT topics and usernames,
and line-based config files (Mosquitto's ACL, HAProxy's SNI map). A name
that is not matched *in full* by its grammar (``re.fullmatch``: a trailing
newline is not "the end of the string") is refused with one line naming the
field and showing the value as Python would (``'gw-01\\n'``).

| name | grammar | length | example |
|---|---|---|---|
| tenant | DNS label: ``a-z 0-9 -``, not starting or ending with ``-`` | 1-63 | ``acme`` |
| domain | DNS labels of the same kind, joined by ``.`` | ``mqtt.<tenant>.<domain>`` at most 253 | ``example.com`` |
| gateway id (CN) | ``A-Z a-z 0-9 _ . -``, starting with a letter or digit; not reserved | 1-64 | ``gw-01`` |
| technician | same characters as a gateway id; identity ``tech-<name>`` | name 1-59 | ``anna`` |
| bridge instance | same characters; identity ``bridge.<instance>`` | 1-57 | ``main`` |

Reserved identities (never a gateway id, compared without case):
everything starting with ``bridge`` (the bridge's processes:
``bridge.<instance>``, the alert role ``bridge-alerts``, and ``bridge``
itself, the operators' command-line identity), everything starting with
``provisioning`` (the service, ``provisioning``, and its retained-message
guard, ``provisioning-guard``) and ``tech-*`` (technicians).
"""

from __future__ import annotations

import re

from factory_edge.errors import FactoryEdgeError

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TECH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,58}")
MAX_HOST = 253

BRIDGE_ID = "bridge"  # the operators' identity for command-line tools (commands, alerts)
BRIDGE_PREFIX = "bridge."  # bridge.<instance>: one per bridge process
BRIDGE_ALERTS_ID = "bridge-alerts"  # the alert role's session, held by one bridge process at a time
SERVICE_ID = "provisioning"
GUARD_ID = "provisioning-guard"  # provisioning serve's retained-message guard
TECHNICIAN_PREFIX = "tech-"
DEFAULT_BRIDGE_INSTANCE = "main"

ID_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
LABEL_RULE = "1-63 lowercase letters, digits or '-', not starting or ending with '-'"


class InvalidName(FactoryEdgeError):
    """A name does not match its grammar; the message names the field and the value."""


def is_id(value: object) -> bool:
    """True when ``value`` is a string matched in full by the id grammar."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def check_id(value: str, *, what: str = "id") -> str:
    """Refuse anything but 1-64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit."""
    if not is_id(value):
        raise InvalidName(f"{what} {value!r} is not a valid id: {ID_RULE}")
    return value


def is_reserved(identity: str) -> bool:
    """True for identities that are not gateways: bridge processes and tools, the service, technicians."""
    lowered = identity.lower()
    return lowered.startswith((BRIDGE_ID, SERVICE_ID, TECHNICIAN_PREFIX))


def check_gateway(value: str, *, what: str = "gateway name") -> str:
    """A gateway id: the id grammar, and not a reserved identity."""
    check_id(value, what=what)
    if is_reserved(value):
        owner = (
            "the provisioning service"
            if value.lower().startswith(SERVICE_ID)
            else "technicians"
            if value.lower().startswith(TECHNICIAN_PREFIX)
            else "the bridge"
        )
        raise InvalidName(f"{what} {value!r} is reserved for {owner} (reserved: bridge*, provisioning*, tech-*)")
    return value


def check_tenant(value: str, *, what: str = "tenant name") -> str:
    """A tenant name becomes a DNS label (``mqtt.<tenant>.<domain>``)."""
    if not isinstance(value, str) or LABEL_RE.fullmatch(value) is None:
        raise InvalidName(f"{what} {value!r} is not a DNS label: {LABEL_RULE}")
    if value == "public":
        raise InvalidName(
            f"{what} 'public' is PostgreSQL's default schema, and a tenant's schema is its name: its tables would "
            "mix with the database's own; choose another name"
        )
    return value


def check_domain(value: str, *, tenant: str | None = None, what: str = "domain") -> str:
    """A lowercase DNS name whose broker host ``mqtt.<tenant>.<domain>`` stays within 253 characters."""
    labels = value.split(".") if isinstance(value, str) else [""]
    if not all(LABEL_RE.fullmatch(label) for label in labels):
        raise InvalidName(f"{what} {value!r} is not a lowercase DNS name: labels of {LABEL_RULE}, joined by '.'")
    host = f"mqtt.{tenant or 'x'}.{value}"
    if len(host) > MAX_HOST:
        raise InvalidName(
            f"{what} {value!r} is too long: the broker's name {host[:40]}… would have {len(host)} "
            f"characters (at most {MAX_HOST})"
        )
    return value


def is_host(value: str) -> bool:
    """True for a lowercase DNS name of at most 253 characters (an SNI name)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_HOST
        and all(LABEL_RE.fullmatch(label) for label in value.split("."))
    )


def technician_identity(name: str) -> str:
    """``tech-<name>`` for ``NAME`` or ``tech-NAME``; InvalidName names the field."""
    bare = name[len(TECHNICIAN_PREFIX) :] if isinstance(name, str) and name.startswith(TECHNICIAN_PREFIX) else name
    if not isinstance(bare, str) or _TECH_RE.fullmatch(bare) is None:
        raise InvalidName(
            f"technician name {name!r} is not valid: 1-59 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return f"{TECHNICIAN_PREFIX}{bare}"


def bridge_identity(instance: str) -> str:
    """``bridge.<instance>``: the identity (certificate CN, MQTT username and client id) of one bridge process."""
    identity = f"{BRIDGE_PREFIX}{instance}"
    if not isinstance(instance, str) or not is_id(instance) or not is_id(identity):
        raise InvalidName(
            f"bridge instance {instance!r} is not valid: 1-57 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return identity


def is_bridge(identity: str) -> bool:
    """True for the identities the ACL treats as the bridge: ``bridge``, ``bridge.<instance>``, ``bridge-alerts``."""
    return identity in (BRIDGE_ID, BRIDGE_ALERTS_ID) or (
        identity.startswith(BRIDGE_PREFIX) and is_id(identity) and len(identity) > len(BRIDGE_PREFIX)
    )


__all__ = [
    "BRIDGE_ALERTS_ID",
    "BRIDGE_ID",
    "BRIDGE_PREFIX",
    "DEFAULT_BRIDGE_INSTANCE",
    "GUARD_ID",
    "ID_RE",
    "ID_RULE",
    "LABEL_RE",
    "SERVICE_ID",
    "TECHNICIAN_PREFIX",
    "InvalidName",
    "bridge_identity",
    "check_domain",
    "check_gateway",
    "check_id",
    "check_tenant",
    "is_bridge",
    "is_host",
    "is_id",
    "is_reserved",
    "technician_identity",
]

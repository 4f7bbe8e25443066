"""Subscriptions refused at SUBSCRIBE time: the broker's dynamic-security plugin, kept in step with the registry.

Mosquitto 2.0's ``acl_file`` never refuses a SUBSCRIBE (its check answers
"allowed" and filters only the delivery later), so a gateway could join
the bridge's shared subscription (``$share/<group>/gw/+/data/+``), be
handed its turn of every gateway's batches and have them dropped by the
delivery check: data lost for good. Refusing at SUBSCRIBE needs a plugin;
the dynamic-security plugin that ships with Mosquitto (already loaded to
end revoked sessions) has subscribe ACLs, and the broker asks it *before*
``acl_file`` (plugins first, then the file). How Mosquitto 2.0.11 and its
plugin decide, as measured on Debian 12's build:

- for a username the plugin does not know, every check is deferred to
  ``acl_file``: so every gateway, technician and this service is made a
  plugin client here, with a role of its own; bridge identities are not
  (they may subscribe to anything, shared subscriptions included, and
  ``acl_file`` limits what they receive);
- a client's role is checked in priority order: the gateway's own topics
  (``subscribePattern gw/<id>/cmd/#`` and ``gw/<id>/ack``, allowed) come
  before ``subscribePattern #`` (denied), which matches every other
  filter, wildcards, ``$share/…`` and ``$SYS/…`` included; the SUBACK then
  carries 0x87 (Not authorized);
- the 2.0 plugin has no ``%u`` substitution, hence one role per gateway;
- publish and receive checks are left to ``acl_file`` (the plugin's
  default access is "deny", which it reports as "defer");
- certificate logins (``use_identity_as_username``) skip password checks,
  so these clients need no password;
- the plugin loads its file at start and does not re-read it on SIGHUP.

So the wanted state is rendered from the registry, and applied: through
``$CONTROL/dynamic-security/v1`` while the broker runs (the plugin then
saves the file itself), or straight into ``dynsec.json`` while it does
not. ``sync`` compares the file (the plugin's saved state) with the wanted
state and sends only the difference. It runs before a new gateway's
certificate is handed out, after a revocation, when a technician is
added, and in ``serve``'s hourly upkeep.

Concurrent writers (two enrolments at the same moment through the API, a
revocation on the command line meanwhile) must not undo each other's
changes, which a diff against a wanted state read *before* another writer
committed would do (a gateway's rules deleted: its subscriptions fall
back to ``acl_file``, which grants all). Hence:

- one writer per tenant at a time: ``locked`` is a file lock (between
  processes) that is re-entrant within a thread, and the wanted state is
  read from the registry *inside* it (``sync`` takes a function);
- an enrolment holds the lock from registering the gateway until its
  device row is committed, so every other writer sees both or neither;
- an enrolment's update is add-only (``prune=False``): it never deletes a
  client or role, whatever it read; only revocations and the hourly
  upkeep delete, and they do it under the lock from the committed registry.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from factory_edge import names
from factory_edge.errors import ProvisioningError
from factory_edge.logs import fields
from provisioning import brokers
from provisioning.layout import TenantFiles, write_text

log = logging.getLogger(__name__)

DEFAULT_ACCESS = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True}
TECHNICIAN_ROLE = "technician"
SERVICE_ROLE = "service"
GUARD_ROLE = "guard"
CONTROL_RESPONSE = "$CONTROL/dynamic-security/v1/response"


def gateway_role(gateway: str) -> str:
    return f"gateway:{gateway}"


def _acl(kind: str, topic: str, allow: bool, priority: int) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": allow, "priority": priority}


def _role(name: str, allowed: Iterable[tuple[str, str]]) -> dict[str, Any]:
    acls = [_acl(kind, topic, True, 10) for kind, topic in allowed]
    return {"rolename": name, "acls": [*acls, _acl("subscribePattern", "#", False, 0)]}


def wanted(*, gateways: Iterable[str], technicians: Iterable[str], service: str = names.SERVICE_ID) -> dict[str, Any]:
    """The plugin's whole configuration for these identities (what ``dynsec.json`` holds)."""
    roles = [
        _role(
            TECHNICIAN_ROLE,
            [("subscribePattern", "gw/#"), ("subscribePattern", "alerts/#"), ("subscribePattern", "spBv1.0/#")],
        ),
        _role(SERVICE_ROLE, [("subscribeLiteral", CONTROL_RESPONSE)]),
        _role(
            GUARD_ROLE,
            [
                ("subscribePattern", topic)
                for topic in (
                    "gw/+/status",
                    "gw/+/meta/+",
                    "gw/+/data/+",
                    "gw/+/events",
                    "gw/+/cmd/+/reply",
                    "spBv1.0/+/+/+",
                    "spBv1.0/+/+/+/+",
                )
            ],
        ),
    ]
    clients = [
        {"username": service, "roles": [{"rolename": SERVICE_ROLE, "priority": 0}]},
        {"username": names.GUARD_ID, "roles": [{"rolename": GUARD_ROLE, "priority": 0}]},
    ]
    for tech in sorted(set(technicians)):
        clients.append({"username": tech, "roles": [{"rolename": TECHNICIAN_ROLE, "priority": 0}]})
    for gateway in sorted(set(gateways)):
        names.check_gateway(gateway)
        roles.append(
            _role(
                gateway_role(gateway),
                [
                    ("subscribePattern", f"gw/{gateway}/cmd/#"),
                    ("subscribePattern", f"gw/{gateway}/ack"),
                    ("subscribePattern", f"spBv1.0/+/NCMD/{gateway}"),
                    ("subscribePattern", f"spBv1.0/+/NCMD/{gateway}/#"),
                    ("subscribePattern", f"spBv1.0/+/DCMD/{gateway}/#"),
                    ("subscribePattern", "spBv1.0/STATE/+"),
                ],
            )
        )
        clients.append({"username": gateway, "roles": [{"rolename": gateway_role(gateway), "priority": 0}]})
    return {"defaultACLAccess": dict(DEFAULT_ACCESS), "clients": clients, "groups": [], "roles": roles}


def read(path: Path) -> dict[str, Any]:
    """The plugin's saved state (empty when there is none)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"defaultACLAccess": {}, "clients": [], "groups": [], "roles": []}
    except (OSError, ValueError) as exc:
        raise ProvisioningError(f"cannot read {path}: {exc}") from exc
    return doc if isinstance(doc, dict) else {}


def _roles_of(client: dict[str, Any]) -> list[str]:
    return sorted(r.get("rolename", "") for r in client.get("roles", []) or [])


def _acls_of(role: dict[str, Any]) -> list[tuple[str, str, bool, int]]:
    return sorted(
        (a.get("acltype", ""), a.get("topic", ""), bool(a.get("allow")), int(a.get("priority", 0)))
        for a in role.get("acls", []) or []
    )


def commands(current: dict[str, Any], target: dict[str, Any], *, prune: bool = True) -> list[dict[str, Any]]:
    """The ``$CONTROL`` commands that turn ``current`` into ``target`` (clients and roles by name).

    ``prune=False``: add and update only; clients and roles that ``target``
    does not name are left alone (an enrolment must never delete another's).
    """
    have_clients = {c.get("username"): c for c in current.get("clients", []) or []}
    have_roles = {r.get("rolename"): r for r in current.get("roles", []) or []}
    want_clients = {c["username"]: c for c in target["clients"]}
    want_roles = {r["rolename"]: r for r in target["roles"]}
    changed_roles = {n for n, r in want_roles.items() if n in have_roles and _acls_of(have_roles[n]) != _acls_of(r)}
    stale_clients = {
        n
        for n, c in want_clients.items()
        if n in have_clients
        and (
            _roles_of(have_clients[n]) != _roles_of(c)
            or have_clients[n].get("disabled")
            or set(_roles_of(c)) & changed_roles
        )
    }
    out: list[dict[str, Any]] = []
    if current.get("defaultACLAccess") != target["defaultACLAccess"]:
        out.append(
            {
                "command": "setDefaultACLAccess",
                "acls": [{"acltype": k, "allow": v} for k, v in target["defaultACLAccess"].items()],
            }
        )
    gone_clients = set(have_clients) - set(want_clients) if prune else set()
    gone_roles = set(have_roles) - set(want_roles) if prune else set()
    for name in sorted(gone_clients | stale_clients):
        out.append({"command": "deleteClient", "username": name})
    for name in sorted(gone_roles | changed_roles):
        out.append({"command": "deleteRole", "rolename": name})
    for name in sorted((set(want_roles) - set(have_roles)) | changed_roles):
        role = want_roles[name]
        out.append({"command": "createRole", "rolename": name, "acls": role["acls"]})
    for name in sorted((set(want_clients) - set(have_clients)) | stale_clients):
        out.append({"command": "createClient", "username": name, "roles": want_clients[name]["roles"]})
    return out


_held = threading.local()
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextmanager
def locked(files: TenantFiles) -> Iterator[None]:
    """One writer of a tenant's dynamic-security state at a time (API threads, the command line, ``serve``).

    A file lock between processes and a lock between threads; re-entrant
    within one thread, so an enrolment can hold it across ``sync`` and its
    registry commit.
    """
    path = str(files.dir / ".dynsec.lock")
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(path, threading.Lock())
    with thread_lock, open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


def sync(
    files: TenantFiles,
    link: brokers.AdminLink,
    target: Callable[[], dict[str, Any]],
    *,
    tenant: str,
    prune: bool = True,
) -> str:
    """Bring the tenant broker's plugin to ``target()``, read under the lock; returns what was done, in words.

    A broker that runs gets the difference as ``$CONTROL`` commands (it
    saves its file itself); a broker that does not gets the file written, to
    be loaded at its start (merged with what it holds when ``prune`` is off).
    """
    with locked(files):
        running = brokers.find_process("mosquitto", ("-c", "--config-file"), files.conf)
        current = read(files.dynsec)
        wanted_now = target()
        todo = commands(current, wanted_now, prune=prune)
        if not todo:
            return "subscription rules up to date"
        if not running:
            merged = wanted_now if prune else _merged(current, wanted_now)
            write_text(files.dynsec, json.dumps(merged, indent=2) + "\n", 0o600)
            return f"subscription rules written to {files.dynsec} (loaded at the broker's start)"
        brokers.send_commands(link, todo, tolerate=brokers.ALREADY)
    log.info("subscription rules updated", extra=fields(tenant=tenant, commands=len(todo)))
    return f"subscription rules updated on the running broker ({len(todo)} changes)"


def _merged(current: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """``target`` plus the clients and roles of ``current`` it does not name (an add-only update of the file)."""
    clients = {c.get("username"): c for c in current.get("clients", []) or []}
    clients.update({c["username"]: c for c in target["clients"]})
    roles = {r.get("rolename"): r for r in current.get("roles", []) or []}
    roles.update({r["rolename"]: r for r in target["roles"]})
    return {**target, "clients": list(clients.values()), "roles": list(roles.values())}


__all__ = ["DEFAULT_ACCESS", "commands", "gateway_role", "locked", "read", "sync", "wanted"]

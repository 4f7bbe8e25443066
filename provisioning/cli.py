"""The ``provisioning`` command: tenants, keys, the API, devices, technicians, bridge identities, CRLs.

Like ``agent``: the project's errors become one ``Error: …`` line on stderr
and a non-zero exit code; results go to stdout (``--json`` where a script
would parse them). Every command takes ``--data-dir`` (default
``$FE_PROVISIONING_DIR`` or /var/lib/factory-edge/provisioning).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factory_edge.cli import accept_global_options_anywhere, add_global_options, run_command
from factory_edge.errors import ProvisioningError
from factory_edge.units import parse_duration
from provisioning import admin, fleet, operators, placement_cli, plans, tenants
from provisioning.layout import DATA_DIR_ENV, DEFAULT_DATA_DIR, DataDir
from provisioning.registry import Registry, now


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"registry, CAs and rendered configs (default ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR})",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provisioning",
        description="factory-edge provisioning: tenants and their CAs, provisioning keys, device certificates, "
        "and the generated Mosquitto and HAProxy configuration.",
    )
    add_global_options(parser, log_level_help="default: info for serve, warning otherwise")
    common = _common()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "init",
        parents=[common],
        help="create the data directory and choose the proxy's address",
        description="Create the data directory and registry, or change its settings. Optional: "
        "tenant create does it with the defaults. Addresses and ports are fixed once a "
        "tenant exists; the proxy's limits and the renewal overlap may change any time "
        "(the proxy is reloaded).",
    )
    p.add_argument("--proxy-bind", metavar="ADDR", help="address HAProxy listens on (default 0.0.0.0)")
    p.add_argument("--proxy-port", type=int, metavar="PORT", help="port HAProxy listens on (default 8883)")
    p.add_argument(
        "--public-port", type=int, metavar="PORT", help="port gateways dial, in broker URLs (default: the proxy port)"
    )
    p.add_argument(
        "--first-broker-port",
        type=int,
        metavar="PORT",
        help="tenant brokers listen on their host from this port up (default 18831)",
    )
    p.add_argument(
        "--proxy-maxconn",
        type=int,
        metavar="N",
        help="connections the proxy holds at once, all tenants (default 0: HAProxy's own, from its "
        "file-descriptor limit)",
    )
    p.add_argument(
        "--proxy-per-source", type=int, metavar="N", help="concurrent connections from one client address (default 200)"
    )
    p.add_argument(
        "--proxy-per-tenant", type=int, metavar="N", help="concurrent connections to one tenant (default 2000)"
    )
    p.add_argument(
        "--proxy-hello-timeout",
        metavar="DURATION",
        help="a connection must send its TLS ClientHello within this (default 5s)",
    )
    p.add_argument(
        "--proxy-idle-timeout",
        metavar="DURATION",
        help="a silent connection is closed after this; above 1.5 x every client's MQTT keepalive (default 2m)",
    )
    p.add_argument(
        "--renew-overlap",
        type=_duration,
        metavar="DURATION",
        help="how long a gateway certificate superseded by a renewal keeps working (default 1h)",
    )
    p.add_argument(
        "--proxy-connect",
        metavar="ADDR",
        help="the proxy address bridges dial for every tenant ('' : tenants on host local directly, "
        "others through 127.0.0.1 or --proxy-bind)",
    )
    p.set_defaults(handler=cmd_init)

    tenant = commands.add_parser(
        "tenant",
        help="create and list tenants",
        description="Tenants: one CA and one Mosquitto each, behind the one SNI proxy.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = tenant.add_parser(
        "create",
        parents=[common],
        help="CA, broker and bridge certificates, broker and proxy config",
        description="Create a tenant: its CA (EC P-256), the broker's certificate for "
        "mqtt.NAME.DOMAIN, the bridge's client certificate, the Mosquitto config and "
        "ACL; re-render the HAProxy config and reload HAProxy if it runs.",
    )
    p.add_argument("name", metavar="NAME", help="tenant name: a DNS label (lowercase letters, digits, '-')")
    p.add_argument("--domain", required=True, help="the broker is mqtt.NAME.DOMAIN")
    p.add_argument(
        "--broker-port",
        type=int,
        metavar="PORT",
        help="the tenant Mosquitto's port on its host (default: the next free from --first-broker-port)",
    )
    p.add_argument("--host", metavar="HOST", help="the broker host it runs on (default: the least loaded)")
    p.add_argument(
        "--storage",
        metavar="STORAGE",
        help="the storage server its data goes to (default: the least loaded, if any is registered)",
    )
    p.set_defaults(handler=cmd_tenant_create)
    p = tenant.add_parser("list", parents=[common], help="list tenants", description="List tenants and their brokers.")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_tenant_list)
    p = tenant.add_parser(
        "plan",
        parents=[common],
        help="show or set a tenant's plan limits",
        description="Show a tenant's plan (no option), or set some of its limits; 'none' removes a limit. "
        "Gateways and technicians beyond the limit are refused at provisioning; the message size is the "
        "broker's max_packet_size (reloaded); points/s and retention days go to tenants.json for the bridge.",
    )
    p.add_argument("name", metavar="NAME", help="the tenant")
    p.add_argument("--gateways", metavar="N", help="active gateways allowed (or none)")
    p.add_argument("--technicians", metavar="N", help="technicians holding a valid certificate (or none)")
    p.add_argument("--points-per-s", metavar="N", help="ingest rate; the bridge delays the tenant above it (or none)")
    p.add_argument("--retention-days", metavar="N", help="days of data kept (or none)")
    p.add_argument(
        "--message-size",
        metavar="SIZE",
        help="largest MQTT packet the broker accepts, e.g. 256KiB (none: the default, 1MiB)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_tenant_plan)
    placement_cli.add_tenant_move(tenant, common)
    placement_cli.add_commands(commands, common)

    key = commands.add_parser(
        "key",
        help="provisioning keys",
        description="Provisioning keys: what an installer passes to agent provision --key.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = key.add_parser(
        "create",
        parents=[common],
        help="make a key and print it once",
        description="Make a provisioning key for TENANT and print it (stdout, once: only its SHA-256 is stored).",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant the key provisions into")
    p.add_argument("--uses", type=int, metavar="N", help="how many gateways it may provision (default: unlimited)")
    p.add_argument("--expires", type=_duration, metavar="DURATION", help="lifetime like 7d or 12h (default: never)")
    p.set_defaults(handler=cmd_key_create)
    p = key.add_parser(
        "list",
        parents=[common],
        help="list keys (never the keys themselves)",
        description="List provisioning keys with their state, uses and expiry.",
    )
    p.add_argument("tenant", metavar="TENANT", nargs="?", help="only this tenant's keys")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_key_list)
    p = key.add_parser(
        "revoke",
        parents=[common],
        help="revoke a key",
        description="Revoke a provisioning key; gateways it provisioned keep their certificates.",
    )
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id (key list), or the key itself")
    p.set_defaults(handler=cmd_key_revoke)

    p = commands.add_parser(
        "serve",
        parents=[common],
        help="run the HTTPS provisioning API",
        description="Serve the provisioning API over HTTPS (POST /v1/provision, POST /v1/renew, "
        "OpenAPI at /openapi.json) and re-issue CRLs before they expire.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8443, help="port to listen on (default 8443)")
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="server certificate (PEM, chain included); default: one issued by the service's own CA, <data>/api/ca.pem",
    )
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key")
    p.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP for the service's own certificate (repeatable; default: this host's names)",
    )
    p.add_argument(
        "--cert-lifetime",
        type=_duration,
        default=365 * 86400.0,
        metavar="DURATION",
        help="lifetime of gateway certificates (default 365d); gateways renew at two thirds",
    )
    p.add_argument(
        "--api-per-source",
        type=int,
        default=20,
        metavar="N",
        help="open API connections one client address may hold; more are closed at once (default 20)",
    )
    p.add_argument(
        "--api-max-connections",
        type=int,
        default=512,
        metavar="N",
        help="open API connections in all (default 512; keep it under half the file-descriptor limit)",
    )
    p.add_argument(
        "--api-handshake-timeout",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="a client must finish its TLS handshake within this (default 5s)",
    )
    p.add_argument(
        "--api-request-timeout",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="a client must send a whole request within this of connecting or of the previous answer (default 10s)",
    )
    p.add_argument(
        "--renew-from",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="refuse renewing a certificate before this fraction of its lifetime has passed (default 0.5)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=10,
        metavar="N",
        help="failed requests a client may make per --failure-window before 429 (default 10)",
    )
    p.add_argument(
        "--max-key-failures",
        type=int,
        default=10,
        metavar="N",
        help="failed requests per provisioning key or gateway certificate, from any address (default 10)",
    )
    p.add_argument(
        "--max-tenant-failures",
        type=int,
        default=100,
        metavar="N",
        help="failed requests per tenant, from any address (default 100)",
    )
    p.add_argument(
        "--failure-window",
        type=_duration,
        default=600.0,
        metavar="DURATION",
        help="window for --max-failures (default 10m)",
    )
    p.add_argument(
        "--crl-check",
        type=_duration,
        default=3600.0,
        metavar="DURATION",
        help="how often to check that CRLs are fresh (default 1h)",
    )
    p.set_defaults(handler=cmd_serve, default_log_level="info")

    device = commands.add_parser(
        "device", help="list and revoke gateways", description="Gateways of a tenant."
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = device.add_parser(
        "list",
        parents=[common],
        help="list gateways",
        description="List a tenant's gateways with their state, current certificate and renewals.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("gateway", metavar="GW", nargs="?", help="only this gateway")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_device_list)
    p = device.add_parser(
        "revoke",
        parents=[common],
        help="revoke a gateway and cut it off now",
        description="Revoke every certificate of the gateway, re-issue the CRL, reload the "
        "tenant's broker and end the gateway's live session (it cannot reconnect).",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("gateway", metavar="GW", help="the gateway id")
    p.set_defaults(handler=cmd_device_revoke)

    p = commands.add_parser(
        "technician-cert",
        parents=[common],
        help="a short-lived read-only certificate",
        description="Issue a read-only certificate for tech-NAME, add it to the tenant's ACL, "
        "reload the broker, and print the mosquitto_sub command that uses it.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("name", metavar="NAME", help="the technician (identity tech-NAME)")
    p.add_argument("--hours", type=float, default=8.0, help="lifetime in hours (default 8, at most 168)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="where to write the key, certificate and tenant CA (default: current directory)",
    )
    p.set_defaults(handler=cmd_technician_cert)

    technician = commands.add_parser(
        "technician",
        help="list and revoke technician certificates",
        description="Technician certificates of a tenant (issue with technician-cert).",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = technician.add_parser(
        "list",
        parents=[common],
        help="list technician certificates",
        description="List a tenant's technician certificates with their state.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_technician_list)
    p = technician.add_parser(
        "revoke",
        parents=[common],
        help="revoke a technician and cut it off now",
        description="Revoke every certificate of tech-NAME, take it out of the ACL, re-issue the "
        "CRL, reload the broker and end its live sessions.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("name", metavar="NAME", help="the technician (NAME or tech-NAME)")
    p.set_defaults(handler=cmd_technician_revoke)

    bridge = commands.add_parser(
        "bridge",
        help="bridge identities",
        description="Each bridge process has an identity of its own, bridge.INSTANCE, on every tenant's broker.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = bridge.add_parser(
        "add",
        parents=[common],
        help="issue bridge.INSTANCE on every tenant",
        description="Issue the identity bridge.INSTANCE (a client certificate) on every tenant, now "
        "and for tenants created later, list it in each ACL and in tenants.json, and "
        "reload the brokers. Then run: bridge run --instance INSTANCE.",
    )
    p.add_argument("instance", metavar="INSTANCE", help="the bridge process's name (tenant create issues 'main')")
    p.set_defaults(handler=cmd_bridge_add)
    p = bridge.add_parser(
        "list",
        parents=[common],
        help="list bridge identities",
        description="List the bridge identities and the tenants they hold a certificate on.",
    )
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_bridge_list)

    crl = commands.add_parser("crl", help="certificate revocation lists", description="CRL upkeep.").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = crl.add_parser(
        "refresh",
        parents=[common],
        help="re-issue CRLs that expire soon and reload the brokers",
        description="Re-issue each tenant's CRL with fewer than 4 of its 7 days left (all with "
        "--force) and reload the broker. serve does this hourly; run it daily from a "
        "timer when serve is not running.",
    )
    p.add_argument("tenant", metavar="TENANT", nargs="?", help="only this tenant")
    p.add_argument("--force", action="store_true", help="re-issue even if still fresh")
    p.set_defaults(handler=cmd_crl_refresh)

    config = commands.add_parser(
        "config",
        help="gateways' configurations: store versions, push, compare with what runs",
        description="Each gateway's desired agent configuration, versioned in the registry, pushed over MQTT "
        "on gw/GW/cmd/config, and compared with what each agent reports running (docs/fleet.md).",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = config.add_parser(
        "set",
        parents=[common],
        help="store a new version of a gateway's configuration",
        description="Store FILE (an agent config, docs/config.md) as the gateway's next version; the same "
        "text as the newest version stores nothing. The gateway checks it fully when it is pushed.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("gateway", metavar="GW", help="the gateway id")
    p.add_argument("file", metavar="FILE", help="agent config (YAML)")
    p.add_argument("--note", help="why this version (shown by config show)")
    p.add_argument("--push", action="store_true", help="push it at once (as config push)")
    p.add_argument("--timeout", type=_duration, default=10.0, metavar="DURATION", help="wait for the answer (10s)")
    p.add_argument(
        "--wait", type=_duration, metavar="DURATION", help="with --push: wait for the outcome (as config push --wait)"
    )
    p.set_defaults(handler=cmd_config_set)
    p = config.add_parser(
        "push",
        parents=[common],
        help="push a stored version to its gateway",
        description="Publish the newest (or --version N) stored configuration on gw/GW/cmd/config as the "
        "operators' identity and print the gateway's answer: applying, or rejected with every reason. "
        "Exit code 1 when rejected.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("gateway", metavar="GW", help="the gateway id")
    p.add_argument("--version", type=int, metavar="N", help="this stored version (default: the newest)")
    p.add_argument("--timeout", type=_duration, default=10.0, metavar="DURATION", help="wait for the answer (10s)")
    p.add_argument(
        "--wait",
        type=_duration,
        metavar="DURATION",
        help="then wait this long for the outcome: applied (exit 0) or rolled back (exit 1, with the reason)",
    )
    p.set_defaults(handler=cmd_config_push)
    p = config.add_parser(
        "show",
        parents=[common],
        help="print a stored configuration",
        description="Print the newest (or --version N) stored configuration of the gateway, as stored.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("gateway", metavar="GW", help="the gateway id")
    p.add_argument("--version", type=int, metavar="N", help="this stored version (default: the newest)")
    p.add_argument("--json", action="store_true", help="one JSON document (with the YAML) for scripts")
    p.set_defaults(handler=cmd_config_show)
    p = config.add_parser(
        "status",
        parents=[common],
        help="desired against running configuration, per gateway (drift)",
        description="Read every gateway's retained status from the tenant's broker and compare the "
        "configuration it runs with the newest stored one: in sync, drift (a different version, a "
        "rollback, or a local edit), not pushed, or no status. Exit code 3 when any gateway drifts.",
    )
    p.add_argument("tenant", metavar="TENANT", help="the tenant")
    p.add_argument("gateway", metavar="GW", nargs="?", help="only this gateway")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_config_status)

    token = commands.add_parser(
        "operator-token",
        help="tokens for the API's configuration endpoints",
        description="Operator tokens: what a script or the console sends (Authorization: Bearer) to the API's "
        "configuration endpoints (docs/fleet.md).",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = token.add_parser(
        "create",
        parents=[common],
        help="make a token and print it once",
        description="Make an operator token and print it (stdout, once: only its SHA-256 is stored).",
    )
    p.add_argument("name", metavar="NAME", help="who or what uses it (console, ci, …)")
    p.add_argument("--tenant", metavar="TENANT", help="reach only this tenant's gateways (default: every tenant)")
    p.set_defaults(handler=cmd_token_create)
    p = token.add_parser(
        "list", parents=[common], help="list tokens (never the tokens)", description="List operator tokens."
    )
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_token_list)
    p = token.add_parser(
        "revoke", parents=[common], help="revoke a token", description="Revoke an operator token at once."
    )
    p.add_argument("token_id", metavar="TOKEN_ID", help="the token's id (operator-token list), or the token itself")
    p.set_defaults(handler=cmd_token_revoke)
    accept_global_options_anywhere(parser)
    return parser


# -- handlers ------------------------------------------------------------------


def _data(args: argparse.Namespace) -> DataDir:
    return DataDir.resolve(args.data_dir)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_init(args: argparse.Namespace) -> int:
    data = _data(args)
    limits = {
        field: value
        for field, value in (
            ("maxconn", args.proxy_maxconn),
            ("per_source", args.proxy_per_source),
            ("per_tenant", args.proxy_per_tenant),
            ("hello_timeout", args.proxy_hello_timeout),
            ("idle_timeout", args.proxy_idle_timeout),
        )
        if value is not None
    }
    settings, created = tenants.init(
        data,
        proxy_bind=args.proxy_bind,
        proxy_port=args.proxy_port,
        public_port=args.public_port,
        first_broker_port=args.first_broker_port,
        limits=limits,
        renew_overlap_s=args.renew_overlap,
        proxy_connect=args.proxy_connect,
    )
    print(
        f"{'created' if created else 'updated'} {data.root}: proxy on {settings.proxy_bind}:{settings.proxy_port}, "
        f"gateways dial port {settings.public_port}, brokers from port {settings.first_broker_port}"
    )
    lim = settings.limits
    print(
        f"  proxy limits: {lim.per_source} connections per address, {lim.per_tenant} per tenant, "
        f"{lim.maxconn or 'HAProxy default'} in all; ClientHello within {lim.hello_timeout}, idle {lim.idle_timeout}"
    )
    if not created:
        print(f"  proxy: {tenants.apply_proxy(data)}")
    return 0


def cmd_tenant_create(args: argparse.Namespace) -> int:
    data = _data(args)
    created = tenants.place_tenant(
        data, args.name, args.domain, broker_port=args.broker_port, host=args.host, storage=args.storage
    )
    tenant = created.tenant
    files = data.tenant(tenant.name, tenant.broker_host)
    proxy = tenants.apply_proxy(data)
    print(f"tenant {tenant.name} created")
    print(f"  broker URL   {tenant.url}  (its Mosquitto: {tenant.broker_address}:{tenant.broker_port})")
    if created.placed:
        print(f"  host         {tenant.broker_host}: {created.host.reason}")
        print(f"  storage      {tenant.storage or 'the bridge storage'}: {created.storage.reason}")
    print(f"  tenant CA    {files.ca_cert}")
    print(
        f"  bridge       {files.identity('bridge.main')[0]}  (bridge run --instance main; more: provisioning "
        "bridge add NAME)"
    )
    print(f"  commands     {files.bridge_cert}  {files.bridge_key}  (CN bridge: operators' tools)")
    print(f"  proxy        {data.haproxy_cfg}: {proxy}")
    print(f"start its broker:  mosquitto -c {files.conf}")
    print(f"next:              provisioning key create {tenant.name} --uses 1 --expires 7d")
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    data = _data(args)
    data.require()
    with Registry(data.registry) as registry:
        found = registry.tenants()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": t.name,
                        "domain": t.domain,
                        "url": t.url,
                        "broker_port": t.broker_port,
                        "host": t.broker_host,
                        "broker_address": t.broker_address,
                        "storage": t.storage,
                        "created_at": t.created_at,
                    }
                    for t in found
                ]
            )
        )
        return 0
    _table(
        [("TENANT", "BROKER URL", "BROKER", "HOST", "STORAGE", "CREATED")]
        + [
            (t.name, t.url, f"{t.broker_address}:{t.broker_port}", t.broker_host, t.storage or "-", t.created_at)
            for t in found
        ]
    )
    return 0


def cmd_tenant_plan(args: argparse.Namespace) -> int:
    data = _data(args)
    changes = {field: getattr(args, field) for field in plans.FIELDS if getattr(args, field) is not None}
    steps: list[str] = []
    if changes:
        _, steps = plans.update(data, args.name, changes)
    plan, usage = plans.show(data, args.name)
    if args.json:
        print(json.dumps({"tenant": args.name, "limits": plan.as_json(), "usage": usage}))
        return 0
    if changes:
        print(f"tenant {args.name}: plan {'unchanged' if steps == ['unchanged'] else 'updated'}")
    rows = [("LIMIT", "VALUE", "IN USE")]
    for field in plans.FIELDS:
        value = getattr(plan, field)
        shown = "none" if value is None else str(value)
        if field == "message_size":
            shown = f"{plan.max_packet_size} bytes" + (" (default)" if value is None else "")
        rows.append((field, shown, str(usage[field]) if field in usage else ""))
    _table(rows)
    for step in steps:
        if step != "unchanged":
            print(f"  {step}")
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    new, found = admin.create_key(_data(args), args.tenant, uses=args.uses, expires_s=args.expires)
    print(new.text)
    uses = f"{found.max_uses} use(s)" if found.max_uses is not None else "unlimited uses"
    print(
        f"key {found.id} for tenant {found.tenant}: {uses}, expires {found.expires_at or 'never'}. "
        "It is shown only now; the registry keeps only its hash.",
        file=sys.stderr,
    )
    return 0


def _key_json(key: Any) -> dict[str, Any]:
    return {
        "id": key.id,
        "tenant": key.tenant,
        "state": key.state(now()),
        "uses": key.uses,
        "max_uses": key.max_uses,
        "expires_at": key.expires_at,
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
        "revoked_at": key.revoked_at,
    }


def cmd_key_list(args: argparse.Namespace) -> int:
    found = admin.list_keys(_data(args), args.tenant)
    if args.json:
        print(json.dumps([_key_json(k) for k in found]))
        return 0
    _table(
        [("KEY", "TENANT", "STATE", "USES", "EXPIRES", "CREATED", "LAST USED")]
        + [
            (
                k.id,
                k.tenant,
                k.state(now()),
                f"{k.uses}/{k.max_uses if k.max_uses is not None else '-'}",
                k.expires_at or "never",
                k.created_at,
                k.last_used_at or "never",
            )
            for k in found
        ]
    )
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    key_id = (
        args.key_id.split("_")[1] if args.key_id.startswith("fek_") and args.key_id.count("_") >= 2 else args.key_id
    )
    key = admin.revoke_key(_data(args), key_id)
    print(f"key {key.id} of tenant {key.tenant} revoked at {key.revoked_at}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from provisioning.server import ServeOptions, serve

    for flag, value in (
        ("--max-failures", args.max_failures),
        ("--max-key-failures", args.max_key_failures),
        ("--max-tenant-failures", args.max_tenant_failures),
        ("--api-per-source", args.api_per_source),
        ("--api-max-connections", args.api_max_connections),
    ):
        if value < 1:
            raise ProvisioningError(f"{flag} must be at least 1")
    options = ServeOptions(
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_names=tuple(args.tls_name),
        cert_lifetime_s=args.cert_lifetime,
        renew_from=args.renew_from,
        api_per_source=args.api_per_source,
        api_max_connections=args.api_max_connections,
        api_handshake_timeout_s=args.api_handshake_timeout,
        api_request_timeout_s=args.api_request_timeout,
        max_failures=args.max_failures,
        max_key_failures=args.max_key_failures,
        max_tenant_failures=args.max_tenant_failures,
        failure_window_s=args.failure_window,
        crl_check_s=args.crl_check,
    )
    asyncio.run(serve(_data(args), options))
    return 0


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProvisioningError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvisioningError(f"{path}: cannot read: {exc}") from None


def _print_answer(gateway: str, answer: dict[str, Any]) -> int:
    if answer.get("ok"):
        same = " (already running)" if answer.get("unchanged") else ""
        print(f"{gateway}: version {answer.get('version')} {answer.get('state')}{same}, hash {answer.get('hash')}")
        return 0
    state = str(answer.get("state", "refused")).replace("_", " ")
    print(f"{gateway}: version {answer.get('version')} {state}", file=sys.stderr)
    for reason in answer.get("reasons") or [answer.get("error")]:
        print(f"  {reason}", file=sys.stderr)
    return 1


def cmd_config_set(args: argparse.Namespace) -> int:
    data = _data(args)
    data.require()
    stored = fleet.store(data, args.tenant, args.gateway, _read_file(args.file), source=args.file, note=args.note)
    print(f"{args.gateway}: version {stored.version}, hash {stored.hash}")
    if args.push:
        answer = fleet.push(data, args.tenant, args.gateway, timeout_s=args.timeout, wait_s=args.wait)
        return _print_answer(args.gateway, answer)
    return 0


def cmd_config_push(args: argparse.Namespace) -> int:
    data = _data(args)
    data.require()
    answer = fleet.push(data, args.tenant, args.gateway, version=args.version, timeout_s=args.timeout, wait_s=args.wait)
    return _print_answer(args.gateway, answer)


def cmd_config_show(args: argparse.Namespace) -> int:
    data = _data(args)
    data.require()
    stored = fleet.show(data, args.tenant, args.gateway, args.version)
    if args.json:
        print(json.dumps(stored.as_json(with_yaml=True)))
    else:
        sys.stdout.write(stored.yaml)
    return 0


def cmd_config_status(args: argparse.Namespace) -> int:
    data = _data(args)
    data.require()
    rows = fleet.drift(data, args.tenant, args.gateway)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(fleet.drift_line(row))
    return 3 if any(r["state"] == "drift" for r in rows) else 0


def cmd_token_create(args: argparse.Namespace) -> int:
    text, token = operators.create(_data(args), args.name, tenant=args.tenant)
    print(text)
    print(
        f"operator token {token.id} ({token.name}) for {'tenant ' + token.tenant if token.tenant else 'every tenant'}. "
        "It is shown only now; the registry keeps only its hash.",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    found = operators.listed(_data(args))
    if args.json:
        print(json.dumps([t.as_json() for t in found]))
        return 0
    rows = [("ID", "NAME", "TENANT", "STATE", "CREATED", "LAST USED")]
    for t in found:
        doc = t.as_json()
        rows.append((t.id, t.name, t.tenant or "*", doc["state"], t.created_at, t.last_used_at or "-"))
    _table(rows)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    token = operators.revoke(_data(args), args.token_id)
    print(f"operator token {token.id} ({token.name}) revoked at {token.revoked_at}")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    views = admin.list_devices(_data(args), args.tenant, args.gateway)
    if args.gateway and not views:
        raise ProvisioningError(f"no gateway {args.gateway!r} in tenant {args.tenant}")
    if args.json:
        print(json.dumps([v.as_json() for v in views]))
        return 0
    _table(
        [("GATEWAY", "STATE", "CERTIFICATE", "EXPIRES", "RENEWALS", "PROVISIONED", "KEY")]
        + [
            (
                v.device.name,
                f"{v.state}, possibly cloned" if v.device.cloned_at else v.state,
                v.serial or "-",
                v.not_after or "-",
                str(v.renewals),
                v.device.created_at,
                v.device.key_id or "-",
            )
            for v in views
        ]
    )
    return 0


def _print_revocation(result: admin.Revocation) -> int:
    """A gateway's or technician's revocation: what was done, one step per line."""
    head = (
        f"{result.gateway} was already revoked at {result.already_revoked_at}; enforced again"
        if result.already_revoked_at
        else f"{result.gateway} revoked in tenant {result.tenant.name}"
    )
    print(head)
    for step in result.steps:
        print(f"  {step}")
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    result = admin.revoke_device(_data(args), args.tenant, args.gateway)
    return _print_revocation(result)


def cmd_technician_cert(args: argparse.Namespace) -> int:
    cert = admin.technician_cert(_data(args), args.tenant, args.name, hours=args.hours, out_dir=args.out)
    print(
        f"{cert.identity}: read-only on tenant {args.tenant} until {cert.not_after:%Y-%m-%d %H:%M} UTC ({cert.broker})"
    )
    print(f"  certificate  {cert.cert_file}")
    print(f"  key          {cert.key_file}  (0600; hand it over privately)")
    print(f"  tenant CA    {cert.ca_file}")
    print("watch every gateway and alert:")
    print(f"  {cert.command}")
    return 0


def cmd_technician_list(args: argparse.Namespace) -> int:
    views = admin.list_technicians(_data(args), args.tenant)
    if args.json:
        print(json.dumps([v.as_json() for v in views]))
        return 0
    _table(
        [("TECHNICIAN", "STATE", "CERTIFICATE", "EXPIRES", "ISSUED", "REVOKED")]
        + [(v.identity, v.state, v.serial, v.not_after, v.issued_at, v.revoked_at or "-") for v in views]
    )
    return 0


def cmd_technician_revoke(args: argparse.Namespace) -> int:
    result = admin.revoke_technician(_data(args), args.tenant, args.name)
    return _print_revocation(result)


def cmd_bridge_add(args: argparse.Namespace) -> int:
    added = admin.add_bridge(_data(args), args.instance)
    where = ", ".join(added.tenants) if added.tenants else "no tenant needed one (already issued)"
    print(f"{added.identity}: issued on {where}; tenants created later get it too")
    print(f"run it with:  bridge run --config FILE --instance {added.instance}   (tenants_from: {_data(args).root})")
    return 0


def cmd_bridge_list(args: argparse.Namespace) -> int:
    found = admin.list_bridges(_data(args))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "identity": identity,
                        "tenants": [c.tenant for c in certs],
                        "not_after": min(c.not_after for c in certs),
                    }
                    for identity, certs in found
                ]
            )
        )
        return 0
    _table(
        [("IDENTITY", "TENANTS", "FIRST EXPIRY")]
        + [(identity, ",".join(c.tenant for c in certs), min(c.not_after for c in certs)) for identity, certs in found]
    )
    return 0


def cmd_crl_refresh(args: argparse.Namespace) -> int:
    for status in admin.refresh_crls(_data(args), force=args.force, only=args.tenant):
        action = "re-issued" if status.reissued else "fresh"
        print(f"{status.tenant}: {action}, valid until {status.next_update:%Y-%m-%d %H:%M} UTC ({status.broker})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, default_log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

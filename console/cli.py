"""The ``console`` command: serve the fleet console, manage its accounts, read its audit log.

Like ``provisioning``: the project's errors become one ``Error: …`` line on
stderr and a non-zero exit code. Every command takes ``--state-dir``
(default ``$FE_CONSOLE_DIR`` or /var/lib/factory-edge/console), where the
accounts database lives. Passwords are read from the terminal (twice), or
from the first line of standard input with ``--password-stdin``; never
from the command line, where ``ps`` would show them.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from factory_edge.cli import accept_global_options_anywhere, add_global_options, run_command

from .accounts import AccountError, Accounts, Role

STATE_ENV = "FE_CONSOLE_DIR"
DEFAULT_STATE_DIR = "/var/lib/factory-edge/console"


def _state(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise AccountError("--password-stdin: standard input is empty")
        return line
    if not sys.stdin.isatty():
        raise AccountError("no terminal to ask the password on: give it with --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise AccountError("the two passwords differ")
    return first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="console",
        description="factory-edge fleet console: the web page where operators and tenants see and run their fleet.",
    )
    add_global_options(parser, log_level_help="default: info for serve, warning otherwise")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", metavar="DIR", help=f"accounts, audit log, rollups (default ${STATE_ENV} or {DEFAULT_STATE_DIR})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "serve",
        parents=[common],
        help="serve the console over HTTPS",
        description="Serve the console and its JSON API (OpenAPI at /openapi.json) over HTTPS. Tenant data comes "
        "from the bridge's storage (read-only); provisioning actions need --provisioning-dir.",
    )
    p.add_argument("--bridge-config", required=True, metavar="FILE", help="the bridge config: storage and tenants")
    p.add_argument("--provisioning-dir", metavar="DIR", help="the provisioning data directory (keys, revocations)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8444, help="port (default 8444)")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate (PEM); default: made here")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key")
    p.add_argument("--tls-name", action="append", default=[], metavar="NAME", help="a name for the made certificate")
    p.set_defaults(handler=cmd_serve, default_log_level="info")

    account = commands.add_parser(
        "account", help="create, list, change and remove console accounts", description="Console accounts."
    )
    acts = account.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = acts.add_parser(
        "create",
        parents=[common],
        help="create an account",
        description="Create an account: operator (every tenant, provisioning), tenant-admin (one tenant: gateways, "
        "keys, technicians, alerts) or viewer (one tenant, read-only).",
    )
    p.add_argument("name", help="account name (letters, digits, '_', '.', '-')")
    p.add_argument("--role", required=True, choices=[r.value for r in Role], help="what the account may do")
    p.add_argument("--tenant", help="the tenant of a tenant-admin or viewer")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(handler=cmd_create)
    p = acts.add_parser("list", parents=[common], help="list accounts", description="List every account.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_list)
    p = acts.add_parser(
        "password", parents=[common], help="set an account's password", description="Set a password; ends its sessions."
    )
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(handler=cmd_password)
    for name, text in (
        ("disable", "disable an account (its sessions end)"),
        ("enable", "enable a disabled account"),
        ("remove", "remove an account (its sessions end)"),
    ):
        p = acts.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("name")
        p.set_defaults(handler=cmd_change, change=name)

    p = commands.add_parser(
        "audit", parents=[common], help="print the audit log", description="Who changed what, when: newest first."
    )
    p.add_argument("--tenant", help="only this tenant's entries")
    p.add_argument("--limit", type=int, default=50, help="at most N entries (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_audit)
    accept_global_options_anywhere(parser)
    return parser


def cmd_create(args: argparse.Namespace) -> int:
    accounts = Accounts(_state(args))
    made = accounts.create(args.name, args.role, _password(args), tenant=args.tenant)
    print(f"account {made.name} created: {made.role}" + (f" of tenant {made.tenant}" if made.tenant else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    found = Accounts(_state(args)).all()
    if args.json:
        print(json.dumps([a.as_json() for a in found]))
        return 0
    rows = [("NAME", "ROLE", "TENANT", "STATE")] + [
        (a.name, str(a.role), a.tenant or "(all)", "disabled" if a.disabled_at else "active") for a in found
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def cmd_password(args: argparse.Namespace) -> int:
    Accounts(_state(args)).set_password(args.name, _password(args))
    print(f"password of {args.name} set; its sessions ended")
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    accounts = Accounts(_state(args))
    if args.change == "remove":
        accounts.remove(args.name)
    else:
        accounts.set_disabled(args.name, args.change == "disable")
    print(f"account {args.name}: {args.change}d")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    entries = Accounts(_state(args)).audit_log(args.tenant, limit=args.limit)
    if args.json:
        print(json.dumps(entries))
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["ts"] / 1000))
        detail = f" {json.dumps(e['detail'])}" if e["detail"] else ""
        print(f"{when}Z  {e['actor']}  {e['tenant'] or '-'}  {e['action']}  {e['target'] or ''}{detail}".rstrip())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServeOptions, serve
    from .service import Console, Settings

    console = Console(
        Settings(
            state_dir=_state(args),
            bridge_config=Path(args.bridge_config),
            provisioning_dir=Path(args.provisioning_dir) if args.provisioning_dir else None,
        )
    )
    if not console.accounts.all():
        print(
            f"console: no accounts yet; create the first operator with: console account create NAME --role operator "
            f"--state-dir {_state(args)}",
            file=sys.stderr,
        )
    options = ServeOptions(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_names=tuple(args.tls_name)
    )
    try:
        asyncio.run(serve(console, options))
    finally:
        console.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, default_log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The console's pages: one HTML shell per page, filled in by ``static/console.js`` from the JSON API.

Pages are plain HTML with no inline script or style (the Content-Security-Policy
allows neither): the shell names the page, the tenant and the gateway in
``data-`` attributes of ``<body>``, and the script does the rest. Without a
session a page redirects to ``/login``; a tenant the account may not see is
a 404 page, the same as a tenant that does not exist.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from .accounts import Role
from .security import session_token
from .service import Console

TITLES = {
    "login": "Log in",
    "home": "Tenants",
    "fleet": "Fleet",
    "gateway": "Gateway",
    "alerts": "Alerts",
    "provisioning": "Provisioning",
    "audit": "Audit log",
}


def shell(page: str, *, tenant: str = "", gw: str = "", status: int = 200, message: str = "") -> HTMLResponse:
    title = " · ".join(x for x in (TITLES.get(page, "Not found"), gw, tenant, "factory-edge console") if x)
    attrs = f'data-page="{html.escape(page)}" data-tenant="{html.escape(tenant)}" data-gw="{html.escape(gw)}"'
    body = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/console.css">
<script src="/static/chart.js" defer></script>
<script src="/static/console.js" defer></script>
</head>
<body {attrs}>
<a class="skip" href="#main">Skip to content</a>
<header><nav id="nav" aria-label="Main"><a href="/" class="brand">factory-edge</a></nav></header>
<main id="main" tabindex="-1"><h1>{html.escape(TITLES.get(page, "Not found"))}</h1>
<p id="message" role="status" aria-live="polite">{html.escape(message)}</p>
<div id="content"></div></main>
</body>
</html>
"""
    return HTMLResponse(body, status_code=status)


def add_pages(app: FastAPI, console: Console) -> None:
    static = resources.files("console") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    def account(request: Request) -> Any:
        token = session_token(dict(request.scope.get("headers", [])))
        found = console.accounts.session(token) if token else None
        return found.account if found else None

    def tenant_page(request: Request, page: str, tenant: str, gw: str = "") -> Response:
        who = account(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        if not who.sees(tenant) or tenant not in console.tenants():
            return shell("missing", status=404, message="No such page.")
        return shell(page, tenant=tenant, gw=gw)

    @app.get("/login", include_in_schema=False)
    def login_page() -> Response:
        return shell("login")

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        who = account(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        if who.role is not Role.OPERATOR and who.tenant:
            return RedirectResponse(f"/tenants/{who.tenant}", status_code=303)
        return shell("home")

    @app.get("/audit", include_in_schema=False)
    def audit_page(request: Request) -> Response:
        who = account(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        if who.role is not Role.OPERATOR:
            return shell("missing", status=404, message="No such page.")
        return shell("audit")

    @app.get("/tenants/{tenant}", include_in_schema=False)
    def fleet_page(request: Request, tenant: str) -> Response:
        return tenant_page(request, "fleet", tenant)

    @app.get("/tenants/{tenant}/gateways/{gw}", include_in_schema=False)
    def gateway_page(request: Request, tenant: str, gw: str) -> Response:
        return tenant_page(request, "gateway", tenant, gw)

    @app.get("/tenants/{tenant}/alerts", include_in_schema=False)
    def alerts_page(request: Request, tenant: str) -> Response:
        return tenant_page(request, "alerts", tenant)

    @app.get("/tenants/{tenant}/provisioning", include_in_schema=False)
    def provisioning_page(request: Request, tenant: str) -> Response:
        return tenant_page(request, "provisioning", tenant)

    @app.get("/tenants/{tenant}/audit", include_in_schema=False)
    def tenant_audit_page(request: Request, tenant: str) -> Response:
        return tenant_page(request, "audit", tenant)


__all__ = ["add_pages", "shell"]

"""The console attacked as its users would be: concurrent password guessing, cross-tenant and read-only accounts
trying changes, forged requests, oversized or absurd input, and a console started without provisioning.

Each test is a hole that was found and closed; the requests go through the whole ASGI app (as
``tests/test_console_api.py``), with the same tenants, stores and accounts (its ``fleet`` fixture).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from console.api import create_app
from console.service import Console
from tests.console_fixtures import PASSWORD
from tests.test_console_api import fleet, provisioned

__all__ = ["fleet", "provisioned"]  # fixtures used here


def _burst(app: Any, attempts: list[tuple[str, str]], name: str = "acme-viewer") -> list[int]:
    """Every ``(client address, password)`` login to ``name`` at once, as concurrent connections would."""

    async def one(address: str, password: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            answer = await c.post("/api/login", json={"name": name, "password": password})
            return answer.status_code

    async def every() -> list[int]:
        return list(await asyncio.gather(*(one(a, p) for a, p in attempts)))

    return asyncio.run(every())


def test_concurrent_guesses_cannot_outrun_the_login_limits(fleet: Console) -> None:
    limit = fleet.settings.login_max_failures
    app = create_app(fleet)
    # From one address, 40 guesses at once: only the per-account limit's worth may reach the password check.
    codes = _burst(app, [("10.1.0.1", f"guess number {i}") for i in range(40)])
    assert codes.count(401) <= limit and codes.count(429) >= 40 - limit, codes
    failed = [e for e in fleet.accounts.audit_log("acme") if e["action"] == "login.failed"]
    assert len(failed) == codes.count(401)
    # Spread over 40 addresses (a botnet): the account's own limit still holds, and the right password is refused.
    codes = _burst(app, [(f"10.2.0.{i}", PASSWORD if i == 39 else f"guess {i}") for i in range(40)])
    assert set(codes) == {429}, codes
    # A correct login counts as no failure: an account with a few typos still gets in.
    typos = [("10.3.0.1", "typo typo typo")] * (limit - 1)
    assert _burst(app, typos, "acme-admin") == [401] * (limit - 1)
    for _ in range(3):
        assert _burst(app, [("10.3.0.1", PASSWORD)], "acme-admin") == [200]
    assert _burst(app, [("10.3.0.1", "one more typo")], "acme-admin") == [401]
    assert _burst(app, [("10.3.0.1", PASSWORD)], "acme-admin") == [429]

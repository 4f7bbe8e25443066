"""The console's front door: sessions, CSRF, login rate limits, response headers.

- The session cookie (``fe_session``) is ``Secure; HttpOnly; SameSite=Strict``,
  path ``/``; its value is a random token whose SHA-256 the accounts
  database keeps (``console.accounts``).
- Every change (any method but GET, HEAD, OPTIONS) under ``/api/`` must carry
  the session's CSRF token in ``X-CSRF-Token``; a plain HTML form cannot
  set that header, so a cross-site form post is refused (403) before any
  route runs. Login, which has no session yet, must be JSON
  (``Content-Type: application/json``, which a cross-site form cannot send
  without the browser asking first), and any ``Origin`` header must be the
  console's own.
- Logins are limited per client address and per account name
  (``provisioning.ratelimit.FailureLimiter``): past the limit, 429 with
  ``Retry-After``, before the password is even checked.
- A change's body is read whole before any route runs, up to 64 KiB; a
  larger one is refused (413), so no one can make the console hold a
  body of any size in memory, before or after logging in.
- Every answer carries a strict Content-Security-Policy (scripts and styles
  only from the console itself), ``nosniff``, no framing, no referrer, and
  API answers ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Any

from .accounts import Accounts

COOKIE = "fe_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY = 64 * 1024
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def client_of(scope: Mapping[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def session_token(headers: Mapping[bytes, bytes]) -> str | None:
    raw = headers.get(b"cookie")
    if not raw:
        return None
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(raw.decode("latin-1"))
    except Exception:  # a malformed Cookie header is no session, not an error page
        return None
    morsel = cookie.get(COOKIE)
    return morsel.value if morsel else None


def set_cookie_header(token: str, max_age_s: int) -> str:
    return f"{COOKIE}={token}; Path=/; Max-Age={max_age_s}; Secure; HttpOnly; SameSite=Strict"


def clear_cookie_header() -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"


class Guard:
    """ASGI middleware: CSRF and origin checks on every change, security headers on every answer."""

    def __init__(self, app: Any, accounts: Accounts) -> None:
        self.app = app
        self.accounts = accounts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope.get("headers", []))
        if scope["method"] not in SAFE_METHODS and path.startswith("/api/"):
            refusal = self._refusal(scope["method"], path, headers, client_of(scope))
            if refusal:
                await _answer(send, refusal[0], refusal[1])
                return
            body = await _small_body(headers, receive)
            if isinstance(body, tuple):
                if body[0]:
                    await _answer(send, body[0], body[1])
                return
            receive = _replay(body, receive)
        api = path.startswith("/api/") or path == "/openapi.json"

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = list(_HEADERS)
                if api:
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)

    def _refusal(self, method: str, path: str, headers: Mapping[bytes, bytes], client: str) -> tuple[int, str] | None:
        token = session_token(headers)
        session = self.accounts.session(token) if token else None

        def refused(reason: str, status: int, detail: str) -> tuple[int, str]:
            # A refusal riding on someone's live session (a forged request, most likely): in their audit log.
            if session is not None:
                account = session.account
                self.accounts.audit(
                    account.name, account.tenant, "refused", f"{method} {path}", {"reason": reason}, client
                )
            return status, detail

        origin = headers.get(b"origin")
        host = headers.get(b"host", b"")
        if origin is not None and origin.split(b"://", 1)[-1] != host:
            return refused("cross-origin request", 403, "cross-origin request refused")
        if path == "/api/login":
            if headers.get(b"content-type", b"").split(b";")[0].strip() != b"application/json":
                return 415, "login takes a JSON body (Content-Type: application/json)"
            return None
        if session is None:
            return 401, "not logged in"
        sent = headers.get(CSRF_HEADER.encode(), b"").decode("latin-1")
        if not sent or not hmac.compare_digest(sent, session.csrf):
            return refused(
                "CSRF token missing or wrong",
                403,
                "CSRF token missing or wrong (send the session's token in X-CSRF-Token)",
            )
        return None


async def _small_body(headers: Mapping[bytes, bytes], receive: Any) -> bytes | tuple[int, str]:
    """The whole body of a change, read before any route runs, or ``(413, why)`` past ``MAX_BODY``
    (``(0, "")``: the client went away). The largest a route takes is a 2,000-character comment;
    without this, anyone, logged in or not, could make the console hold a body of any size in memory."""
    length = headers.get(b"content-length", b"")
    if length.isdigit() and int(length) > MAX_BODY:
        return 413, f"request body is {int(length)} bytes; the limit is {MAX_BODY}"
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return 0, ""
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > MAX_BODY:
            return 413, f"request body is over the limit of {MAX_BODY} bytes"
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands the route the body read already, then waits for the client as before."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = ["COOKIE", "CSRF_HEADER", "Guard", "clear_cookie_header", "client_of", "session_token", "set_cookie_header"]

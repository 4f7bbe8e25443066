"""The console's JSON API (FastAPI): every page is a client of these routes; ``/openapi.json`` describes them.

Who may call what:

| route | operator | tenant admin (own tenant) | viewer (own tenant) |
|---|---|---|---|
| ``GET /api/tenants/{t}/…`` | yes | yes | yes |
| ``POST /api/tenants/{t}/…`` (acknowledge, keys, revoke, technicians) | yes | yes | 403 |
| another tenant's ``/api/tenants/{t}/…`` | yes | 404 | 404 |
| ``GET /api/audit`` (every tenant) | yes | 404 | 404 |

A tenant an account may not see answers exactly like one that does not
exist (404, the same text), so no name, figure or count of another tenant
ever leaks. Errors are ``{"detail": "<one line>"}``. Every change is in
the audit log (``console.accounts``), refused ones too.
"""

# No "from __future__ import annotations": FastAPI reads the routes' annotations, which name local dependencies.

import asyncio
import csv
import datetime as dt
import io
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from factory_edge import names
from factory_edge.configfile import format_location
from factory_edge.errors import ProvisioningError, StorageError
from factory_edge.logs import fields
from factory_edge.units import parse_duration
from provisioning.ratelimit import FailureLimiter

from .accounts import MAX_AGE_S, Role, Session
from .security import Guard, clear_cookie_header, client_of, session_token, set_cookie_header
from .service import Console, NotConfigured
from .tenantdata import Series

log = logging.getLogger(__name__)

MAX_STREAMS_PER_ACCOUNT = 32  # live pages (server-sent event streams) one account may hold open at once

MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z: the last time SQLite, PostgreSQL and the CSV all hold


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class Ack(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gw: str = Field(max_length=64)
    device: str = Field(max_length=128)
    rule: str = Field(max_length=128)
    comment: str = Field(min_length=1, max_length=2000, description="why it is acknowledged, what is being done")


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uses: int | None = Field(default=None, ge=1, le=100_000, description="how many gateways it may provision")
    expires: str | None = Field(default=None, max_length=16, description="lifetime, like 7d or 12h")


class NewTechnician(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    hours: float = Field(default=8, gt=0, le=168)


@dataclass(frozen=True)
class Ctx:
    session: Session
    tenant: str
    client: str

    @property
    def actor(self) -> str:
        return self.session.account.name


def create_app(console: Console, *, live_interval_s: float = 1.0) -> FastAPI:
    from .pages import add_pages

    app = FastAPI(
        title="factory-edge console API",
        version="1",
        docs_url=None,
        redoc_url=None,
        description="The fleet console's API: fleet overview, gateways, trends, alerts and provisioning, per tenant.",
    )
    by_client = FailureLimiter(
        max_failures=4 * console.settings.login_max_failures, window_s=console.settings.login_window_s
    )
    by_account = FailureLimiter(
        max_failures=console.settings.login_max_failures, window_s=console.settings.login_window_s
    )

    def session(request: Request) -> Session:
        token = session_token(dict(request.scope.get("headers", [])))
        found = console.accounts.session(token) if token else None
        if found is None:
            raise HTTPException(401, "not logged in")
        return found

    def viewer(tenant: str, request: Request, s: Annotated[Session, Depends(session)]) -> Ctx:
        if not s.account.sees(tenant) or tenant not in console.tenants():
            if request.method not in ("GET", "HEAD"):  # a change tried on another tenant: in the account's own log
                target = f"{request.method} {request.url.path}"
                reason = {"reason": "not this account's tenant"}
                console.accounts.audit(
                    s.account.name, s.account.tenant, "refused", target, reason, client_of(request.scope)
                )
            raise HTTPException(404, "no such tenant")
        return Ctx(s, tenant, client_of(request.scope))

    def changer(ctx: Annotated[Ctx, Depends(viewer)]) -> Ctx:
        if not ctx.session.account.may_change(ctx.tenant):
            console.accounts.audit(ctx.actor, ctx.tenant, "refused", None, {"reason": "read-only account"}, ctx.client)
            raise HTTPException(403, f"account {ctx.actor} may only look ({ctx.session.account.role})")
        return ctx

    streams: dict[str, weakref.WeakSet[AsyncIterator[str]]] = {}  # each account's open live streams

    View = Annotated[Ctx, Depends(viewer)]
    Change = Annotated[Ctx, Depends(changer)]
    api = APIRouter(prefix="/api")

    # ---------------------------------------------------------------- session

    @api.post("/login")
    def login(body: Login, request: Request) -> JSONResponse:
        """Start a session: sets the ``fe_session`` cookie; answers the CSRF token every change must send."""
        client = client_of(request.scope)
        # Each attempt is counted before the password is checked (and forgiven if right), so concurrent
        # guesses cannot all pass the limits while the first ones are still being hashed.
        counted: list[tuple[FailureLimiter, str]] = []
        for limiter, subject in ((by_client, client), (by_account, f"account {body.name}")):
            wait = limiter.attempt(subject)
            if wait:
                for done, what in counted:
                    done.forgive(what)
                log.warning("login refused", extra=fields(client=client, account=body.name, reason="rate limit"))
                return JSONResponse(
                    {"detail": f"too many failed logins; retry in {wait} s"}, 429, headers={"Retry-After": str(wait)}
                )
            counted.append((limiter, subject))
        found = console.accounts.login(body.name, body.password, client=client)
        if found is None:
            log.warning("login failed", extra=fields(client=client, account=body.name))
            raise HTTPException(401, "wrong name or password")
        for done, what in counted:
            done.forgive(what)
        token, s = found
        log.info("login", extra=fields(client=client, account=body.name))
        response = JSONResponse({"account": s.account.as_json(), "csrf": s.csrf})
        response.headers["set-cookie"] = set_cookie_header(token, MAX_AGE_S)
        return response

    @api.post("/logout")
    def logout(request: Request, s: Annotated[Session, Depends(session)]) -> JSONResponse:
        console.accounts.logout(s, client=client_of(request.scope))
        response = JSONResponse({"ok": True})
        response.headers["set-cookie"] = clear_cookie_header()
        return response

    @api.get("/session")
    def whoami(s: Annotated[Session, Depends(session)]) -> dict[str, Any]:
        """The account, its CSRF token and the tenants it sees."""
        return {"account": s.account.as_json(), "csrf": s.csrf, "tenants": _visible(console, s)}

    @api.get("/tenants")
    def tenants(s: Annotated[Session, Depends(session)]) -> list[str]:
        return _visible(console, s)

    @api.get("/audit")
    def audit_all(
        s: Annotated[Session, Depends(session)], limit: int = Query(200, ge=1, le=5000)
    ) -> list[dict[str, Any]]:
        """Every tenant's audit log (operators only)."""
        if s.account.role is not Role.OPERATOR:
            raise HTTPException(404, "not found")
        return console.accounts.audit_log(limit=limit)

    # ---------------------------------------------------------------- reading

    @api.get("/tenants/{tenant}/fleet")
    def fleet(ctx: View) -> list[dict[str, Any]]:
        """Every gateway: online/offline, last seen, version, lag, backlog and unconfirmed batches (the agent's
        own figures, ``null`` until it reports them), dropped points, certificate expiry, errors."""
        return console.fleet(ctx.tenant)

    @api.get("/tenants/{tenant}/gateways/{gw}")
    def gateway(ctx: View, gw: str) -> dict[str, Any]:
        """A gateway's devices and tags with their newest value, unit, description, quality and error, and its
        recent events."""
        found = console.gateway(ctx.tenant, gw)
        if found is None:
            raise HTTPException(404, f"no gateway {gw!r}")
        return found

    @api.get("/tenants/{tenant}/trend")
    def trend(
        ctx: View,
        series: Annotated[list[str], Query(description="GATEWAY/DEVICE/TAG, one or more")],
        start: Annotated[int | None, Query(ge=0, le=MAX_MS, description="epoch ms; default: end minus 1 hour")] = None,
        end: Annotated[int | None, Query(ge=0, le=MAX_MS, description="epoch ms; default: now")] = None,
        buckets: Annotated[int, Query(ge=1, le=4000, description="at most this many points per series")] = 800,
    ) -> dict[str, Any]:
        """Each series over [start, end), downsampled on the server: per bucket ``[t, min, max, mean, count]``."""
        first, last = _range(start, end)
        return console.trend(ctx.tenant, _series(series), first, last, buckets)

    @api.get("/tenants/{tenant}/trend.csv", response_class=StreamingResponse)
    def trend_csv(
        ctx: View,
        series: Annotated[list[str], Query()],
        start: Annotated[int | None, Query(ge=0, le=MAX_MS)] = None,
        end: Annotated[int | None, Query(ge=0, le=MAX_MS)] = None,
    ) -> StreamingResponse:
        """Every raw point of the range as CSV: ``series,ts,time,value,quality,error``."""
        first, last = _range(start, end)
        chosen = _series(series)

        def rows() -> Iterator[str]:
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(["series", "ts", "time", "value", "quality", "error"])
            for one in chosen:
                for ts, value, quality, error in console.points(ctx.tenant, one, first, last):
                    writer.writerow([_cell(one.key), ts, _iso_ms(ts), _cell(value), _cell(quality), _cell(error or "")])
                    if out.tell() > 65536:
                        yield out.getvalue()
                        out.seek(0)
                        out.truncate()
            yield out.getvalue()

        name = f"{ctx.tenant}-{_iso_ms(first)[:10]}-trend.csv"
        return StreamingResponse(
            rows(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    @api.get("/tenants/{tenant}/alerts")
    def alerts(ctx: View, gw: str | None = None) -> dict[str, Any]:
        """Alerts pending or firing now (with their acknowledgement), the history of state changes, the acks."""
        return console.alerts(ctx.tenant, gw)

    @api.get("/tenants/{tenant}/audit")
    def audit(ctx: View, limit: int = Query(200, ge=1, le=5000)) -> list[dict[str, Any]]:
        """The tenant's audit log: who changed what, when (newest first)."""
        return console.accounts.audit_log(ctx.tenant, limit=limit)

    @api.get("/tenants/{tenant}/stream")
    async def stream(ctx: View, request: Request, gw: str | None = None) -> StreamingResponse:
        """Server-sent events: ``fleet``, ``alerts`` and (with ``gw``) ``gateway``, each sent when it changes."""
        token = session_token(dict(request.scope.get("headers", [])))
        # Each stream reads the tenant's store every interval: an account holds a bounded number open at once.
        for name in [n for n, held in streams.items() if not held]:
            del streams[name]
        held = streams.setdefault(ctx.actor, weakref.WeakSet())
        if len(held) >= MAX_STREAMS_PER_ACCOUNT:
            log.warning("live stream refused", extra=fields(account=ctx.actor, client=ctx.client, open=len(held)))
            raise HTTPException(
                429, f"account {ctx.actor} has {len(held)} live pages open already (at most {MAX_STREAMS_PER_ACCOUNT})"
            )
        return StreamingResponse(
            _tracked(held, _live(console, ctx, token or "", gw, request, live_interval_s)),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    # ---------------------------------------------------------------- changing

    @api.post("/tenants/{tenant}/alerts/ack")
    def acknowledge(ctx: Change, body: Ack) -> dict[str, Any]:
        """Acknowledge an alert that is pending or firing, with a comment (recorded with who and when)."""
        state = console.alert_state(ctx.tenant, body.gw, body.device, body.rule)
        if state is None:
            raise HTTPException(404, f"no alert {body.rule} on {body.gw}/{body.device}")
        if state[0] not in ("pending", "firing"):
            raise HTTPException(
                409, f"alert {body.rule} on {body.gw}/{body.device} is {state[0]}: nothing to acknowledge"
            )
        return console.accounts.acknowledge(
            ctx.tenant,
            body.gw,
            body.device,
            body.rule,
            state[1],
            account=ctx.actor,
            comment=body.comment,
            client=ctx.client,
        )

    @api.get("/tenants/{tenant}/keys")
    def keys(ctx: View) -> list[dict[str, Any]]:
        """Provisioning keys (never their secret)."""
        return console.keys(ctx.tenant)

    @api.post("/tenants/{tenant}/keys", status_code=201)
    def create_key(ctx: Change, body: NewKey) -> dict[str, Any]:
        """A new provisioning key; ``key`` is its secret, in this answer only."""
        expires_s = None
        if body.expires:
            try:
                expires_s = parse_duration(body.expires)
            except ValueError as exc:
                raise HTTPException(422, f"expires: {exc}") from None
            try:
                dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_s)
            except OverflowError:
                raise HTTPException(422, f"expires: {body.expires} is past the year 9999") from None
        made = _audited(
            ctx,
            console,
            "key.create",
            None,
            lambda: console.create_key(ctx.tenant, uses=body.uses, expires_s=expires_s),
        )
        console.accounts.audit(
            ctx.actor, ctx.tenant, "key.create", made["id"], {"uses": body.uses, "expires": body.expires}, ctx.client
        )
        return made

    @api.post("/tenants/{tenant}/keys/{key_id}/revoke")
    def revoke_key(ctx: Change, key_id: str) -> dict[str, Any]:
        console.require_provisioning(ctx.tenant)
        if console.key_tenant(key_id) != ctx.tenant:  # none, or another tenant's: the same answer, audited
            missing = f"no provisioning key {key_id!r}"
            console.accounts.audit(ctx.actor, ctx.tenant, "key.revoke.failed", key_id, {"error": missing}, ctx.client)
            raise HTTPException(404, missing)
        done = _audited(ctx, console, "key.revoke", key_id, lambda: console.revoke_key(key_id))
        console.accounts.audit(ctx.actor, ctx.tenant, "key.revoke", key_id, None, ctx.client)
        return done

    @api.get("/tenants/{tenant}/devices")
    def devices(ctx: View) -> list[dict[str, Any]]:
        """Provisioned gateways and their certificates."""
        return console.devices(ctx.tenant)

    @api.post("/tenants/{tenant}/gateways/{gw}/revoke")
    def revoke_gateway(ctx: Change, gw: str) -> dict[str, Any]:
        """Revoke the gateway's certificates, publish the CRL and end its session (``provisioning device revoke``)."""
        done = _audited(ctx, console, "gateway.revoke", gw, lambda: console.revoke_gateway(ctx.tenant, gw))
        console.accounts.audit(
            ctx.actor, ctx.tenant, "gateway.revoke", gw, {"certificates": done["certificates"]}, ctx.client
        )
        return done

    @api.get("/tenants/{tenant}/technicians")
    def technicians(ctx: View) -> list[dict[str, Any]]:
        return console.technicians(ctx.tenant)

    @api.post("/tenants/{tenant}/technicians", status_code=201)
    def technician_cert(ctx: Change, body: NewTechnician) -> dict[str, Any]:
        """A short-lived read-only certificate: its files (key included) in this answer only, and the
        ``mosquitto_sub`` line that uses them."""
        issued = _audited(
            ctx,
            console,
            "technician.issue",
            body.name,
            lambda: console.technician_cert(ctx.tenant, body.name, body.hours),
        )
        console.accounts.audit(
            ctx.actor, ctx.tenant, "technician.issue", issued["technician"], {"hours": body.hours}, ctx.client
        )
        return issued

    @api.post("/tenants/{tenant}/technicians/{name}/revoke")
    def revoke_technician(ctx: Change, name: str) -> dict[str, Any]:
        done = _audited(ctx, console, "technician.revoke", name, lambda: console.revoke_technician(ctx.tenant, name))
        console.accounts.audit(ctx.actor, ctx.tenant, "technician.revoke", done["technician"], None, ctx.client)
        return done

    app.include_router(api)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                return JSONResponse({"detail": "request body is not valid JSON"}, 422)
            loc = tuple(error.get("loc", ()))
            problems.append(
                f"{format_location(loc[1:] if loc[:1] in (('body',), ('query',), ('path',)) else loc)}: {error.get('msg', 'invalid')}"
            )
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, 422)

    @app.exception_handler(NotConfigured)
    async def not_configured(request: Request, exc: NotConfigured) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 409)

    @app.exception_handler(StorageError)
    async def storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage unreadable", extra=fields(path=request.url.path, err=str(exc)))
        return JSONResponse({"detail": f"tenant storage: {exc}"}, 503)

    add_pages(app, console)
    app.add_middleware(Guard, accounts=console.accounts)
    return app


def _visible(console: Console, s: Session) -> list[str]:
    return [t for t in console.tenants() if s.account.sees(t)]


def _audited(ctx: Ctx, console: Console, action: str, target: str | None, call: Any) -> Any:
    """Run a provisioning action; a refusal is audited and becomes a 4xx with the CLI's own message."""
    try:
        return call()
    except NotConfigured as exc:
        raise HTTPException(409, str(exc)) from None
    except (ProvisioningError, names.InvalidName) as exc:
        console.accounts.audit(ctx.actor, ctx.tenant, f"{action}.failed", target, {"error": str(exc)}, ctx.client)
        status = 404 if str(exc).startswith("no ") else 422  # provisioning.admin says "no gateway 'x' in tenant t"
        raise HTTPException(status, str(exc)) from None


def _range(start: int | None, end: int | None) -> tuple[int, int]:
    last = end if end is not None else int(time.time() * 1000) + 1
    first = start if start is not None else last - 3600_000
    if first >= last:
        raise HTTPException(422, f"start ({first}) must be before end ({last})")
    if last - first > 400 * 86400_000:
        raise HTTPException(422, "range: at most 400 days")
    return first, last


def _series(texts: list[str]) -> list[Series]:
    if not texts or len(texts) > 8:
        raise HTTPException(422, "series: one to eight GATEWAY/DEVICE/TAG")
    try:
        return [Series.parse(t) for t in texts]
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _cell(value: Any) -> Any:
    """A CSV cell: text that a spreadsheet would run as a formula (= + - @, tab, return) gets a leading ``'``.

    Text values and errors come from the machines (a barcode, an HMI entry); numbers stay as they are.
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _iso_ms(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts / 1000)) + f".{ts % 1000:03d}Z"


def _tracked(held: "weakref.WeakSet[AsyncIterator[str]]", events: AsyncIterator[str]) -> AsyncIterator[str]:
    """``events``, counted in ``held`` until it ends (or, never started, until it is collected)."""

    async def run() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            held.discard(me)

    me = run()
    held.add(me)
    return me


async def _live(
    console: Console, ctx: Ctx, token: str, gw: str | None, request: Request, every_s: float
) -> AsyncIterator[str]:
    """Each kind of snapshot whenever it differs from the last one sent; a comment line keeps proxies open."""
    sent: dict[str, str] = {}
    quiet = 0.0
    yield "retry: 2000\n\n"
    while not await request.is_disconnected():
        if console.accounts.session(token) is None:
            yield "event: logout\ndata: {}\n\n"
            return

        def snapshot() -> dict[str, Any]:
            # Every open page of a tenant shares one reading of its fleet per interval.
            fleet = console.shared(("fleet", ctx.tenant), every_s * 0.9, lambda: console.fleet(ctx.tenant))
            out: dict[str, Any] = {"fleet": fleet, "alerts": console.alerts(ctx.tenant, gw)}
            if gw:
                out["gateway"] = console.gateway(ctx.tenant, gw)
            return out

        try:
            docs = await asyncio.to_thread(snapshot)
        except StorageError as exc:
            docs = {"problem": {"detail": str(exc)}}
        changed = False
        for name, doc in docs.items():
            text = json.dumps(doc, separators=(",", ":"))
            if sent.get(name) != text:
                sent[name] = text
                changed = True
                yield f"event: {name}\ndata: {text}\n\n"
        quiet = 0.0 if changed else quiet + every_s
        if quiet >= 15:
            quiet = 0.0
            yield ": still here\n\n"
        await asyncio.sleep(every_s)


__all__ = ["create_app"]

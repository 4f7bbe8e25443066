"""The HTTPS provisioning API (FastAPI): ``POST /v1/provision``, ``POST /v1/renew``, ``GET /v1/health``.

And, for operators with a token (``Authorization: Bearer feo_…``,
``operators.py``), the gateways' configurations (``fleet.py``):
``GET /v1/tenants/{tenant}/configs`` (drift), ``GET`` and ``PUT
/v1/tenants/{tenant}/gateways/{gw}/config``, ``POST …/config/push``; and
the tenant's plan, ``GET`` and ``PUT /v1/tenants/{tenant}/plan``
(``plans.py``; setting it takes a token for every tenant).

Every error is ``{"detail": "<one line>"}`` with a precise status:

| status | when |
|---|---|
| 401 | unknown provisioning key; renewal certificate unknown, or the signature does not match its key; no or unknown operator token |
| 403 | key expired, used up or revoked; certificate revoked, expired or already renewed; the tenant's plan allows no more gateways; operator token revoked or for another tenant |
| 404 | no such tenant, stored configuration or version |
| 409 | the gateway name is taken by another (active) device |
| 413 | request body over 64 KiB |
| 422 | bad request body, CSR (not a CSR, key type or size, signature, CN not allowed) or name |
| 429 | too many failed attempts from this client, for this key or certificate, or for this tenant (``Retry-After``) |
| 504 | the tenant's broker or the gateway did not answer (configuration endpoints) |

The OpenAPI document is served at ``/openapi.json``; the interactive pages
are off (they load scripts from a CDN).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from factory_edge import __version__
from factory_edge.configfile import format_location
from factory_edge.errors import ProvisioningError
from factory_edge.logs import fields
from provisioning import fleet, operators, plans
from provisioning.errors import Forbidden, Invalid, NotFound, Refused, TooManyAttempts
from provisioning.ratelimit import FailureLimiter
from provisioning.registry import Registry
from provisioning.service import Service

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
T = TypeVar("T")


class ProvisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(max_length=200, description="the provisioning key, as printed by `provisioning key create`")
    csr: str = Field(
        max_length=16384,
        description="PEM certificate signing request made on the gateway "
        "(EC P-256/P-384 or RSA 2048-4096 with e=65537); its CN is the gateway id",
    )
    name: str | None = Field(
        default=None, max_length=64, description="gateway id; when given, the CSR's CN must equal it"
    )


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    certificate: str = Field(max_length=16384, description="the gateway's current certificate (PEM)")
    csr: str = Field(max_length=16384, description="PEM CSR for the new key, CN = the gateway id")
    signature: str = Field(
        max_length=2048,
        description="base64 signature of the CSR's DER bytes by the current key (ECDSA or RSA PKCS#1 v1.5, SHA-256)",
    )


class IssuedCertificate(BaseModel):
    gateway: str = Field(description="the gateway id (certificate CN, MQTT username)")
    tenant: str
    certificate: str = Field(description="the gateway's certificate (PEM)")
    ca: str = Field(description="the tenant CA (PEM): trust it for the broker")
    broker_url: str = Field(description="mqtts://mqtt.<tenant>.<domain>:8883")
    topic_root: str = Field(description="gw/<gateway>/")
    serial: str
    not_after: str
    renew_after: str = Field(description="when two thirds of the lifetime have passed")


class Problem(BaseModel):
    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        401: "unknown key, certificate or operator token",
        403: "key, certificate or operator token not usable",
        404: "no such tenant, configuration or version",
        409: "name already taken",
        413: "request body too large",
        422: "bad request, CSR or name",
        429: "too many failed attempts",
        504: "the tenant's broker or the gateway did not answer",
    }
    return {code: {"model": Problem, "description": text[code]} for code in codes}


def create_app(service: Service, limiter: FailureLimiter) -> FastAPI:
    app = FastAPI(
        title="factory-edge provisioning API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description="Provision gateways with a key and a CSR; renew their certificates.",
    )

    @app.post(
        "/v1/provision",
        status_code=201,
        response_model=IssuedCertificate,
        responses=_errors(401, 403, 409, 413, 422, 429),
    )
    def provision(body: ProvisionRequest) -> dict[str, Any]:
        """Spend one use of a provisioning key on a certificate for the gateway's CSR."""
        return service.provision(body.key, body.csr, body.name).as_json()

    @app.post("/v1/renew", response_model=IssuedCertificate, responses=_errors(401, 403, 413, 422, 429))
    def renew(body: RenewRequest) -> dict[str, Any]:
        """Renew a gateway's certificate, proven by its current certificate and key."""
        return service.renew(body.certificate, body.csr, body.signature).as_json()

    def operator(authorization: str | None, tenant: str) -> None:
        """401/403 without a token for this tenant; 404 for a tenant that does not exist."""
        operators.authorize(service.data, authorization, tenant)
        with Registry(service.data.registry) as registry:
            if registry.tenant(tenant) is None:
                raise NotFound(f"no tenant {tenant!r}")

    @app.get("/v1/tenants/{tenant}/configs", responses=_errors(401, 403, 404, 429, 504))
    def config_status(tenant: str, authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        """Every gateway's desired configuration against the one it reports running (drift)."""
        operator(authorization, tenant)
        return _reaching_broker(lambda: fleet.drift(service.data, tenant))

    @app.get("/v1/tenants/{tenant}/gateways/{gateway}/config", responses=_errors(401, 403, 404, 429))
    def config_get(
        tenant: str, gateway: str, version: int | None = None, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        """A stored configuration (the newest, or ``?version=N``), with its YAML."""
        operator(authorization, tenant)
        return fleet.show(service.data, tenant, gateway, version).as_json(with_yaml=True)

    @app.put("/v1/tenants/{tenant}/gateways/{gateway}/config", responses=_errors(401, 403, 404, 413, 422, 429, 504))
    def config_put(
        tenant: str, gateway: str, body: ConfigRequest, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        """Store the gateway's next configuration version; with ``push``, push it and include the answer."""
        operator(authorization, tenant)
        stored = fleet.store(service.data, tenant, gateway, body.yaml, source="yaml", note=body.note)
        doc = stored.as_json()
        if body.push:
            doc["answer"] = _reaching_broker(lambda: fleet.push(service.data, tenant, gateway, wait_s=body.wait))
        return doc

    @app.post("/v1/tenants/{tenant}/gateways/{gateway}/config/push", responses=_errors(401, 403, 404, 422, 429, 504))
    def config_push(
        tenant: str, gateway: str, body: PushRequest, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        """Push a stored version (default the newest) and return the gateway's answer."""
        operator(authorization, tenant)
        return _reaching_broker(
            lambda: fleet.push(service.data, tenant, gateway, version=body.version, wait_s=body.wait)
        )

    @app.get("/v1/tenants/{tenant}/plan", responses=_errors(401, 403, 404, 429))
    def plan_get(tenant: str, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """The tenant's plan limits (null: no limit) and what it uses now."""
        operator(authorization, tenant)
        plan, usage = plans.show(service.data, tenant)
        return {"tenant": tenant, "limits": plan.as_json(), "usage": usage}

    @app.put("/v1/tenants/{tenant}/plan", responses=_errors(401, 403, 404, 422, 429))
    def plan_put(tenant: str, body: PlanRequest, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """Set some limits (``"none"`` or null removes one); needs a token for every tenant, not the tenant's own."""
        token = operators.authorize(service.data, authorization, tenant)
        if token.tenant is not None:
            raise Forbidden(
                f"operator token {token.id} is for tenant {token.tenant} only; plans are set with a token "
                "for every tenant (provisioning operator-token create NAME)"
            )
        operator(authorization, tenant)
        changes = body.model_dump(exclude_unset=True)
        try:
            _, steps = plans.update(service.data, tenant, changes)
        except Refused:
            raise
        except ProvisioningError as exc:
            raise Invalid(str(exc)) from None
        plan, usage = plans.show(service.data, tenant)
        return {"tenant": tenant, "limits": plan.as_json(), "usage": usage, "applied": steps}

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        client = _client(request.scope)
        if exc.counts_as_failure:
            limiter.failed(client)
        log.warning(
            "request refused",
            extra=fields(
                path=request.url.path,
                status=exc.status,
                client=client,
                reason=str(exc),
                counted=", ".join(exc.subjects) or None,
            ),
        )
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyAttempts) else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        client = _client(request.scope)
        limiter.failed(client)
        detail = _one_line(exc)
        log.warning("request refused", extra=fields(path=request.url.path, status=422, client=client, reason=detail))
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Unreachable)
    async def unreachable(request: Request, exc: Unreachable) -> JSONResponse:
        log.warning("request not answered", extra=fields(path=request.url.path, err=str(exc)))
        return JSONResponse({"detail": str(exc)}, status_code=504)

    @app.exception_handler(ProvisioningError)
    async def broken(request: Request, exc: ProvisioningError) -> JSONResponse:
        log.error("request failed", extra=fields(path=request.url.path, err=str(exc)))
        return JSONResponse({"detail": f"provisioning service error: {exc}"}, status_code=500)

    app.add_middleware(Guard, limiter=limiter)
    return app


class ConfigRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    yaml: str = Field(description="the whole agent configuration, YAML (docs/config.md)")
    note: str | None = Field(default=None, max_length=500)
    push: bool = Field(default=False, description="push it at once and include the gateway's answer")
    wait: float | None = Field(default=None, gt=0, le=600, description="with push: seconds to wait for the outcome")


class PlanRequest(BaseModel):
    """Limits to change; a limit not given stays as it is."""

    model_config = ConfigDict(extra="forbid")
    gateways: StrictInt | str | None = Field(default=None, description="active gateways allowed, or 'none'")
    technicians: StrictInt | str | None = Field(
        default=None, description="technicians with a valid certificate, or 'none'"
    )
    points_per_s: StrictInt | str | None = Field(default=None, description="ingest rate the bridge allows, or 'none'")
    retention_days: StrictInt | str | None = Field(default=None, description="days of data kept, or 'none'")
    message_size: StrictInt | str | None = Field(
        default=None, description="largest MQTT packet in bytes or a size like '256KiB'; 'none': the default"
    )


class PushRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(default=None, ge=1, description="default: the newest stored version")
    wait: float | None = Field(
        default=None, gt=0, le=600, description="seconds to wait for the outcome (applied or rolled_back)"
    )


def _reaching_broker(call: Callable[[], T]) -> T:
    """The tenant's broker or gateway did not answer: 504 with the reason, not a service error."""
    try:
        return call()
    except Refused:
        raise
    except ProvisioningError as exc:
        raise Unreachable(str(exc)) from None


class Unreachable(ProvisioningError):
    """The tenant's broker or the gateway did not answer (504)."""


def _one_line(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return "request body is not valid JSON"
        loc = tuple(error.get("loc", ()))
        where = format_location(loc[1:] if loc[:1] == ("body",) else loc)
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request"


def _client(scope: Mapping[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class Guard:
    """ASGI middleware for ``/v1/``: 429 for a client with too many failures, 413 for an oversized body."""

    def __init__(self, app: Any, limiter: FailureLimiter, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limiter = limiter
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        client = _client(scope)
        wait = self.limiter.blocked_for(client)
        if wait:
            log.warning("request refused", extra=fields(path=scope["path"], status=429, client=client))
            await _answer(
                send,
                429,
                f"too many failed attempts from {client}; retry in {wait} s",
                [(b"retry-after", str(wait).encode())],
            )
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _answer(send, 413, f"request body is {int(length)} bytes; the limit is {self.max_body}")
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # a chunked body past the limit: give up on it
                return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited, send)


async def _answer(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = ["Guard", "create_app"]

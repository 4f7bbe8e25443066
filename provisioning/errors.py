"""Refusals of the provisioning service, each with the HTTP status the API answers.

All are ``ProvisioningError``s, so the command line prints them as one line
like any other error::

    ProvisioningError
    └── Refused              a request is refused (HTTP status in ``status``)
        ├── Unauthorized     401: unknown provisioning key or certificate
        ├── Forbidden        403: key expired, used up or revoked; certificate revoked or expired
        ├── NotFound         404: no such tenant, gateway configuration or version
        ├── Conflict         409: gateway name taken by another device
        ├── Invalid          422: bad CSR, name or request body
        └── TooManyAttempts  429: too many failed attempts from one client
"""

from __future__ import annotations

from factory_edge.errors import ProvisioningError


class Refused(ProvisioningError):
    """A request the service refuses; ``status`` is the HTTP status.

    ``subjects``: what else the failure counts against besides the client's
    address (``key <id>``, ``tenant <name>``), once the request named them.
    """

    status = 400
    subjects: tuple[str, ...] = ()
    counts_as_failure = True  # towards the 429 limits; a plan's refusal is no attack (plans.PlanLimit)


class Unauthorized(Refused):
    status = 401


class Forbidden(Refused):
    status = 403


class NotFound(Refused):
    status = 404


class Conflict(Refused):
    status = 409


class Invalid(Refused):
    status = 422


class TooManyAttempts(Refused):
    status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


__all__ = ["Conflict", "Forbidden", "Invalid", "NotFound", "Refused", "TooManyAttempts", "Unauthorized"]

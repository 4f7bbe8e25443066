"""Provisioning: tenants, their CAs, provisioning keys, device certificates and
the generated broker (Mosquitto) and proxy (HAProxy) configuration.

- ``pki``: certificate work as pure functions over ``cryptography`` objects;
  ``render``: settings into Mosquitto, ACL and HAProxy text.
- ``layout`` (where files live), ``registry`` (the SQLite registry and its
  migrations), ``keys`` (provisioning keys, stored hashed).
- ``tenants`` (create a tenant, render its files), ``service`` (what the API
  does: provision, renew), ``admin`` (keys, revocation, technicians, CRLs),
  ``brokers`` (reloading the brokers and proxy, ending a revoked session).
- ``api`` (FastAPI app), ``ratelimit``, ``server`` (``serve``), ``cli``.

Part of the ``[cloud]`` extra; a gateway's agent never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``provisioning`` command, or one line saying how to install the [cloud] extra it needs."""
    from factory_edge.extras import guarded_main

    return guarded_main("cloud", "provisioning", "provisioning.cli", argv)

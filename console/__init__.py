"""The fleet console: a web page (and its JSON API) where operators and tenants see and run their fleet.

- ``accounts``: accounts and roles, sessions, the audit log, alert acknowledgements (one SQLite file);
- ``tenantdata``: what the console reads from a tenant's store (SQLite or PostgreSQL), read-only;
- ``rollup``: per-minute rollups so long trends read thousands of rows, not millions;
- ``service``: tenants, data and provisioning actions (the provisioning CLI's own functions);
- ``security`` (sessions, CSRF, headers), ``api`` (the JSON API), ``pages`` (HTML shells),
  ``static/`` (the script, chart and style every page loads), ``server`` (``serve``), ``cli``.

A cloud-side package like ``provisioning`` and ``bridge``, whose code it
uses (it is the one package allowed to import both); part of the
``[cloud]`` extra, never of a gateway.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``console`` command, or one line saying how to install the [cloud] extra it needs."""
    from factory_edge.extras import guarded_main

    return guarded_main("cloud", "console", "console.cli", argv)

"""The cloud bridge: tenant brokers in, tenant storage and the alert engine out (``bridge run``, the ``[cloud]`` extra)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``bridge`` command, or one line saying how to install the [cloud] extra it needs."""
    from factory_edge.extras import guarded_main

    return guarded_main("cloud", "bridge", "bridge.cli", argv)

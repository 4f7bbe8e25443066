"""Broker and proxy fixtures: real Mosquitto and HAProxy on 127.0.0.1 free ports, stopped by PID.

- ``pki_acme``, ``pki_globex``: a tenant's CA, broker certificate, CRL and
  ``bridge`` client certificate (``TenantPki``); issue more with
  ``pki.client("gw-01")``.
- ``broker_acme``, ``broker_globex``: that tenant's running Mosquitto.
- ``make_broker(pki)``, ``make_proxy(*brokers)``: factories for any other
  combination; everything they start is stopped when the test ends.
- ``proxy``: HAProxy routing ``mqtt.acme.test`` to ``broker_acme``, and
  ``mqtt.globex.test`` to ``broker_globex`` when the test uses that fixture.
- ``hosts``: the name map for ``resolve_in_namespace``/``run_in_namespace``
  (every ``mqtt.*.test`` name used here, plus ``mqtt.nope.test``, resolve
  to 127.0.0.1).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.infra import Haproxy, Mosquitto, TenantPki

HOSTS = {"mqtt.acme.test": "127.0.0.1", "mqtt.globex.test": "127.0.0.1", "mqtt.nope.test": "127.0.0.1"}


def _require(*binaries: str, package: str) -> None:
    missing = [name for name in binaries if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run `apt-get install {package}`")


@pytest.fixture
def hosts() -> dict[str, str]:
    return dict(HOSTS)


@pytest.fixture
def pki_acme(tmp_path: Path) -> TenantPki:
    return TenantPki(tmp_path / "pki-acme", "acme")


@pytest.fixture
def pki_globex(tmp_path: Path) -> TenantPki:
    return TenantPki(tmp_path / "pki-globex", "globex")


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[[TenantPki], Mosquitto]]:
    """``make_broker(pki, port=None)`` starts a tenant's Mosquitto; stopped at teardown."""
    _require("mosquitto", "mosquitto_pub", "mosquitto_sub", package="mosquitto mosquitto-clients")
    started: list[Mosquitto] = []

    def make(pki: TenantPki, port: int | None = None) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker-{pki.tenant}-{len(started)}", pki, port)
        started.append(broker)
        return broker.start()

    yield make
    for broker in reversed(started):
        broker.stop()


@pytest.fixture
def broker_acme(make_broker: Callable[[TenantPki], Mosquitto], pki_acme: TenantPki) -> Mosquitto:
    return make_broker(pki_acme)


@pytest.fixture
def broker_globex(make_broker: Callable[[TenantPki], Mosquitto], pki_globex: TenantPki) -> Mosquitto:
    return make_broker(pki_globex)


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., Haproxy]]:
    """``make_proxy(*brokers, port=None)`` starts HAProxy routing each broker's SNI name to it."""
    _require("haproxy", package="haproxy")
    started: list[Haproxy] = []

    def make(*brokers: Mosquitto, port: int | None = None) -> Haproxy:
        proxy = Haproxy(tmp_path / f"proxy-{len(started)}", [b.route for b in brokers], port)
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in reversed(started):
        proxy.close()


@pytest.fixture
def proxy(request: pytest.FixtureRequest, make_proxy: Callable[..., Haproxy], broker_acme: Mosquitto) -> Haproxy:
    brokers = [broker_acme]
    if "broker_globex" in request.fixturenames:
        brokers.append(request.getfixturevalue("broker_globex"))
    return make_proxy(*brokers)

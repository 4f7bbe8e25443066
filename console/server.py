"""``console serve``: the console on uvicorn over HTTPS, and the task that keeps trend rollups current.

Without ``--tls-cert``/``--tls-key`` the console makes its own small CA
(``<state dir>/tls/ca.pem``) and a server certificate for ``--tls-name``
(the host's names by default), as ``provisioning serve`` does: browsers
must trust that CA (or the operator's own certificate, the better choice).
Session cookies are ``Secure``, so the console is only ever served over
HTTPS. Tasks: ``console`` (uvicorn) and ``rollup`` (every few seconds).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory_edge.errors import FactoryEdgeError, ProvisioningError
from factory_edge.logs import fields
from factory_edge.systemd import follow_server
from factory_edge.tasks import cancel_and_wait
from provisioning import pki
from provisioning.server import _listen, default_names

from .service import Console

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8444
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_names: tuple[str, ...] = ()
    live_interval_s: float = 1.0
    rollup_every_s: float = 5.0


def ensure_tls(state_dir: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """``(cert, key, ca)`` of the console's own TLS under ``<state dir>/tls``, made once, re-made when names change."""
    tls = state_dir / "tls"
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_file, ca_key_file, cert_file, key_file = tls / "ca.pem", tls / "ca.key", tls / "server.pem", tls / "server.key"
    if not ca_file.exists():
        ca_key, ca_cert = pki.create_ca("factory-edge console CA")
        pki.write_private_key(ca_key_file, ca_key)
        pki.write_pem(ca_file, ca_cert)
    names_file = tls / "names"
    if not cert_file.exists() or not names_file.exists() or names_file.read_text() != ",".join(names):
        signer, ca_cert = pki.load_private_key(ca_key_file), pki.load_cert(ca_file)
        key = pki.new_key()
        dns = [n for n in names if not n.replace(".", "").isdigit() and ":" not in n]
        cert = pki.issue_server_cert(
            signer, ca_cert, key.public_key(), dns[0] if dns else "localhost", days=397, alt_names=names
        )
        pki.write_private_key(key_file, key)
        pki.write_pem(cert_file, cert)
        names_file.write_text(",".join(names))
    return cert_file, key_file, ca_file


async def serve(console: Console, options: ServeOptions) -> None:
    import uvicorn

    from .api import create_app

    if (options.tls_cert is None) != (options.tls_key is None):
        raise ProvisioningError("--tls-cert and --tls-key go together")
    if options.tls_cert is not None and options.tls_key is not None:
        cert_file, key_file, ca_hint = options.tls_cert, options.tls_key, None
    else:
        cert_file, key_file, ca_hint = ensure_tls(
            console.settings.state_dir, list(options.tls_names) or default_names(options.host)
        )
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ProvisioningError(f"cannot use {cert_file} and {key_file} for TLS: {exc}") from exc
    listener = _listen(options.host, options.port)
    config = uvicorn.Config(
        create_app(console, live_interval_s=options.live_interval_s),
        host=options.host,
        port=options.port,
        ssl_certfile=str(cert_file),
        ssl_keyfile=str(key_file),
        log_config=None,
        proxy_headers=False,
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    log.info(
        "console starting",
        extra=fields(url=f"https://{options.host}:{options.port}/", ca_file=str(ca_hint or cert_file)),
    )
    async with asyncio.TaskGroup() as group:
        rollups = group.create_task(_rollups(console, options.rollup_every_s), name="rollup")
        web = group.create_task(_run(server, listener), name="console")
        notify = group.create_task(
            follow_server(server, f"console on https://{options.host}:{options.port}/"), name="systemd"
        )
        try:
            await web
        finally:
            await cancel_and_wait(notify)
            await cancel_and_wait(rollups)


async def _run(server: Any, listener: socket.socket) -> None:
    try:
        await server.serve(sockets=[listener])
    except SystemExit as exc:
        raise ProvisioningError(f"the console could not start (exit {exc.code}); see the log above") from None
    finally:
        listener.close()


async def _rollups(console: Console, every_s: float) -> None:
    while True:
        try:
            await asyncio.to_thread(console.refresh_rollups)
        except FactoryEdgeError as exc:
            log.error("trend rollup failed", extra=fields(err=str(exc), retry_in_s=every_s))
        await asyncio.sleep(every_s)


__all__ = ["ServeOptions", "ensure_tls", "serve"]

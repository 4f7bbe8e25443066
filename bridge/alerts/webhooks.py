"""Alert changes to HTTP endpoints: signed JSON POSTs, retried with backoff, never in ingestion's way.

Each change to send is first committed to the tenant's ``webhook_outbox``
in the same transaction as the alert itself; one task per endpoint
(``webhook[acme/ops]``) then delivers the outbox in order. A slow or dead
endpoint delays only its own queue. After ``max_attempts`` (or a 4xx
answer other than 408/429) the delivery is given up and logged; the
change stays in the ``alerts`` table.

Signature: ``X-Factory-Edge-Signature: sha256=<hex>``, the HMAC-SHA256 with
the webhook's ``secret`` of ``<X-Factory-Edge-Timestamp>.<body>``, so a
receiver can check both the body and its freshness.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import deque
from collections.abc import Callable

import httpx

from factory_edge import __version__
from factory_edge.backoff import Backoff
from factory_edge.logs import fields

from .model import OutboxItem
from .rules import WebhookConfig

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Factory-Edge-Signature"
TIMESTAMP_HEADER = "X-Factory-Edge-Timestamp"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` of ``<timestamp>.<body>``."""
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, max_age_s: float = 300.0) -> bool:
    """What a receiver does (documented in docs/bridge.md; used by the tests)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


class WebhookSender:
    """Delivers one tenant's outbox items for one endpoint, oldest first."""

    def __init__(
        self,
        *,
        tenant: str,
        name: str,
        config: WebhookConfig,
        client: httpx.AsyncClient,
        on_done: Callable[[int], None],
    ) -> None:
        self.tenant = tenant
        self.name = name
        self.config = config
        self.client = client
        self.on_done = on_done
        self.delivered = 0
        self.failed = 0
        self._queue: deque[OutboxItem] = deque()
        self._wake = asyncio.Event()

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def submit(self, item: OutboxItem) -> None:
        self._queue.append(item)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                item = self._queue[0]
                await self._deliver(item)
                self._queue.popleft()
                self.on_done(item.id)

    async def _deliver(self, item: OutboxItem) -> None:
        backoff = Backoff(initial_s=1.0, max_s=self.config.max_backoff)
        for attempt in range(1, self.config.max_attempts + 1):
            error = await self._post(item)
            if error is None:
                self.delivered += 1
                return
            final = error.startswith("refused") or attempt == self.config.max_attempts
            if final:
                self.failed += 1
                log.error(
                    "webhook delivery given up",
                    extra=fields(
                        tenant=self.tenant, webhook=self.name, url=self.config.url, attempts=attempt, err=error
                    ),
                )
                return
            delay = backoff.next_delay()
            log.warning(
                "webhook delivery failed",
                extra=fields(
                    tenant=self.tenant, webhook=self.name, attempt=attempt, err=error, retry_in_s=round(delay, 1)
                ),
            )
            await asyncio.sleep(delay)

    async def _post(self, item: OutboxItem) -> str | None:
        """None when delivered, else why not (``refused: …`` means do not retry)."""
        timestamp = int(time.time())
        headers = {
            **self.config.headers,
            "Content-Type": "application/json",
            "User-Agent": f"factory-edge-bridge/{__version__}",
            TIMESTAMP_HEADER: str(timestamp),
            "X-Factory-Edge-Tenant": self.tenant,
            "X-Factory-Edge-Delivery": str(item.id),
        }
        if self.config.secret:
            headers[SIGNATURE_HEADER] = sign(self.config.secret, timestamp, item.payload)
        try:
            response = await self.client.post(
                self.config.url, content=item.payload, headers=headers, timeout=self.config.timeout
            )
        except httpx.TimeoutException:
            return f"no answer within {self.config.timeout:g}s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.is_success:
            return None
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            return f"refused: HTTP {response.status_code}"
        return f"HTTP {response.status_code}"

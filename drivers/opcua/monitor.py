"""Subscribe mode: one subscription, one data-change monitored item per tag.

The server samples each tag at the device's ``poll`` interval, applies the
tag's deadband, and publishes what changed once per publishing interval.
Each publish response becomes one batch of points in an inbox the driver
drains; a full inbox makes asyncua's publish loop wait, which holds back
further publish requests so the server, not our memory, queues the
backlog (the newest ``QUEUE_SIZE`` samples per tag).

Connection loss reaches the inbox too: asyncua's watchdog reports it, the
server may send a bad status change (subscription timed out), and a
subscription silent for two keep-alive periods counts as lost.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from asyncua import ua

from factory_edge.errors import DriverError

from ..configtypes import Deadband, OpcuaDevice
from ..points import Point, now_ms
from .connection import Session, converted
from .values import point_from_datavalue

INBOX_BATCHES = 64
QUEUE_SIZE = 10
"""Samples a server keeps per tag between two publishes, so a late publish loses no change (oldest go first)."""
KEEPALIVE_S = 5.0
"""Ask for a keep-alive after this long without data changes, to tell a quiet server from a dead one."""


@dataclass(frozen=True, slots=True)
class _Lost:
    reason: str


def deadband_filter(deadband: Deadband | None) -> ua.DataChangeFilter | None:
    """The data-change filter for a tag's deadband: absolute units, or percent of the node's EURange."""
    if deadband is None:
        return None
    flt = ua.DataChangeFilter()
    flt.Trigger = ua.DataChangeTrigger.StatusValue
    flt.DeadbandType = ua.DeadbandType.Percent if deadband.percent else ua.DeadbandType.Absolute
    flt.DeadbandValue = deadband.value
    return flt


class Monitor:
    """The subscription of one session; its notifications come out of ``next_batch()`` as points."""

    def __init__(self, device: OpcuaDevice, session: Session) -> None:
        self._device = device
        self._session = session
        self._inbox: asyncio.Queue[list[Point] | _Lost] = asyncio.Queue(maxsize=INBOX_BATCHES)
        self._handles: dict[int, str] = {}
        self.silence_limit_s = 2 * KEEPALIVE_S + device.timeout

    async def start(self) -> list[Point]:
        """Create the subscription and its monitored items; bad points for the tags that cannot be monitored."""
        client = self._session.client
        client.connection_lost_callback = self._connection_lost
        interval_ms = self._device.poll * 1000
        keepalive = max(1, math.ceil(KEEPALIVE_S * 1000 / interval_ms))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval_ms
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = keepalive * 6  # the spec asks for at least 3 keep-alive periods
        params.MaxNotificationsPerPublish = 0  # no limit: a publish carries every change of the interval
        params.PublishingEnabled = True
        params.Priority = 0
        with converted():
            created = await client.uaclient.create_subscription(params, self._on_publish)
        keepalive_s = created.RevisedPublishingInterval * created.RevisedMaxKeepAliveCount / 1000
        self.silence_limit_s = 2 * max(keepalive_s, self._device.poll) + self._device.timeout

        requests: list[ua.MonitoredItemCreateRequest] = []
        names: list[str] = []
        for handle, tag in enumerate(self._device.tags, start=1):
            if tag.name not in self._session.nodes:
                continue
            self._handles[handle] = tag.name
            names.append(tag.name)
            requests.append(self._item_request(handle, self._session.nodes[tag.name], tag.deadband, interval_ms))
        results: list[ua.MonitoredItemCreateResult] = []
        if requests:
            items = ua.CreateMonitoredItemsParameters()
            items.SubscriptionId = created.SubscriptionId
            items.TimestampsToReturn = ua.TimestampsToReturn.Both
            items.ItemsToCreate = requests
            with converted():
                results = await client.uaclient.create_monitored_items(items)
        now = now_ms()
        bad = [Point.bad(self._device.name, tag, reason, now) for tag, reason in self._session.unresolved.items()]
        for name, result in zip(names, results, strict=True):
            if not result.StatusCode.is_good():
                bad.append(Point.bad(self._device.name, name, result.StatusCode.name, now))
        return bad

    async def next_batch(self) -> list[Point]:
        """The next notifications, merged with any already waiting; ``DriverError`` once the connection is lost."""
        try:
            async with asyncio.timeout(self.silence_limit_s):
                item = await self._inbox.get()
        except TimeoutError:
            raise DriverError("no keep-alive from server") from None
        if isinstance(item, _Lost):
            raise DriverError(item.reason)
        batch = list(item)
        while not self._inbox.empty():
            more = self._inbox.get_nowait()
            if isinstance(more, _Lost):
                # Deliver what arrived before the loss first; report the loss next time.
                self._put_now(more)
                break
            batch.extend(more)
        return batch

    def interrupt(self, reason: str) -> None:
        """Make ``next_batch()`` raise ``DriverError(reason)`` at once (the driver is closing)."""
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._put_now(_Lost(reason))

    def _put_now(self, item: _Lost) -> None:
        try:
            self._inbox.put_nowait(item)
        except asyncio.QueueFull:
            self._inbox.get_nowait()
            self._inbox.put_nowait(item)

    @staticmethod
    def _item_request(
        handle: int, node: ua.NodeId, deadband: Deadband | None, interval_ms: float
    ) -> ua.MonitoredItemCreateRequest:
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId()
        request.ItemToMonitor.NodeId = node
        request.ItemToMonitor.AttributeId = ua.AttributeIds.Value
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = ua.MonitoringParameters()
        request.RequestedParameters.ClientHandle = handle
        request.RequestedParameters.SamplingInterval = interval_ms
        request.RequestedParameters.QueueSize = QUEUE_SIZE
        request.RequestedParameters.DiscardOldest = True
        flt = deadband_filter(deadband)
        if flt is not None:
            request.RequestedParameters.Filter = flt
        return request

    async def _on_publish(self, result: ua.PublishResult) -> None:
        """Called by asyncua's publish loop for every publish response, keep-alives included."""
        points: list[Point] = []
        lost: str | None = None
        for data in result.NotificationMessage.NotificationData or ():
            if isinstance(data, ua.DataChangeNotification):
                now = now_ms()
                for item in data.MonitoredItems:
                    tag = self._handles.get(item.ClientHandle)
                    if tag is not None:
                        points.append(point_from_datavalue(self._device.name, tag, item.Value, default_ms=now))
            elif isinstance(data, ua.StatusChangeNotification) and not data.Status.is_good():
                lost = data.Status.name
        await self._inbox.put(points)
        if lost is not None:
            await self._inbox.put(_Lost(lost))

    async def _connection_lost(self, exc: Exception) -> None:
        await self._inbox.put(_Lost("connection lost"))

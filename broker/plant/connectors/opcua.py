"""OPC UA connector: monitored items in one subscription, or polled Read, read-only.

Read-only by construction: besides opening the session (`broker.plant.connectors.opcua_session`), the
only services this module sends are CreateSubscription, CreateMonitoredItems, Publish
(asyncua's publish loop) and Read. It never sends Write, Call, AddNodes, DeleteNodes or
HistoryUpdate; a test counts the services an asyncua server receives.

There is no client-side notification queue to overflow: the publish loop awaits each
batch's `emit`, so a slow spool holds back the next Publish request and the server's own
monitored-item queues (`queue_size`, oldest discarded) are the only buffers. What they
discard is flagged by the server (the Overflow bit) and counted in `overruns`.

The subscription sends a message every publishing interval (a keep-alive when nothing
changed), and each message re-emits the items it did not carry with their last value and
source time and a new read time: a live subscription says they are still current, so an
unchanging value is not served stale and a stuck one can flatline, as in polling.

When the session drops, every signal of the device is emitted `bad` at once; the connector
reconnects with backoff and creates the subscription again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaError

from broker.errors import ConfigError, DeviceError, TrustError
from broker.plant.connectors.base import Backoff, Emit, RawSample, ScanGrid, raise_if_cancelled
from broker.plant.connectors.opcua_session import SessionSettings, open_session
from broker.plant.decode import RawValue
from broker.policy import OpcUaDevice, OpcUaSource, Signal
from broker.records import Quality

ITEMS_PER_CALL = 1000  # monitored items per CreateMonitoredItems, nodes per Read
NOTIFICATIONS_PER_PUBLISH = 10_000  # bounds one batch; the server keeps the rest queued
LIFETIME_COUNT = 10_000  # publishing intervals without a Publish before the server gives up
_QUALITY: tuple[Quality, ...] = ("good", "uncertain", "bad", "bad")  # by the 2 severity bits
_OVERFLOW = 0x0480  # InfoType DataValue + Overflow: the server's queue discarded values
T = TypeVar("T")
_DEADBAND = {"absolute": ua.DeadbandType.Absolute, "percent": ua.DeadbandType.Percent}


def quality_of(status: ua.StatusCode | None) -> Quality:
    return _QUALITY[status.value >> 30] if status is not None else "good"


def _opcua(signal: Signal) -> OpcUaSource:
    assert isinstance(signal.source, OpcUaSource)  # parse checked it against the device
    return signal.source


class OpcUaConnector:
    def __init__(
        self, device: OpcUaDevice, signals: Sequence[Signal], settings: SessionSettings
    ) -> None:
        self._device = device
        self._settings = settings
        self._signals = [s.path for s in signals]  # a monitored item's client handle: its index
        self._sources = [_opcua(s) for s in signals]
        try:
            self._nodes = [ua.NodeId.from_string(source.node) for source in self._sources]
        except (ValueError, UaError) as e:
            raise ConfigError(f"OPC UA device {device.name!r}: a node id is not usable: {e}") from e
        self.scans = 0  # notification batches (subscribe) or whole Reads (poll)
        self.overruns = 0  # poll slots skipped, or values the server's queues discarded
        self.errors = 0  # failed sessions and reads
        self.last_scan_s = 0.0  # handling of the last batch, or the last Read
        self._refused: set[int] = set()  # items the server refused or values we cannot use
        self._log = structlog.get_logger("opcua").bind(device=device.name)
        self._grid = ScanGrid(device.poll_interval_s, self._log)

    async def run(self, emit: Emit) -> None:
        device = self._device
        backoff = Backoff(initial_s=min(1.0, device.poll_interval_s))
        while True:
            try:
                async with open_session(self._settings) as client:
                    self._log.info(
                        "device_session_up",
                        endpoint=device.endpoint,
                        security=f"{device.security_policy}/{device.security_mode}",
                        user_identity=device.user_identity,
                    )
                    if device.read == "subscribe":
                        await self._subscribe(client, emit, backoff)
                    else:
                        await self._poll(client, emit, backoff)
            except (DeviceError, TrustError) as e:
                self.errors += 1
                self._log.warning("device_session_down", endpoint=device.endpoint, error=str(e))
                await emit(self._all_bad())
            await asyncio.sleep(backoff.delay())

    async def _subscribe(self, client: Client, emit: Emit, backoff: Backoff) -> None:
        """Creates the subscription and its items, then waits until the session is lost."""
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def give_up(reason: str) -> None:
            if not lost.done():
                lost.set_result(reason)

        async def connection_lost(e: Exception) -> None:
            give_up(str(e) or type(e).__name__)

        current: dict[int, RawSample] = {}  # each item's last notified value

        async def published(result: ua.PublishResult) -> None:
            started = time.monotonic()
            samples = self._notifications(result.NotificationMessage, give_up, current)
            if not result.MoreNotifications:  # else newer values may be on their way
                samples += _still_current(current, samples, datetime.now(UTC))
            if samples:
                await emit(samples)
                self.scans += 1
                self.last_scan_s = time.monotonic() - started

        client.connection_lost_callback = connection_lost
        interval_ms = self._device.poll_interval_s * 1000
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval_ms,
            RequestedLifetimeCount=LIFETIME_COUNT,
            # A message every publishing interval, a keep-alive when nothing changed: it
            # says the values the items last notified are still current.
            RequestedMaxKeepAliveCount=1,
            MaxNotificationsPerPublish=NOTIFICATIONS_PER_PUBLISH,
            PublishingEnabled=True,
        )
        subscription = await self._call(client.uaclient.create_subscription(params, published))
        refused: list[RawSample] = []
        for first in range(0, len(self._nodes), ITEMS_PER_CALL):
            handles = range(first, min(first + ITEMS_PER_CALL, len(self._nodes)))
            request = ua.CreateMonitoredItemsParameters(
                SubscriptionId=subscription.SubscriptionId,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[self._item(handle, interval_ms) for handle in handles],
            )
            results = await self._call(client.uaclient.create_monitored_items(request))
            for handle, result in zip(handles, results, strict=True):
                if not result.StatusCode.is_good():
                    self._refuse(handle, result.StatusCode, "item_refused")
                    path = self._signals[handle]
                    refused.append(RawSample(path, None, datetime.now(UTC), "bad"))
        if refused:
            await emit(refused)
        backoff.reset()  # the device took the subscription: it is back
        raise DeviceError(f"session lost: {await lost}")

    def _item(self, handle: int, interval_ms: float) -> ua.MonitoredItemCreateRequest:
        source = self._sources[handle]
        data_filter = None
        if source.deadband is not None:
            data_filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=_DEADBAND[source.deadband.kind],
                DeadbandValue=source.deadband.value,
            )
        sampling = source.sampling_interval_ms
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=self._nodes[handle], AttributeId=AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=interval_ms if sampling is None else sampling,
                Filter=data_filter,
                QueueSize=source.queue_size,
                DiscardOldest=True,
            ),
        )

    def _notifications(
        self,
        message: ua.NotificationMessage,
        give_up: Callable[[str], None],
        current: dict[int, RawSample],
    ) -> list[RawSample]:
        samples: list[RawSample] = []
        received = datetime.now(UTC)
        for data in message.NotificationData or ():
            if isinstance(data, ua.DataChangeNotification):
                for item in data.MonitoredItems:
                    if 0 <= item.ClientHandle < len(self._signals):
                        sample = self._sample(item.ClientHandle, item.Value, received)
                        current[item.ClientHandle] = sample
                        samples.append(sample)
            elif isinstance(data, ua.StatusChangeNotification) and not data.Status.is_good():
                give_up(f"subscription ended: {data.Status.name}")  # BadShutdown, BadTimeout
        return samples

    async def _poll(self, client: Client, emit: Emit, backoff: Backoff) -> None:
        """Reads every node each poll interval; a Read that overruns skips the missed slots."""
        loop = asyncio.get_running_loop()
        next_read = loop.time()
        while True:
            started = time.monotonic()
            samples: list[RawSample] = []
            for first in range(0, len(self._nodes), ITEMS_PER_CALL):
                handles = range(first, min(first + ITEMS_PER_CALL, len(self._nodes)))
                request = ua.ReadParameters(
                    TimestampsToReturn=ua.TimestampsToReturn.Both,
                    NodesToRead=[
                        ua.ReadValueId(NodeId=self._nodes[h], AttributeId=AttributeIds.Value)
                        for h in handles
                    ],
                )
                values = await self._call(client.uaclient.read(request))
                received = datetime.now(UTC)
                samples += [
                    self._sample(h, v, received) for h, v in zip(handles, values, strict=True)
                ]
            self.scans += 1
            self.last_scan_s = time.monotonic() - started
            await emit(samples)
            backoff.reset()
            next_read, missed = self._grid.next_slot(next_read, loop.time(), self.last_scan_s)
            self.overruns += missed
            await asyncio.sleep(next_read - loop.time())

    def _sample(self, handle: int, value: ua.DataValue, received: datetime) -> RawSample:
        status = value.StatusCode
        if status is not None and status.value & _OVERFLOW == _OVERFLOW:
            self.overruns += 1
        when = value.SourceTimestamp or value.ServerTimestamp or received
        quality = quality_of(status)
        raw = _raw(value.Value)
        if raw is None and quality != "bad":
            self._refuse(handle, status, "value_unsupported")
            return RawSample(self._signals[handle], None, when, "bad", received)
        self._refused.discard(handle)
        return RawSample(self._signals[handle], raw, when, quality, received)

    def _refuse(self, handle: int, status: ua.StatusCode | None, reason: str) -> None:
        """A signal the device cannot give: logged (and audited) once per state change."""
        if handle not in self._refused:
            self._refused.add(handle)
            self._log.warning(
                "device_read_refused",
                signal=self._signals[handle],
                node=self._sources[handle].node,
                reason=reason,
                status=status.name if status is not None else None,
            )

    async def _call(self, request: Awaitable[T]) -> T:
        try:
            result = await request
        except (OSError, TimeoutError, UaError) as e:
            raise DeviceError(f"{type(e).__name__}: {e}") from e
        raise_if_cancelled()
        return result

    def _all_bad(self) -> list[RawSample]:
        now = datetime.now(UTC)
        return [RawSample(path, None, now, "bad") for path in self._signals]


def _still_current(
    current: dict[int, RawSample], notified: list[RawSample], received: datetime
) -> list[RawSample]:
    """The items this message did not carry, read again as of `received`: a live
    subscription says their values have not changed. Without it, a value that does not
    change (a setpoint) would be served stale, and a stuck one could not flatline."""
    fresh = {sample.signal for sample in notified}
    return [
        msgspec.structs.replace(sample, read_time=received)
        for sample in current.values()
        if sample.signal not in fresh
    ]


def _raw(variant: ua.Variant | None) -> RawValue | None:
    """A scalar number, bool or text as the model can take it; None for anything else."""
    value = variant.Value if variant is not None else None
    return value if isinstance(value, bool | int | float | str) else None

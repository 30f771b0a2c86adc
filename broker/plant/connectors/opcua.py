"""OPC UA connector: monitored items in one subscription, or polled Read, read-only.

Read-only by construction: besides opening the session (`broker.plant.connectors.opcua_session`), the
only services this connector sends are CreateSubscription and ModifySubscription (through
`opcua_keepalive`), CreateMonitoredItems, Publish (asyncua's publish loop) and Read. It never sends Write, Call, AddNodes, DeleteNodes or
HistoryUpdate; a test counts the services an asyncua server receives.

There is no client-side notification queue to overflow: the publish loop awaits each
batch's `emit`, so a slow spool holds back the next Publish request and the server's own
monitored-item queues (`queue_size`, oldest discarded) are the only buffers. What they
discard is flagged by the server (the Overflow bit) and counted in `overruns`.

The subscription sends a message every publishing interval (a keep-alive when nothing
changed), and each message re-emits the items it did not carry with their last value and
source time and a new read time: a live subscription says they are still current, so an
unchanging value is not served stale and a stuck one can flatline, as in polling.
The enterprise half serves a value `stale` three poll intervals after it was last confirmed,
so a message must come every poll interval: a server that revises the keep-alive count
upward (node-opcua makes 1 into 2) gets its subscription changed in place to a publishing
interval that brings its keep-alive period back to the poll interval (`opcua_keepalive`).

When the session drops, or the server stops answering Publish requests, every signal of the
device is emitted `bad` at once; the connector reconnects with backoff and creates the
subscription again. Up and down are logged (and audited) once per state change, never per
retry.

A value is taken only when it is what the server's own model says the node holds: each
session first reads every node's DataType, and a value of another type (a string where a
Double is modelled, a ByteString, a structure) is `bad`, never data. So is a value with a
Bad status, an array, or a type the model cannot take. Each is logged (and audited) as
`device_read_refused` once per state change of its signal, and `device_read_recovered` when
it is good again (the type model: `opcua_types`). Whatever asyncua raises is mapped to a `DeviceError` (`opcua_session.call`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaError

from broker.backoff import Backoff
from broker.errors import ConfigError, DeviceError, TrustError
from broker.plant.connectors.base import Emit, RawSample, ScanGrid
from broker.plant.connectors.opcua_keepalive import KeepAlive
from broker.plant.connectors.opcua_session import (
    CertificateRefused,
    SessionSettings,
    call,
    failure,
    open_session,
)
from broker.plant.connectors.opcua_types import described, judged, quality_of, variant_types
from broker.policy import OpcUaDevice, OpcUaSource, Signal

ITEMS_PER_CALL = 1000  # monitored items per CreateMonitoredItems, nodes per Read
_OVERFLOW = 0x0480  # InfoType DataValue + Overflow: the server's queue discarded values
T = TypeVar("T")
_DEADBAND = {"absolute": ua.DeadbandType.Absolute, "percent": ua.DeadbandType.Percent}


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
        self._refused: dict[int, str] = {}  # item → why its values are not taken now
        # Each node's modelled variant types (None: any), read at the start of each session.
        self._types: list[frozenset[ua.VariantType] | None] = [None] * len(self._nodes)
        self._up: bool | None = None  # None until the first session: logged when it changes
        self._down_because: str | None = None  # the kind of the current outage
        self._log = structlog.get_logger("opcua").bind(device=device.name)
        self._keep_alive = KeepAlive(device, self._log)
        self._grid = ScanGrid(device.poll_interval_s, self._log)

    async def run(self, emit: Emit) -> None:
        device = self._device
        backoff = Backoff(initial_s=min(1.0, device.poll_interval_s))
        while True:
            try:
                async with open_session(self._settings) as client:
                    await self._learn_types(client)
                    if device.read == "subscribe":
                        await self._subscribe(client, emit, backoff)
                    else:
                        await self._poll(client, emit, backoff)
            except (DeviceError, TrustError) as e:
                self.errors += 1
                retry_in_s = backoff.delay()
                self._went_down(e, retry_in_s)
                await emit(self._all_bad())
                await asyncio.sleep(retry_in_s)

    def _came_up(self, backoff: Backoff) -> None:
        """Values arrived: the device is back (logged once, not per Publish or Read)."""
        backoff.reset()
        if self._up is not True:
            self._up, self._down_because = True, None
            device = self._device
            self._log.info(
                "device_session_up",
                endpoint=device.endpoint,
                security=f"{device.security_policy}/{device.security_mode}",
                user_identity=device.user_identity,
            )

    def _went_down(self, e: DeviceError | TrustError, retry_in_s: float) -> None:
        """Logged (and audited) when the device goes down, or fails in another way while
        down (a server back up that now refuses the broker's certificate); a retry that
        fails as the last one did is only in the process log."""
        because = _outage_kind(e)
        fields = {"error": str(e), "error_code": because, "retry_in_s": round(retry_in_s, 3)}
        if self._up is False and because == self._down_because:
            self._log.info("device_reconnect_failed", **fields)
        else:
            self._log.warning("device_session_down", endpoint=self._device.endpoint, **fields)
        self._up, self._down_because = False, because

    async def _learn_types(self, client: Client) -> None:
        """Each node's DataType, as the server models it now (one Read per 1,000 nodes)."""
        types: list[frozenset[ua.VariantType] | None] = []
        for handles in self._batches():
            answers = await self._read(client, handles, AttributeIds.DataType)
            types += [variant_types(answer) for answer in answers]
        self._types = types

    async def _subscribe(self, client: Client, emit: Emit, backoff: Backoff) -> None:
        """Creates the subscription and its items, then waits until the session is lost."""
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def give_up(reason: str) -> None:
            if not lost.done():
                lost.set_result(reason)

        async def connection_lost(e: Exception) -> None:
            give_up(str(e) or type(e).__name__)

        current: dict[int, RawSample] = {}  # each item's last notified value
        heard = time.monotonic()  # when the server last answered a Publish request
        handling = False  # a response is being handled (emit may wait for the spool)
        # A Publish before the items exist says nothing about them: counting it as the device
        # being up would reset the backoff of a session that fails while creating them. One
        # notifying an item proves the item exists (it may overtake CreateMonitoredItems').
        items_made = False

        async def published(result: ua.PublishResult) -> None:
            nonlocal heard, handling
            started = heard = time.monotonic()
            handling = True
            try:
                samples = self._notifications(result.NotificationMessage, give_up, current)
                if not result.MoreNotifications:  # else newer values may be on their way
                    samples += _still_current(current, samples, datetime.now(UTC))
                if items_made or current:
                    self._came_up(backoff)
                if samples:
                    await emit(samples)
                    self.scans += 1
                    self.last_scan_s = time.monotonic() - started
            except (
                Exception
            ) as e:  # asyncua would log and drop it, leaving a session reading nothing
                give_up(f"a Publish response could not be handled: {failure(e)}")
            finally:
                heard, handling = time.monotonic(), False

        client.connection_lost_callback = connection_lost
        interval_ms = self._device.poll_interval_s * 1000
        subscription_id, silent_s = await self._keep_alive.subscribe(client, published)
        refused: list[RawSample] = []
        for handles in self._batches():
            request = ua.CreateMonitoredItemsParameters(
                SubscriptionId=subscription_id,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[self._item(handle, interval_ms) for handle in handles],
            )
            results = await call(client.uaclient.create_monitored_items(request))
            for handle, result in zip(handles, _all_of(results, len(handles)), strict=True):
                if not result.StatusCode.is_good():
                    self._refuse(handle, result.StatusCode, "item_refused")
                    path = self._signals[handle]
                    refused.append(RawSample(path, None, datetime.now(UTC), "bad"))
        items_made = True
        if refused:
            await emit(refused)
        heard = time.monotonic()
        while not lost.done():
            await asyncio.wait([lost], timeout=silent_s / 4)
            if not handling and time.monotonic() - heard > silent_s:
                give_up(f"no Publish response for {silent_s:g} s")
        raise DeviceError(f"session lost: {lost.result()}")

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
            for handles in self._batches():
                values = await self._read(client, handles, AttributeIds.Value)
                received = datetime.now(UTC)
                samples += [
                    self._sample(h, v, received) for h, v in zip(handles, values, strict=True)
                ]
            self.scans += 1
            self.last_scan_s = time.monotonic() - started
            self._came_up(backoff)
            await emit(samples)
            next_read, missed = self._grid.next_slot(next_read, loop.time(), self.last_scan_s)
            self.overruns += missed
            await asyncio.sleep(next_read - loop.time())

    def _batches(self) -> Iterator[range]:
        """The items' handles, ITEMS_PER_CALL at a time: one service call each."""
        for first in range(0, len(self._nodes), ITEMS_PER_CALL):
            yield range(first, min(first + ITEMS_PER_CALL, len(self._nodes)))

    async def _read(
        self, client: Client, handles: range, attribute: AttributeIds
    ) -> list[ua.DataValue]:
        """One Read of `attribute` of these items' nodes, an answer for each (with both
        timestamps: a DataType has none, a value may have either)."""
        request = ua.ReadParameters(
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[
                ua.ReadValueId(NodeId=self._nodes[h], AttributeId=attribute) for h in handles
            ],
        )
        return _all_of(await call(client.uaclient.read(request)), len(handles))

    def _sample(self, handle: int, value: ua.DataValue, received: datetime) -> RawSample:
        status = value.StatusCode
        if status is not None and status.value & _OVERFLOW == _OVERFLOW:
            self.overruns += 1
        when = value.SourceTimestamp or value.ServerTimestamp or received
        raw, refusal = judged(value, self._types[handle])
        if refusal is not None:
            self._refuse(handle, status, refusal, value.Value)
            return RawSample(self._signals[handle], None, when, "bad", received)
        if handle in self._refused:
            del self._refused[handle]
            self._log.info(
                "device_read_recovered",
                signal=self._signals[handle],
                node=self._sources[handle].node,
            )
        return RawSample(self._signals[handle], raw, when, quality_of(status), received)

    def _refuse(
        self,
        handle: int,
        status: ua.StatusCode | None,
        reason: str,
        variant: ua.Variant | None = None,
    ) -> None:
        """A signal the device cannot give: logged (and audited) once per state change."""
        if self._refused.get(handle) != reason:
            self._refused[handle] = reason
            self._log.warning(
                "device_read_refused",
                signal=self._signals[handle],
                node=self._sources[handle].node,
                reason=reason,
                status=status.name if status is not None else None,
                variant=described(variant),
                modelled=sorted(t.name for t in self._types[handle] or ()),
            )

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


def _all_of(results: list[T], asked: int) -> list[T]:
    """The results of a batch, one per item asked for; a server answering another number
    could pair a value with the wrong signal."""
    if len(results) != asked:
        raise DeviceError(f"the server answered {len(results)} results to {asked} items")
    return results


def _outage_kind(e: DeviceError | TrustError) -> str:
    """A low-cardinality code for an outage: a new one while down is audited again."""
    if isinstance(e, CertificateRefused):
        return "broker_certificate_refused"
    if isinstance(e, TrustError):
        return "server_certificate_refused"
    return "no_session"

"""How often an OPC UA subscription confirms its values, and keeping that within the policy.

The enterprise half serves a value `stale` three poll intervals after the plant last
confirmed it (ADR 0004); a subscription confirms unchanged values with each message, and
sends one at least every keep-alive period: its revised publishing interval times its
revised keep-alive count. This module creates the subscription, changes it in place
(ModifySubscription, never a second subscription: many embedded servers allow one per
session) when the server's revised count makes that period longer than the poll interval,
and derives how long the session may stay silent. It sends CreateSubscription and
ModifySubscription only; it never creates items or reads values.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import structlog
from asyncua import ua
from asyncua.client.client import Client

from broker.errors import DeviceError
from broker.plant.connectors.opcua_session import call
from broker.policy import OpcUaDevice
from broker.policy.device_schema import STALE_AFTER_INTERVALS

MIN_PUBLISHING_MS = 50.0  # the shortest interval asked for to offset a revised keep-alive count
MAX_SPEEDUP = 4  # at most this many messages per poll interval (ADR 0008: the device's budget)
SLACK = 1.001  # a revised interval a float rounding longer is the interval asked for
LIFETIME_COUNT = 10_000  # publishing intervals without a Publish before the server gives up
NOTIFICATIONS_PER_PUBLISH = 10_000  # bounds one batch; the server keeps the rest queued
SILENT_PUBLISHES = 3  # keep-alive periods without a Publish response: then the session is dropped
# A server's own longer keep-alive is waited for up to this long. Dropping the session sooner
# would open a new one against the server every few seconds; its values read `stale` anyway,
# and a server that is hung is still dropped within a minute.
MAX_SILENCE_S = 60.0
Revised = ua.CreateSubscriptionResult | ua.ModifySubscriptionResult
Published = Callable[[ua.PublishResult], Awaitable[None]]


def keep_alive_s(revised: Revised) -> float:
    """How often the server sends a message when nothing changed, as it revised the
    subscription: its publishing interval times its keep-alive count; infinite when the
    interval is not a usable duration (NaN, infinite, zero or negative)."""
    interval_ms = float(revised.RevisedPublishingInterval)
    if not math.isfinite(interval_ms) or interval_ms <= 0:
        return math.inf
    return interval_ms / 1000 * max(1, int(revised.RevisedMaxKeepAliveCount))


def publishing_interval(poll_s: float, revised: Revised) -> float | None:
    """The publishing interval (ms) to change the subscription to, so that the server's
    keep-alive period, with the count it revised, is the poll interval again; None when it
    already is, when the interval is unusable or longer than the one asked for (a shorter
    request would be revised the same way), or when it would take more than MAX_SPEEDUP
    messages per poll interval or fall below MIN_PUBLISHING_MS (every data-change message
    re-emits every item: a high count must not multiply the samples the policy budgets)."""
    count = max(1, int(revised.RevisedMaxKeepAliveCount))
    period_s = keep_alive_s(revised)
    if not math.isfinite(period_s) or period_s <= poll_s * SLACK:
        return None
    if float(revised.RevisedPublishingInterval) > poll_s * 1000 * SLACK:
        return None
    shorter_ms = poll_s * 1000 / count
    return shorter_ms if count <= MAX_SPEEDUP and shorter_ms >= MIN_PUBLISHING_MS else None


class KeepAlive:
    """One connector's subscriptions: a message every poll interval where the server allows
    it, and one `subscription_revised` warning per connector where it does not."""

    def __init__(self, device: OpcUaDevice, log: structlog.typing.FilteringBoundLogger) -> None:
        self._device = device
        self._log = log
        self._revision_logged = False

    async def subscribe(self, client: Client, published: Published) -> tuple[int, float]:
        """Creates the subscription, changed in place when the server revised the keep-alive
        count upward; its id and the silence limit (`silence_limit`) of what the server kept.
        A server that refuses or ignores the change keeps the first parameters: unchanged
        values are then confirmed less often, which `subscription_revised` says."""
        poll_ms = self._device.poll_interval_s * 1000
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=poll_ms,
            RequestedLifetimeCount=LIFETIME_COUNT,
            # A message every publishing interval, a keep-alive when nothing changed: it
            # says the values the items last notified are still current.
            RequestedMaxKeepAliveCount=1,
            MaxNotificationsPerPublish=NOTIFICATIONS_PER_PUBLISH,
            PublishingEnabled=True,
        )
        created = await call(client.uaclient.create_subscription(params, published))
        kept: Revised = created
        refused: str | None = None
        shorter_ms = publishing_interval(self._device.poll_interval_s, created)
        if shorter_ms is not None:
            change = ua.ModifySubscriptionParameters(
                SubscriptionId=created.SubscriptionId,
                RequestedPublishingInterval=shorter_ms,
                RequestedLifetimeCount=LIFETIME_COUNT,
                RequestedMaxKeepAliveCount=created.RevisedMaxKeepAliveCount,
                MaxNotificationsPerPublish=NOTIFICATIONS_PER_PUBLISH,
            )
            try:
                kept = await call(client.uaclient.update_subscription(change))
            except DeviceError as e:  # a service fault: the first subscription still runs
                refused = str(e)
            else:
                self._log.info(
                    "subscription_modified",
                    max_keep_alive_count=kept.RevisedMaxKeepAliveCount,
                    publishing_interval_ms=kept.RevisedPublishingInterval,
                    keep_alive_s=round(keep_alive_s(kept), 3),
                )
        return created.SubscriptionId, self.silence_limit(kept, refused)

    def silence_limit(self, revised: Revised, refused: str | None = None) -> float:
        """How long without a Publish response before the session is dropped.

        A message is due every keep-alive period; a server that stops answering Publish
        requests (they wait without a timeout) would otherwise leave the values unmarked.
        As the policy asks, that is three poll intervals. A server that kept a longer period
        (the subscription could not be changed back) is given three of its periods, up to
        MAX_SILENCE_S: dropping it sooner would reconnect to it over and over. That is
        logged and audited once per connector (`subscription_revised`), with what to change:
        unchanged values are confirmed less often than the policy asks, and served `stale`
        when that is over three poll intervals."""
        device = self._device
        period_s = keep_alive_s(revised)
        cap_s = max(SILENT_PUBLISHES * device.poll_interval_s + device.timeout_s, MAX_SILENCE_S)
        limit_s = min(max(device.timeout_s, SILENT_PUBLISHES * period_s), cap_s)
        if period_s > device.poll_interval_s * SLACK and not self._revision_logged:
            self._revision_logged = True
            usable = math.isfinite(period_s)
            interval_ms = float(revised.RevisedPublishingInterval)
            self._log.warning(
                "subscription_revised",
                # as the server sent it, in words when it is no number a log line can hold
                publishing_interval_ms=interval_ms
                if math.isfinite(interval_ms)
                else str(interval_ms),
                max_keep_alive_count=revised.RevisedMaxKeepAliveCount,
                # unchanged values confirmed this often (None: the interval is unusable)
                keep_alive_s=round(period_s, 3) if usable else None,
                silence_limit_s=round(limit_s, 3),  # then the session is dropped
                modify_refused=refused,
                advice=_advice(device, period_s),
            )
        return limit_s


def _advice(device: OpcUaDevice, period_s: float) -> str:
    """What the owners can do about a server that confirms values less often than asked."""
    stale_s = STALE_AFTER_INTERVALS * device.poll_interval_s
    if not math.isfinite(period_s):
        return "the server's publishing interval is unusable: ask its administrator to check it"
    if period_s * SLACK <= stale_s:
        return "values stay fresh (confirmed within three poll intervals): nothing to do"
    return (
        f"unchanged values are confirmed every {period_s:g} s and read stale after "
        f"{stale_s:g} s: set the device's poll_interval_s to {period_s:g} s in the policy, "
        "or ask the server's administrator to allow a shorter publishing interval or "
        "keep-alive count"
    )

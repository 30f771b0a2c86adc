"""How often an OPC UA subscription confirms its values, as the server revised it.

The enterprise half serves a value `stale` three poll intervals after the plant last
confirmed it (ADR 0004); a subscription confirms unchanged values with each message, and
sends one at least every keep-alive period: its revised publishing interval times its
revised keep-alive count. This module computes that period from a CreateSubscription
response, and the publishing interval to ask for again when the server's keep-alive count
would make it longer than the poll interval. Pure computation: it sends nothing.
"""

from __future__ import annotations

from asyncua import ua

MIN_PUBLISHING_MS = 50.0  # the shortest interval asked for to offset a revised keep-alive count
SLACK = 1.001  # a revised interval a float rounding longer is the interval asked for


def keep_alive_s(subscription: ua.CreateSubscriptionResult) -> float:
    """How often the server sends a message when nothing changed, as it revised the
    subscription: its publishing interval times its keep-alive count."""
    interval_s = float(subscription.RevisedPublishingInterval) / 1000
    return interval_s * max(1, int(subscription.RevisedMaxKeepAliveCount))


def publishing_interval(poll_s: float, subscription: ua.CreateSubscriptionResult) -> float | None:
    """The publishing interval (ms) to create the subscription again with, so that the
    server's keep-alive period, with the count it revised, is the poll interval again; None
    when it already is, when the server set an interval longer than the one asked for (a
    shorter request would be revised the same way), or when the interval would fall below
    MIN_PUBLISHING_MS (a count so high would make the server publish far too often)."""
    count = max(1, int(subscription.RevisedMaxKeepAliveCount))
    interval_ms = float(subscription.RevisedPublishingInterval)
    if keep_alive_s(subscription) <= poll_s * SLACK or interval_ms > poll_s * 1000 * SLACK:
        return None
    shorter_ms = poll_s * 1000 / count
    return shorter_ms if shorter_ms >= MIN_PUBLISHING_MS else None

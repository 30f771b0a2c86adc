"""What a session of the read-only OPC UA mirror may subscribe to, and how much: the revised
subscription and monitored-item parameters, and the bookkeeping of each session's monitored
items (docs/opcua-server.md, Limits).

Every monitored item on a node costs the event loop a notification each time the mirror
writes the node's value, on the loop the half's API and other outputs share. So a session
holds at most one item per node (so a node has at most one per session in all), only on the
Value of its granted variables and properties (or of a few nodes of the standard
ServerStatus that clients watch to see the server alive), at most as many as its view has
such nodes, made at most MAX_ITEMS_PER_REQUEST at a time; and subscriptions publish no
faster than MIN_PUBLISHING_MS with queues of at most MAX_QUEUE values. `Watchers` counts
the items on each signal's nodes over all sessions: the writer's budget per loop step
(`OpcUaServer`).

Nothing here answers a client or touches the address space: `opcua_session` asks it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Container

from asyncua import ua
from asyncua.ua.object_ids import ObjectIds

from broker.enterprise.outputs.opcua_space import PROPERTIES

MIN_PUBLISHING_MS = 100.0  # a subscription asked faster is revised to this
MAX_PUBLISHING_MS = 60_000.0
MAX_KEEPALIVE_MS = 60_000.0  # keep-alive count × publishing interval, at most
MAX_LIFETIME_MS = 300_000.0  # lifetime count × publishing interval, at most (and ≥ 3 keep-alives)
MAX_QUEUE = 10  # values queued per monitored item (asyncua: 10,000 when 0 is asked for)
MAX_ITEMS_PER_REQUEST = 500  # items in one CreateMonitoredItems / ModifyMonitoredItems
ITEMS_PER_SIGNAL = 1 + 2 + len(PROPERTIES)  # its value, EngineeringUnits, EURange, context
SERVER_WATCHABLE = frozenset(
    ua.NodeId(ua.Int32(i))
    for i in (
        ObjectIds.Server_ServerStatus,
        ObjectIds.Server_ServerStatus_State,
        ObjectIds.Server_ServerStatus_CurrentTime,
    )
)  # the only standard nodes an item may watch: what clients watch to see the server alive


def revise_subscription(params: ua.CreateSubscriptionParameters) -> None:
    """Publishing interval, keep-alive and lifetime counts bounded, in place (asyncua takes
    the interval as asked, 0 included: a subscription publishing on every value)."""
    asked = params.RequestedPublishingInterval
    interval = MIN_PUBLISHING_MS if math.isnan(asked) else asked
    interval = min(max(interval, MIN_PUBLISHING_MS), MAX_PUBLISHING_MS)
    keepalive = _within(params.RequestedMaxKeepAliveCount, 1, MAX_KEEPALIVE_MS / interval)
    lifetime = _within(
        params.RequestedLifetimeCount, 3 * keepalive, max(3 * keepalive, MAX_LIFETIME_MS / interval)
    )
    params.RequestedPublishingInterval = ua.Double(interval)
    params.RequestedMaxKeepAliveCount = ua.UInt32(keepalive)
    params.RequestedLifetimeCount = ua.UInt32(lifetime)


def revise_item(parameters: ua.MonitoringParameters) -> None:
    """Queue size 1 to MAX_QUEUE and sampling no faster than MIN_PUBLISHING_MS, in place
    (asyncua echoes what ModifyMonitoredItems asks, uncapped)."""
    parameters.QueueSize = ua.UInt32(_within(parameters.QueueSize, 1, MAX_QUEUE))
    sampling = parameters.SamplingInterval
    if math.isnan(sampling) or sampling < MIN_PUBLISHING_MS:
        parameters.SamplingInterval = ua.Double(MIN_PUBLISHING_MS)


def _within(asked: int, low: float, high: float) -> int:
    return int(min(max(asked, low), max(low, high)))


class Watchers:
    """Monitored items on each signal's nodes, over all sessions."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def of(self, signal: str) -> int:
        return self.counts.get(signal, 0)


class SessionItems:
    """One session's subscriptions and monitored items: item id → the node it watches, per
    subscription; one item per node."""

    def __init__(self, watchers: Watchers) -> None:
        self._watchers = watchers
        self._subscriptions: dict[int, dict[int, ua.NodeId]] = {}
        self._nodes: dict[ua.NodeId, str | None] = {}  # watched node → its signal (None: Server)

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def subscriptions(self) -> int:
        return len(self._subscriptions)

    def owns(self, subscription: int) -> bool:
        return subscription in self._subscriptions

    def watches(self, node: ua.NodeId) -> bool:
        return node in self._nodes

    def signals(self) -> set[str]:
        return {s for s in self._nodes.values() if s is not None}

    def subscribed(self, subscription: int) -> None:
        self._subscriptions[subscription] = {}

    def added(self, subscription: int, item: int, node: ua.NodeId, signal: str | None) -> None:
        self._subscriptions[subscription][item] = node
        self._nodes[node] = signal
        if signal is not None:
            self._watchers.counts[signal] += 1

    def removed(self, subscription: int, item: int) -> None:
        node = self._subscriptions.get(subscription, {}).pop(item, None)
        if node is None:
            return
        signal = self._nodes.pop(node, None)
        if signal is not None:
            self._watchers.counts[signal] -= 1
            if self._watchers.counts[signal] <= 0:
                del self._watchers.counts[signal]

    def unsubscribed(self, subscription: int) -> None:
        for item in list(self._subscriptions.get(subscription, {})):
            self.removed(subscription, item)
        self._subscriptions.pop(subscription, None)

    def keep_only(self, live: Container[int]) -> None:
        """Forget the subscriptions asyncua ended on its own (their lifetime passed)."""
        for subscription in [s for s in self._subscriptions if s not in live]:
            self.unsubscribed(subscription)

    def clear(self) -> None:
        for subscription in list(self._subscriptions):
            self.unsubscribed(subscription)

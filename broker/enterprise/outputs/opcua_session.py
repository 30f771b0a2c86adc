"""An OPC UA client's session on the read-only mirror: what it may see and how much it may ask.

A session belongs to the identity of its channel's certificate and sees only the nodes of
the signals `authz.view(identity)` grants (and the standard Server object and types): Read,
Browse, TranslateBrowsePaths and CreateMonitoredItems answer BadNodeIdUnknown for anything
else, exactly as for a node that does not exist (so no answer tells whether a node not
granted exists), Browse leaves such nodes out of its references, and a browse path never
passes through one. (BrowseNext, HistoryRead and Query are refused whatever they name,
`opcua_guard`; RegisterNodes echoes any NodeId, as asyncua does.) The view
is asked at each request, so a policy reload narrows it at once (and the server ends the
sessions whose monitored items it narrowed, `OpcUaServer.use_policy`).

asyncua keeps one subscription table for all sessions; a session may only touch its own
subscriptions here. Bounds per session: MAX_SUBSCRIPTIONS subscriptions,
MAX_MONITORED_ITEMS items, MAX_OPERATIONS nodes per request; `SessionRules` bounds the
number of sessions (`max_sessions`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User
from asyncua.server.internal_session import InternalSession
from asyncua.ua.status_codes import StatusCodes

from broker.enterprise.authz import Authorization, Peer
from broker.enterprise.outputs.opcua_space import AddressSpace, status

log = structlog.get_logger("opcua_server")

MAX_SUBSCRIPTIONS = 8  # per session
MAX_MONITORED_ITEMS = 20_000  # per session: a whole site's signals, twice
MAX_OPERATIONS = 5_000  # nodes in one Read, Browse, TranslateBrowsePaths, CreateMonitoredItems
_UNKNOWN = StatusCodes.BadNodeIdUnknown
_NOT_OURS = StatusCodes.BadSubscriptionIdInvalid


class SessionRules:
    """Who may hold a session and see what: the policy's grants, the server's bounds."""

    def __init__(
        self,
        authz: Authorization,
        space: AddressSpace,
        max_sessions: int,
        closed_for: Callable[[], tuple[str, str] | None],
    ) -> None:
        self.authz = authz
        self.space = space
        self.max_sessions = max_sessions
        self.closed_for = closed_for  # (reason, detail) no session may open now, or None
        self.sessions: set[GuardedSession] = set()

    def refusal(self, peer: Peer) -> tuple[str, str, int] | None:  # opcua_guard.Refusal
        """(reason, detail, status) refusing `peer` a new session, or None."""
        closed = self.closed_for()
        if closed is not None:
            return *closed, StatusCodes.BadServerHalted
        identity = peer.identity or ""
        if peer.serial in self.authz.revoked:
            return (
                "revoked",
                f"serial {peer.serial} is revoked",
                StatusCodes.BadCertificateRevoked,
            )
        if not self.authz.knows(identity):
            return (
                "unknown_identity",
                "not a consumer of the policy",
                StatusCodes.BadUserAccessDenied,
            )
        if len(self.sessions) >= self.max_sessions:
            detail = f"max_sessions ({self.max_sessions}) open"
            return "too_many_sessions", detail, StatusCodes.BadTooManySessions
        return None

    def view(self, peer: Peer | None) -> frozenset[str]:
        if peer is None or peer.identity is None or peer.serial in self.authz.revoked:
            return frozenset()
        return self.authz.view(peer.identity)

    def visible(self, node: ua.NodeId, view: frozenset[str]) -> bool:
        signals = self.space.signals_of(node)
        return signals is None or not signals.isdisjoint(view)


class GuardedSession(InternalSession):
    """A session that answers only for its identity's nodes and its own subscriptions."""

    def __init__(
        self, iserver: Any, aspace: Any, submgr: Any, name: str, *, rules: SessionRules,
        user: User, external: bool,
    ) -> None:  # fmt: skip
        super().__init__(iserver, aspace, submgr, name, user=user, external=external)
        self.rules = rules
        self.peer: Peer | None = None  # set once the processor accepted its creation
        self.channel_der = b""
        self.transport: asyncio.BaseTransport | None = None
        self._items: dict[int, int] = {}  # own subscription id → its monitored items
        self._watched: set[str] = set()  # signals monitored items were made for

    def bind(self, peer: Peer, channel_der: bytes, transport: asyncio.BaseTransport) -> None:
        self.peer, self.channel_der, self.transport = peer, channel_der, transport
        self.rules.sessions.add(self)
        self.rules.authz.stream_opened(peer.serial, self)  # a revocation ends it (close)
        log.info("opcua_session_opened", **peer.described())

    def close(self) -> None:
        """End the session and its connection (revoked, policy narrowed, audit failing)."""
        if self.transport is not None:
            self.transport.close()
        asyncio.get_running_loop().create_task(self.close_session(True))

    async def close_session(self, delete_subs: bool = True) -> None:
        peer = self.peer
        if peer is not None and self in self.rules.sessions:
            self.rules.sessions.discard(self)
            self.rules.authz.stream_closed(peer.serial, self)
            log.info("opcua_session_closed", **peer.described())
        await super().close_session(delete_subs)

    def watches_beyond(self, view: frozenset[str]) -> bool:
        """Whether a monitored item made in this session watches a signal outside `view`
        (items deleted since still count: ending a session too many is the safe side)."""
        return not self._watched <= view

    def _view(self) -> frozenset[str]:
        return self.rules.view(self.peer)

    def _own(self, sub_id: int) -> bool:
        return sub_id in self._items

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        _bounded(params.NodesToRead)
        view = self._view()
        shown = [self.rules.visible(r.NodeId, view) for r in params.NodesToRead]
        params.NodesToRead = [r for r, ok in zip(params.NodesToRead, shown, strict=True) if ok]
        results = iter(await super().read(params) if params.NodesToRead else [])
        return [next(results) if ok else ua.DataValue(StatusCode=status(_UNKNOWN)) for ok in shown]

    async def browse(self, params: ua.BrowseParameters) -> list[ua.BrowseResult]:
        _bounded(params.NodesToBrowse)
        view = self._view()
        results = []
        for description in params.NodesToBrowse:
            if not self.rules.visible(description.NodeId, view):
                results.append(ua.BrowseResult(StatusCode=status(_UNKNOWN)))
                continue
            one = ua.BrowseParameters(View=params.View, NodesToBrowse=[description])
            result = (await super().browse(one))[0]
            result.References = [
                r for r in result.References if self.rules.visible(_node(r.NodeId), view)
            ]
            results.append(result)
        return results

    async def translate_browsepaths_to_nodeids(
        self, params: list[ua.BrowsePath]
    ) -> list[ua.BrowsePathResult]:
        _bounded(params)
        _bounded([e for path in params for e in path.RelativePath.Elements])
        view = self._view()
        return [await self._translate(path, view) for path in params]

    async def _translate(self, path: ua.BrowsePath, view: frozenset[str]) -> ua.BrowsePathResult:
        """The path walked one element at a time through nodes the session may see: a node
        not granted ends it as a name that does not exist does (BadNoMatch), whatever
        standard node (a type definition) the path would reach through it."""
        elements = path.RelativePath.Elements
        if not self.rules.visible(path.StartingNode, view):
            return ua.BrowsePathResult(StatusCode=status(_UNKNOWN))
        if not elements:
            return ua.BrowsePathResult(StatusCode=status(StatusCodes.BadNothingToDo))
        if not elements[-1].TargetName.Name:
            return ua.BrowsePathResult(StatusCode=status(StatusCodes.BadBrowseNameInvalid))
        reached: dict[ua.NodeId, ua.BrowsePathTarget] = {
            _node(path.StartingNode): ua.BrowsePathTarget()
        }
        for element in elements:
            one = ua.RelativePath(Elements=[element])
            steps = [ua.BrowsePath(StartingNode=n, RelativePath=one) for n in reached]
            found = await super().translate_browsepaths_to_nodeids(steps)
            targets = (t for result in found for t in result.Targets)
            reached = {
                node: t for t in targets if self.rules.visible(node := _node(t.TargetId), view)
            }
            if not reached:
                return ua.BrowsePathResult(StatusCode=status(StatusCodes.BadNoMatch))
        return ua.BrowsePathResult(Targets=list(reached.values()))

    async def create_subscription(
        self, params: ua.CreateSubscriptionParameters, callback: Callable[..., Any],
        request_callback: Callable[..., Any] | None = None,
    ) -> ua.CreateSubscriptionResult:  # fmt: skip
        if len(self._items) >= MAX_SUBSCRIPTIONS:
            raise ServiceError(StatusCodes.BadTooManySubscriptions)
        result = await super().create_subscription(params, callback, request_callback)
        self._items[result.SubscriptionId] = 0
        return result

    async def create_monitored_items(
        self, params: ua.CreateMonitoredItemsParameters
    ) -> list[ua.MonitoredItemCreateResult]:
        _bounded(params.ItemsToCreate)
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        view = self._view()
        room = MAX_MONITORED_ITEMS - sum(self._items.values())
        verdicts: list[int | None] = []
        for item in params.ItemsToCreate:
            if not self.rules.visible(item.ItemToMonitor.NodeId, view):
                verdicts.append(_UNKNOWN)
            elif room <= 0:
                verdicts.append(StatusCodes.BadTooManyMonitoredItems)
            else:
                verdicts.append(None)
                room -= 1
        items = params.ItemsToCreate
        params.ItemsToCreate = [i for i, v in zip(items, verdicts, strict=True) if v is None]
        made = iter(await super().create_monitored_items(params) if params.ItemsToCreate else [])
        results = []
        for item, verdict in zip(items, verdicts, strict=True):
            if verdict is not None:
                results.append(ua.MonitoredItemCreateResult(StatusCode=status(verdict)))
                continue
            result = next(made)
            if result.StatusCode.is_good():
                self._items[params.SubscriptionId] += 1
                self._watched |= self.rules.space.signals_of(item.ItemToMonitor.NodeId) or set()
            results.append(result)
        return results

    async def modify_monitored_items(
        self, params: ua.ModifyMonitoredItemsParameters
    ) -> list[ua.MonitoredItemModifyResult]:
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        return await super().modify_monitored_items(params)

    async def delete_monitored_items(
        self, params: ua.DeleteMonitoredItemsParameters
    ) -> list[ua.StatusCode]:
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        results = await super().delete_monitored_items(params)
        self._items[params.SubscriptionId] -= sum(r.is_good() for r in results)
        return results

    async def set_monitoring_mode(
        self, params: ua.SetMonitoringModeParameters
    ) -> list[ua.StatusCode]:
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        return await super().set_monitoring_mode(params)

    def modify_subscription(
        self, params: ua.ModifySubscriptionParameters
    ) -> ua.ModifySubscriptionResult:
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        return super().modify_subscription(params)

    def republish(self, params: ua.RepublishParameters) -> ua.NotificationMessage:
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        return super().republish(params)

    async def set_publishing_mode(
        self, params: ua.SetPublishingModeParameters
    ) -> list[ua.StatusCode]:
        own = [i for i in params.SubscriptionIds if self._own(i)]
        done = iter(await super().set_publishing_mode(
            ua.SetPublishingModeParameters(PublishingEnabled=params.PublishingEnabled, SubscriptionIds=own)
        ) if own else [])  # fmt: skip
        return [next(done) if self._own(i) else status(_NOT_OURS) for i in params.SubscriptionIds]

    async def delete_subscriptions(self, ids: list[int]) -> list[ua.StatusCode]:
        own = [i for i in ids if self._own(i)]
        done = iter(await super().delete_subscriptions(own) if own else [])
        results = [next(done) if self._own(i) else status(_NOT_OURS) for i in ids]
        for i in own:
            self._items.pop(i, None)
        return results

    def publish(self, acks: Any = None) -> tuple[int, list[ua.StatusCode]]:
        acks = list(acks or [])
        own = [a for a in acks if self._own(a.SubscriptionId)]
        count, done = super().publish(own)
        results = iter(done)
        return count, [
            next(results) if self._own(a.SubscriptionId) else status(_NOT_OURS) for a in acks
        ]


def _bounded(operations: list[Any]) -> None:
    if len(operations) > MAX_OPERATIONS:
        raise ServiceError(StatusCodes.BadTooManyOperations)


def _node(expanded: ua.ExpandedNodeId | ua.NodeId) -> ua.NodeId:
    return ua.NodeId(
        expanded.Identifier, expanded.NamespaceIndex
    )  # an ExpandedNodeId's server part dropped

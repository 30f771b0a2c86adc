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
subscriptions here. Bounds per session: MAX_SUBSCRIPTIONS subscriptions, MAX_OPERATIONS
nodes per request, monitored items as `opcua_items` revises and counts them. `SessionRules`
bounds the sessions: `max_sessions`, MAX_SESSIONS_PER_IDENTITY, none for an identity granted
nothing, and a session whose connection is gone ends after DROPPED_GRACE_S (asyncua keeps
it for its timeout, for a client that reconnects). A session whose client does not read the
answers its subscriptions send (its connection's send buffer past MAX_UNREAD_BYTES, the
connection's own bound, `opcua_connection`) is ended at once.
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
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes

from broker.enterprise.authz import Authorization, Peer
from broker.enterprise.outputs.opcua_connection import MAX_UNREAD_BYTES
from broker.enterprise.outputs.opcua_items import (
    ITEMS_PER_SIGNAL,
    MAX_ITEMS_PER_REQUEST,
    SERVER_WATCHABLE,
    SessionItems,
    Watchers,
    revise_item,
    revise_subscription,
)
from broker.enterprise.outputs.opcua_space import AddressSpace, status

log = structlog.get_logger("opcua_server")

MAX_SUBSCRIPTIONS = 8  # per session
MAX_OPERATIONS = 5_000  # nodes in one Read, Browse, TranslateBrowsePaths
MAX_SESSIONS_PER_IDENTITY = 4  # so that one identity cannot take every session
DROPPED_GRACE_S = 5.0  # a session whose connection is gone is ended after this
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
        self.watchers = Watchers()  # monitored items per signal, all sessions together

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
        return self._room_refusal(peer, identity)

    def _room_refusal(self, peer: Peer, identity: str) -> tuple[str, str, int] | None:
        """A known identity refused: granted nothing, or no session left for it."""
        if not self.view(peer):
            return (
                "nothing_granted",
                "the policy grants this identity no signal",
                StatusCodes.BadUserAccessDenied,
            )
        if len(self.sessions) >= self.max_sessions:
            detail = f"max_sessions ({self.max_sessions}) open"
            return "too_many_sessions", detail, StatusCodes.BadTooManySessions
        held = sum(1 for s in self.sessions if s.peer is not None and s.peer.identity == identity)
        if held >= MAX_SESSIONS_PER_IDENTITY:
            detail = f"{held} sessions of this identity open (at most {MAX_SESSIONS_PER_IDENTITY})"
            return "too_many_sessions_of_identity", detail, StatusCodes.BadTooManySessions
        return None

    def view(self, peer: Peer | None) -> frozenset[str]:
        if peer is None or peer.identity is None or peer.serial in self.authz.revoked:
            return frozenset()
        return self.authz.view(peer.identity)

    def visible(self, node: ua.NodeId, view: frozenset[str]) -> bool:
        signals = self.space.signals_of(node)
        return signals is None or not signals.isdisjoint(view)

    def end_dropped(self, now: float) -> None:
        """End the sessions whose connection has been gone DROPPED_GRACE_S (asyncua would
        keep one with subscriptions for its whole timeout, holding a session slot)."""
        for session in list(self.sessions):
            transport = session.transport
            if transport is None or not transport.is_closing():
                session.dropped_at = None
            elif session.dropped_at is None:
                session.dropped_at = now
            elif now - session.dropped_at >= DROPPED_GRACE_S:
                session.end("connection_lost")


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
        self.dropped_at: float | None = None  # when its connection was first seen gone
        self.ending = False
        self._items = SessionItems(rules.watchers)

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

    def end(self, reason: str) -> None:
        """End the session, its connection dropped at once (whatever it has not sent)."""
        if self.ending:
            return
        self.ending, peer = True, self.peer
        log.info("opcua_session_ending", reason=reason, **(peer.described() if peer else {}))
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()
        asyncio.get_running_loop().create_task(self.close_session(True))

    async def close_session(self, delete_subs: bool = True) -> None:
        peer = self.peer
        if peer is not None and self in self.rules.sessions:
            self.rules.sessions.discard(self)
            self.rules.authz.stream_closed(peer.serial, self)
            log.info("opcua_session_closed", **peer.described())
        await super().close_session(delete_subs)  # its subscriptions through ours
        self._items.clear()

    def watches_beyond(self, view: frozenset[str]) -> bool:
        """Whether a monitored item of this session watches a signal outside `view`."""
        return not self._items.signals() <= view

    def _view(self) -> frozenset[str]:
        return self.rules.view(self.peer)

    def _own(self, sub_id: int) -> bool:
        return self._items.owns(sub_id)

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
        self._items.keep_only(self.subscription_service.subscriptions)
        if self._items.subscriptions >= MAX_SUBSCRIPTIONS:
            raise ServiceError(StatusCodes.BadTooManySubscriptions)
        revise_subscription(params)

        async def publish(*answer: Any) -> None:  # asyncua's sender, then a look at the buffer
            await callback(*answer)
            self._sent()

        made = await super().create_subscription(params, publish, request_callback)
        self._items.subscribed(made.SubscriptionId)
        return made

    def _sent(self) -> None:
        """After each answer to a Publish, sent from the subscription's task whether the
        client sends anything or not (the connection looks at its buffer only when it
        handles a request, and reads none while its answers wait): a client that does not
        read them is cut off."""
        transport = self.transport
        if (
            isinstance(transport, asyncio.WriteTransport)
            and transport.get_write_buffer_size() > MAX_UNREAD_BYTES
        ):
            self.end("not_reading")

    async def create_monitored_items(
        self, params: ua.CreateMonitoredItemsParameters
    ) -> list[ua.MonitoredItemCreateResult]:
        if len(params.ItemsToCreate) > MAX_ITEMS_PER_REQUEST:
            raise ServiceError(StatusCodes.BadTooManyOperations)
        self._items.keep_only(self.subscription_service.subscriptions)
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        view = self._view()
        room = len(view) * ITEMS_PER_SIGNAL + len(SERVER_WATCHABLE) - len(self._items)
        verdicts: list[int | None] = []
        asked: set[ua.NodeId] = set()
        for item in params.ItemsToCreate:
            verdict = self._refused_item(item.ItemToMonitor, view, asked)
            if verdict is None and room <= 0:
                verdict = StatusCodes.BadTooManyMonitoredItems
            verdicts.append(verdict)
            if verdict is None:
                asked.add(item.ItemToMonitor.NodeId)
                revise_item(item.RequestedParameters)
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
            if result.StatusCode.is_good() and self._own(params.SubscriptionId):
                node = item.ItemToMonitor.NodeId
                signals = self.rules.space.signals_of(node)
                signal = next(iter(signals)) if signals else None
                self._items.added(params.SubscriptionId, result.MonitoredItemId, node, signal)
            results.append(result)
        return results

    def _refused_item(
        self, target: ua.ReadValueId, view: frozenset[str], asked: set[ua.NodeId]
    ) -> int | None:
        """The status refusing a monitored item on `target`, or None. A node not granted is
        answered as one that does not exist, before anything else is looked at."""
        node = target.NodeId
        signals = self.rules.space.signals_of(node)
        if not self.rules.visible(node, view):
            return _UNKNOWN
        if signals is None and node not in SERVER_WATCHABLE:
            return StatusCodes.BadNotSupported  # a standard node: none but ServerStatus's
        if target.AttributeId != AttributeIds.Value:
            return StatusCodes.BadAttributeIdInvalid  # only values change here
        if node in asked or self._items.watches(node):
            return StatusCodes.BadTooManyMonitoredItems  # one item per node and session
        return None

    async def modify_monitored_items(
        self, params: ua.ModifyMonitoredItemsParameters
    ) -> list[ua.MonitoredItemModifyResult]:
        if len(params.ItemsToModify) > MAX_ITEMS_PER_REQUEST:
            raise ServiceError(StatusCodes.BadTooManyOperations)
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        for item in params.ItemsToModify:
            revise_item(item.RequestedParameters)
        return await super().modify_monitored_items(params)

    async def delete_monitored_items(
        self, params: ua.DeleteMonitoredItemsParameters
    ) -> list[ua.StatusCode]:
        if not self._own(params.SubscriptionId):
            raise ServiceError(_NOT_OURS)
        results = await super().delete_monitored_items(params)
        for item, result in zip(params.MonitoredItemIds, results, strict=True):
            if result.is_good():
                self._items.removed(params.SubscriptionId, item)
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
            self._items.unsubscribed(i)
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

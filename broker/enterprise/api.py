"""The consumer API over HTTPS with mutual TLS (the TLS context is built by broker.trust).

Read-only: every route is GET; any other method is answered 405. Errors are JSON
`{"error": "..."}`. Each consumer sees only the signals the policy grants its identity (the
one URI SAN of its certificate): a signal outside its view is 403 whether or not it exists,
so the answer leaks nothing; an identity the policy does not name gets 403 on every route
but the API's own description. `/v1/signals` describes the semantic model only: device
addresses and register maps are plant topology and never reach the enterprise side.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.audit.log import AuditLog
from broker.enterprise.authz import Authorization, Peer, denied, peer_of
from broker.enterprise.handshake import request_started
from broker.enterprise.openapi import served_document
from broker.enterprise.resume import MAX_REPLAYS, ReplaySlots, last_event_id, resume
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from broker.records import to_json

KEEPALIVE_S = 15.0  # an SSE comment this often lets both sides notice a dead connection
WRITE_TIMEOUT_S = 10.0  # a consumer that takes no data for this long is disconnected
STORE: web.AppKey[Store] = web.AppKey("store", Store)
AUTHZ: web.AppKey[Authorization] = web.AppKey("authz", Authorization)
AUDIT: web.AppKey[AuditLog] = web.AppKey("audit", AuditLog)
METRICS: web.AppKey[EnterpriseMetrics] = web.AppKey("metrics", EnterpriseMetrics)
SPOOL_DIR: web.AppKey[Path] = web.AppKey("spool_dir", Path)
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi", bytes)
CONNECTIONS: web.AppKey[weakref.WeakSet[asyncio.BaseTransport]] = web.AppKey("connections")
REPLAYS: web.AppKey[ReplaySlots] = web.AppKey("replays", ReplaySlots)
PEER: web.RequestKey[Peer] = web.RequestKey("peer", Peer)
VIEW: web.RequestKey[frozenset[str]] = web.RequestKey("view", frozenset)

log = structlog.get_logger("api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    store: Store,
    authz: Authorization,
    audit: AuditLog,
    metrics: EnterpriseMetrics,
    spool_dir: Path,
    *,
    max_replays: int = MAX_REPLAYS,
) -> web.Application:
    app = web.Application(middlewares=[_json_errors, _authorize], client_max_size=1024)
    app.on_response_prepare.append(_anonymous)
    app[STORE] = store
    app[AUTHZ] = authz
    app[AUDIT] = audit
    app[CONNECTIONS] = weakref.WeakSet()
    app[METRICS] = metrics
    app[SPOOL_DIR] = spool_dir
    app[REPLAYS] = ReplaySlots(max_replays)
    app[OPENAPI] = served_document()
    app.router.add_get("/v1/signals", _signals, allow_head=False)
    app.router.add_get("/v1/snapshot", _snapshot, allow_head=False)
    app.router.add_get("/v1/signals/{path:.+}", _signal, allow_head=False)
    app.router.add_get("/v1/stream", _stream, allow_head=False)
    app.router.add_get("/metrics", _metrics, allow_head=False)
    app.router.add_get("/v1/openapi.json", _openapi, allow_head=False)
    return app


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=to_json(body), status=status, content_type="application/json")


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _json({"error": e.reason}, status=e.status)
        if e.status == 405:
            response.headers["Allow"] = "GET"
        return response


async def _anonymous(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp names itself and Python's version in `Server`: of use only to an attacker.
    response.headers.popall(hdrs.SERVER, None)


@web.middleware
async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Name the peer and look up its view; refuse a certificate without exactly one URI, a
    revoked one, and an identity the policy does not name (but for the API's description)."""
    peer = peer_of(
        request.transport.get_extra_info("ssl_object") if request.transport else None,
        request.remote,
    )
    if peer.identity is None:
        denied(peer, peer.problem or "no_identity", path=request.path)
        raise web.HTTPForbidden(
            reason="the client certificate must name the consumer in exactly one URI SAN"
        )
    authz = request.app[AUTHZ]
    if peer.serial in authz.revoked:  # a connection made before its CRL came into force
        denied(peer, "revoked", path=request.path)
        refused = _json({"error": "the client certificate is revoked"}, status=403)
        refused.force_close()  # and the connection ends with this answer
        return refused
    if authz.knows(peer.identity):
        request_started(request)  # a consumer, not a squatter: not closed to make room
    elif request.path != "/v1/openapi.json":
        denied(peer, "unknown_identity", path=request.path)
        raise web.HTTPForbidden(reason="the policy grants this identity nothing")
    # /metrics stays readable while data is refused: that is when monitoring matters most,
    # and it carries no plant values; nor does the API's own description.
    data = request.path not in ("/metrics", "/v1/openapi.json")
    if data and request.app[AUDIT].failing:
        raise web.HTTPServiceUnavailable(reason="the audit log cannot be written; try later")
    if data and datetime.now(UTC) >= authz.policy.expires:
        raise web.HTTPServiceUnavailable(
            reason="the policy has expired; nothing is published until a newer one is accepted"
        )
    request[PEER] = peer
    request[VIEW] = authz.view(peer.identity)
    connections = request.app[CONNECTIONS]
    if request.transport is not None and request.transport not in connections:
        connections.add(request.transport)  # once per TLS connection, not per request
        log.info("consumer_connected", **peer.described())
    return await handler(request)


async def _signals(request: web.Request) -> web.Response:
    authz, view = request.app[AUTHZ], request[VIEW]
    return _json(
        {
            "policy_version": authz.policy.version,
            "signals": [
                {
                    "path": s.path,
                    "asset": s.asset,
                    "unit": s.unit,
                    "type": s.source.type,
                    "description": s.description,
                    "quantity": s.quantity,
                    "range": s.range,
                    "outcomes": s.outcomes,
                }
                for s in authz.policy.signals
                if s.path in view
            ],
        }
    )


OUTPUT = "https"  # this output's name in the registry and the metrics (docs/specs/output.md)


async def _snapshot(request: web.Request) -> web.Response:
    records = request.app[STORE].snapshot(datetime.now(UTC), request[VIEW])
    request.app[METRICS].output_records.labels(OUTPUT).inc(len(records))
    return _json({"records": records})


async def _signal(request: web.Request) -> web.Response:
    path = request.match_info["path"]
    if path not in request[VIEW]:
        denied(request[PEER], "forbidden_signal", signal=path)
        raise web.HTTPForbidden(reason=f"signal {path!r} is not granted to this consumer")
    record = request.app[STORE].latest(path, datetime.now(UTC))
    if record is None:
        raise web.HTTPNotFound(reason=f"no value yet for signal {path!r}")
    request.app[METRICS].output_records.labels(OUTPUT).inc()
    return _json(record)


async def _metrics(request: web.Request) -> web.Response:
    peer = request[PEER]
    assert peer.identity is not None  # _authorize let it through
    if not request.app[AUTHZ].may_read_metrics(peer.identity):
        denied(peer, "forbidden_metrics", path=request.path)
        raise web.HTTPForbidden(reason="metrics are not granted to this consumer")
    body = request.app[METRICS].exposition(request.app[SPOOL_DIR])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _openapi(request: web.Request) -> web.Response:
    # Any authenticated consumer: the document describes the API, not what it serves.
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def _stream(request: web.Request) -> web.StreamResponse:
    """Live records as server-sent events; with `Last-Event-ID`, first those missed since
    (broker.enterprise.resume)."""
    store, peer = request.app[STORE], request[PEER]
    after_seq = last_event_id(request)  # a malformed one is refused before anything is held
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    assert peer.identity is not None  # _authorize let it through
    if len(store.subscriptions) >= store.max_streams:
        raise web.HTTPServiceUnavailable(reason="too many open streams; try again later")
    subscription = store.subscribe(peer.identity, request[VIEW])  # before the headers go out
    newest_seq = store.last_seq  # the subscription brings every record above it, none below
    authz = request.app[AUTHZ]
    authz.stream_opened(peer.serial, subscription)  # a CRL revoking it ends the wait at once
    log.info("stream_opened", **peer.described())

    async def write(chunk: bytes) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await response.write(chunk)

    try:
        await response.prepare(request)
        # A replay that stopped short is not followed by live records: they would hide a gap.
        live = after_seq is None or await resume(
            write,
            request.app[SPOOL_DIR],
            request.app[REPLAYS],
            subscription,
            peer,
            after_seq=after_seq,
            newest_seq=newest_seq,
            keepalive_s=KEEPALIVE_S,
        )
        floor = newest_seq if after_seq is not None else 0  # replayed or refused up to it
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    batch = await subscription.next_batch() if live else None
            except TimeoutError:
                batch = []
            if peer.serial in authz.revoked:  # checked at every batch and keepalive too
                log.warning("consumer_cut_off", **peer.described(), reason="revoked")
                break
            if batch is None:
                break
            if floor and batch:  # never twice: only until the first live record above it
                # A diode's resync values are below it by nature, and were never replayed.
                batch = [e for e in batch if e.resync or e.record.seq > floor]
                floor = floor if all(e.resync for e in batch) else 0
            await write(b"".join(e.frame for e in batch) or b": keepalive\n\n")
            request.app[METRICS].output_records.labels(OUTPUT).inc(len(batch))
    except ConnectionError:
        pass  # the consumer went away
    except TimeoutError:
        log.warning("consumer_cut_off", identity=peer.identity, reason="not_reading")
    finally:
        authz.stream_closed(peer.serial, subscription)
        store.unsubscribe(subscription)
        log.info(
            "stream_closed",
            identity=peer.identity,
            remote=peer.remote,
            cut_off=subscription.overflowed,
        )
    return response

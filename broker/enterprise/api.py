"""The consumer API over HTTPS with mutual TLS (the TLS context is built by broker.trust).

Read-only: every route is GET; any other method is answered 405. Errors are JSON
`{"error": "..."}`. `/v1/signals` describes the semantic model only: device addresses
and register maps are plant topology and never leave the plant half's policy view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from aiohttp import web

from broker.enterprise.store import Store
from broker.policy import Policy
from broker.records import to_json

KEEPALIVE_S = 15.0  # an SSE comment this often lets both sides notice a dead connection
STORE: web.AppKey[Store] = web.AppKey("store", Store)
SIGNALS_JSON: web.AppKey[bytes] = web.AppKey("signals_json", bytes)

log = structlog.get_logger("api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(store: Store, policy: Policy) -> web.Application:
    app = web.Application(middlewares=[_json_errors], client_max_size=1024)
    app[STORE] = store
    app[SIGNALS_JSON] = to_json(
        {
            "policy_version": policy.version,
            "signals": [
                {
                    "path": s.path,
                    "asset": s.asset,
                    "unit": s.unit,
                    "type": s.source.type,
                    "description": s.description,
                }
                for s in policy.signals
            ],
        }
    )
    app.router.add_get("/v1/signals", _signals, allow_head=False)
    app.router.add_get("/v1/snapshot", _snapshot, allow_head=False)
    app.router.add_get("/v1/signals/{path:.+}", _signal, allow_head=False)
    app.router.add_get("/v1/stream", _stream, allow_head=False)
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


async def _signals(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SIGNALS_JSON], content_type="application/json")


async def _snapshot(request: web.Request) -> web.Response:
    return _json({"records": request.app[STORE].snapshot(datetime.now(UTC))})


async def _signal(request: web.Request) -> web.Response:
    path = request.match_info["path"]
    record = request.app[STORE].latest(path, datetime.now(UTC))
    if record is None:
        raise web.HTTPNotFound(reason=f"no value for signal {path!r}")
    return _json(record)


async def _stream(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    subscription = store.subscribe()  # before the headers go out, so nothing falls between
    log.info("stream_opened", remote=request.remote)
    try:
        await response.prepare(request)
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    batch = await subscription.next_batch()
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if batch is None:
                break
            await response.write(
                b"".join(b"id: %d\ndata: %s\n\n" % (r.seq, to_json(r)) for r in batch)
            )
    except ConnectionResetError:
        pass  # the consumer went away
    finally:
        store.unsubscribe(subscription)
        log.info("stream_closed", remote=request.remote, cut_off=subscription.overflowed)
    return response

"""A consumer connection's way from an accepted socket to the API: TLS first, then aiohttp.

`Handshake` owns a connection the listener accepted until its TLS handshake is done, and
logs a failed one as `tls_handshake_failed` with the peer address and OpenSSL's reason
(asyncio alone hides it). `Served` is then aiohttp's protocol for it. It tells the listener
when the connection is in a request (`request_started`, which the API calls once it knows
the consumer) and when it is idle again (its response written), so that only a known
consumer's connection, and only while in a request, is safe from being closed to make room.

What the HTTP layer answers by itself (a request it cannot parse: 400; a handler that
failed: 500) is JSON `{"error": "..."}` that never echoes the request, is counted by status,
and is logged once per episode. No answer carries aiohttp's `Server` header (it names the
library's and Python's versions).

This module never decides a limit (broker.enterprise.listener does) and never logs per
request: a malformed request costs a counter increment, not a traceback in the log.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import structlog
from aiohttp import hdrs, web

from broker.enterprise.episodes import Episode
from broker.records import to_json

log = structlog.get_logger("tls")
http_log = structlog.get_logger("http")

MALFORMED = (
    "the request is not valid HTTP/1.1, or a line or header of it is too long, "
    "or it has too many headers"
)
FAILED = "the broker could not answer this request"


class Admission(Protocol):
    """The listener, as the connections it admitted report to it."""

    def served(self, connection: Connection) -> None: ...
    def idle(self, connection: Connection) -> None: ...
    def forget(self, connection: Connection) -> None: ...


@dataclass(eq=False)
class Connection:
    admission: Admission
    address: str
    sock: socket.socket
    transport: asyncio.Transport | None = None
    # The event loop holds its tasks only weakly: without this reference the task handing
    # the socket to asyncio could be garbage-collected before it is done.
    task: asyncio.Task[None] | None = None
    deadline: asyncio.TimerHandle | None = None  # the first request's headers are due
    waiting: bool = True  # not in a known consumer's request: may be closed to make room
    handed_over: bool = False  # to aiohttp, whose shutdown closes it
    closed: bool = False


def request_started(request: web.BaseRequest) -> None:
    """Called by the API for each request of a known consumer (identity named by the policy,
    not revoked): its connection is in a request, no longer a squatter; its header deadline
    ends and it is not closed to make room until its response is written."""
    protocol = request.protocol
    if isinstance(protocol, Served):
        protocol.started()


class _Anonymous(web.Response):
    """An answer without aiohttp's `Server` header. The app removes it from its own answers
    in an `on_response_prepare` hook; aiohttp runs no hook for the answers made here,
    outside the app, and adds the header while preparing, so it is removed there."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


class HttpErrors:
    """What the HTTP layer answers by itself, for every connection of one listener."""

    def __init__(self, counts: Counter[str], quiet_s: float) -> None:
        self._counts = counts  # by status, shown in /metrics
        self._malformed = Episode(
            http_log, "requests_malformed", "requests_malformed_ended", quiet_s=quiet_s
        )
        self._failing = Episode(
            http_log, "request_handler_failed", "request_handler_recovered", quiet_s=quiet_s
        )

    def answer(self, remote: str | None, status: int, exc: BaseException | None) -> web.Response:
        self._counts[str(status)] += 1
        kind = type(exc).__name__ if exc is not None else str(status)
        if status < 500:  # the client's fault: what it was is enough, not where we noticed
            self._malformed.hit(kind, status=status, remote=remote)
            error = MALFORMED
        else:  # ours: the traceback helps, and once per episode cannot flood the log
            self._failing.hit(kind, status=status, remote=remote, exc_info=exc)
            error = FAILED
        response = _Anonymous(
            body=to_json({"error": f"{HTTPStatus(status).phrase}: {error}"}),
            status=status,
            content_type="application/json",
        )
        response.force_close()
        return response

    def end(self) -> None:
        self._malformed.end()
        self._failing.end()


class Served(web.RequestHandler):
    """aiohttp's protocol for one connection, reporting to the listener."""

    def __init__(
        self,
        connection: Connection,
        server: web.Server,
        errors: HttpErrors,
        idle_timeout_s: float,
    ) -> None:
        super().__init__(
            server,
            loop=asyncio.get_running_loop(),
            # Also bounds a later request's headers: aiohttp counts a connection with
            # partial headers as idle.
            keepalive_timeout=idle_timeout_s,
            access_log=None,  # type: ignore[arg-type]  # None: no access log (as AppRunner's)
        )
        self._connection = connection
        self._errors = errors

    def started(self) -> None:
        self._connection.admission.served(self._connection)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        finished = await super().finish_response(request, resp, start_time)
        _, reset = finished
        if resp.keep_alive and not reset:  # written, and the connection waits for another
            self._connection.admission.idle(self._connection)
        return finished

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # aiohttp's text, which quotes the request: not sent
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: an answer is under way, too late
            raise ConnectionError("the answer was under way when the request failed")
        return self._errors.answer(request.remote, status, exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connection.admission.forget(self._connection)
        super().connection_lost(exc)


class Handshake(asyncio.Protocol):
    """Owns a connection until its TLS handshake is done, then hands it to `Served`."""

    def __init__(
        self,
        connection: Connection,
        context: ssl.SSLContext,
        timeout_s: float,
        serve: Callable[[Connection], Served],
    ) -> None:
        self._connection = connection
        self._context = context
        self._timeout_s = timeout_s
        self._serve = serve
        self._early: list[bytes] = []  # application data that came before the hand-over
        # The loop holds tasks weakly: this keeps the handshake task alive until it is done.
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._connection.transport = transport
        if self._connection.closed:
            transport.abort()
            return
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.admission.forget(self._connection)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        connection = self._connection
        try:
            secure = await asyncio.get_running_loop().start_tls(
                transport, self, self._context, server_side=True,
                ssl_handshake_timeout=self._timeout_s,
            )  # fmt: skip
        except (ssl.SSLError, OSError, TimeoutError) as e:
            if not connection.closed:  # not closed by a limit, which counts it instead
                log.warning(
                    "tls_handshake_failed",
                    remote=connection.address,
                    reason=getattr(e, "reason", None) or type(e).__name__,
                    detail=getattr(e, "verify_message", None) or str(e)[:200],
                )
            transport.close()
            connection.admission.forget(connection)
            return
        if secure is None or connection.closed:  # gone, or closed by a limit meanwhile
            connection.admission.forget(connection)
            return
        connection.handed_over = True
        handler = self._serve(connection)
        secure.set_protocol(handler)
        handler.connection_made(secure)
        for data in self._early:
            handler.data_received(data)

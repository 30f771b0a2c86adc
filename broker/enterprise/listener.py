"""The consumer-facing TLS listener: it does the handshake itself, so failures are audited.

asyncio (and so aiohttp) hides failed handshakes from the application. This listener accepts
TCP, runs the TLS handshake with `loop.start_tls`, logs `tls_handshake_failed` with the peer
address and OpenSSL's reason when it fails (no certificate, another CA, revoked, expired,
wrong purpose, an old protocol), and hands a successful connection to aiohttp's handler.
"""

from __future__ import annotations

import asyncio
import ssl

import structlog
from aiohttp import web

HANDSHAKE_TIMEOUT_S = 10.0

log = structlog.get_logger("tls")


class _Handshake(asyncio.Protocol):
    """Owns a connection until its TLS handshake is done, then steps aside."""

    def __init__(self, server: web.Server, context: ssl.SSLContext) -> None:
        self._server = server
        self._context = context
        self._early: list[bytes] = []  # application data that came before the hand-over
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        remote = transport.get_extra_info("peername")
        try:
            secure = await asyncio.get_running_loop().start_tls(
                transport, self, self._context, server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
            )  # fmt: skip
        except (ssl.SSLError, OSError, TimeoutError) as e:
            log.warning(
                "tls_handshake_failed",
                remote=remote[0] if remote else None,
                reason=getattr(e, "reason", None) or type(e).__name__,
                detail=getattr(e, "verify_message", None) or str(e)[:200],
            )
            transport.close()
            return
        if secure is None:  # the peer went away during the handshake
            return
        handler = self._server()
        secure.set_protocol(handler)
        handler.connection_made(secure)
        for data in self._early:
            handler.data_received(data)


async def listen(
    runner: web.AppRunner, host: str, port: int, context: ssl.SSLContext
) -> asyncio.Server:
    """Start accepting; close the returned server before `runner.cleanup()`."""
    server = runner.server
    assert server is not None, "call runner.setup() first"
    return await asyncio.get_running_loop().create_server(
        lambda: _Handshake(server, context), host, port, reuse_address=True
    )

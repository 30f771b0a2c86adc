"""The consumer-facing listener: it accepts TCP itself, within limits, and does the TLS handshake.

Accepting here, not in asyncio's server, is what lets it keep the IT side's connections
within bounds the operator sets (ADR 0014):

- at most `max_connections` open at once, and `max_connections_per_address` per client
  address; at the overall limit, the oldest connection that has not made a request yet
  (handshaking, or sending its headers slowly) is closed to make room, so idle and
  slow-header floods cannot lock a consumer out; a connection from an address at its own
  limit, or when every open connection is serving a request, is closed at once;
- a connection must send its first request's headers within `header_timeout_s` of being
  accepted (TLS handshake included); later requests on a kept-alive connection within
  aiohttp's `keepalive_timeout` (`idle_timeout_s`, set by the caller);
- accept errors (EMFILE, ENFILE, ENOBUFS...) pause accepting with backoff and close the
  oldest connection without a request; the process carries on.

A failed handshake is logged as `tls_handshake_failed` with the peer address and OpenSSL's
reason (asyncio alone hides it). This module never logs per connection for a limit: each
kind of trouble is counted and logged once per episode (`connections_limited`,
`accept_failed`).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import itertools
import resource
import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field

import msgspec
import structlog
from aiohttp import web

from broker.config import ListenConfig
from broker.enterprise.episodes import Episode
from broker.errors import ConfigError

ACCEPT_BATCH = 16  # connections taken per wake-up: bounds descriptors held past the limit
BACKLOG = 128  # the kernel's queue of connections not yet accepted
ACCEPT_RETRY_S = (0.05, 1.0)  # first and longest pause after a failed accept
EVICTION_SCAN = 16  # candidates looked at per eviction: bounds its cost under a flood
EPISODE_QUIET_S = 10.0  # a limit episode ends after this long without a hit
# Descriptors the half needs besides consumer connections: spool segment and position,
# audit segment, TLS, policy and metrics files while read, the MQTT and SIEM sockets and
# the SIEM export's audit readers, stdio, the event loop; plus a batch of accepts.
RESERVED_FILES = 64 + ACCEPT_BATCH

log = structlog.get_logger("tls")
limits_log = structlog.get_logger("listener")
DEFAULT_LIMITS = ListenConfig()

_CONNECTION: contextvars.ContextVar[_Connection] = contextvars.ContextVar("connection")


def request_started() -> None:
    """Called by the app for each request: a connection that sends one is a client, not a
    squatter: its header deadline ends and it is no longer closed to make room."""
    connection = _CONNECTION.get(None)
    if connection is not None and connection.waiting:
        connection.listener.served(connection)


def fit_to_file_limit(limits: ListenConfig) -> ListenConfig:
    """Raise the soft open-file limit to the hard one, and lower `max_connections` if it
    still does not fit, with a warning that says what to set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    room = soft - RESERVED_FILES
    if room < 1:
        raise ConfigError(
            f"enterprise.listen: the open-file limit ({soft}) leaves no room for connections; "
            f"raise it (LimitNOFILE) to at least {limits.max_connections + RESERVED_FILES}"
        )
    if limits.max_connections <= room:
        return limits
    limits_log.warning(
        "connection_limit_lowered",
        configured=limits.max_connections,
        effective=room,
        file_limit=soft,
        fix=f"raise LimitNOFILE to at least {limits.max_connections + RESERVED_FILES}",
    )
    return msgspec.structs.replace(
        limits,
        max_connections=room,
        max_connections_per_address=min(limits.max_connections_per_address, room),
    )


@dataclass(eq=False)
class _Connection:
    listener: Listener
    address: str
    sock: socket.socket
    transport: asyncio.Transport | None = None
    task: asyncio.Task[None] | None = None  # hands the socket to asyncio
    deadline: asyncio.TimerHandle | None = None
    waiting: bool = True  # no request yet
    closed: bool = False


@dataclass
class ConnectionStats:
    """What `/metrics` shows of the listener."""

    open: int = 0
    limited: Counter[str] = field(default_factory=Counter)  # by reason
    accept_errors: Counter[str] = field(default_factory=Counter)  # by errno name


class Listener:
    """Accepting sockets, the open connections, and their limits."""

    def __init__(
        self,
        server: web.Server,
        context: ssl.SSLContext,
        limits: ListenConfig,
        stats: ConnectionStats | None = None,
    ) -> None:
        self._server = server
        self._context = context
        self._limits = limits
        self._sockets: list[socket.socket] = []
        self._per_address: Counter[str] = Counter()
        self._waiting: dict[_Connection, None] = {}  # no request yet, oldest first
        self._silent: dict[_Connection, None] = {}  # not a byte yet (no TLS hello), oldest first
        self._open: set[_Connection] = set()
        self._pause = ACCEPT_RETRY_S[0]
        self._resume: asyncio.TimerHandle | None = None
        self._limited = Episode(limits_log, "connections_limited", "connections_limited_ended",
                                quiet_s=EPISODE_QUIET_S)  # fmt: skip
        self._accept_failing = Episode(limits_log, "accept_failed", "accept_recovered")
        self.stats = stats or ConnectionStats()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        self._accepting(True)

    def close(self) -> None:
        """Stop accepting (open connections are left to aiohttp's shutdown)."""
        self._accepting(False)
        if self._resume is not None:
            self._resume.cancel()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _accepting(self, on: bool) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            if on:
                loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                self._accept_failing.end()
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while queued
            except OSError as e:
                self._accept_failed(e)
                return
            self._pause = ACCEPT_RETRY_S[0]
            self._admit(sock, str(address[0]))

    def _accept_failed(self, e: OSError) -> None:
        """Out of descriptors or buffers: make room, pause, try again; never give up."""
        name = errno.errorcode.get(e.errno or 0, type(e).__name__)
        self.stats.accept_errors[name] += 1
        self._accept_failing.hit(name, error=e.strerror, retry_in_s=self._pause)
        self._evict_oldest_waiting()
        self._accepting(False)
        self._resume = asyncio.get_running_loop().call_later(self._pause, self._accepting, True)
        self._pause = min(ACCEPT_RETRY_S[1], self._pause * 2)

    def _admit(self, sock: socket.socket, address: str) -> None:
        limits = self._limits
        if self._per_address[address] >= limits.max_connections_per_address:
            sock.close()
            self._note("per_address", address)
            return
        if len(self._open) >= limits.max_connections and not self._evict_oldest_waiting():
            sock.close()
            self._note("overall", address)
            return
        sock.setblocking(False)
        connection = _Connection(self, address, sock)
        self._open.add(connection)
        self._per_address[address] += 1
        self._waiting[connection] = None
        self._silent[connection] = None
        self.stats.open = len(self._open)
        loop = asyncio.get_running_loop()
        connection.deadline = loop.call_later(limits.header_timeout_s, self._expire, connection)
        # Until its first byte, a connection is only a socket: no transport, no TLS state.
        loop.add_reader(sock.fileno(), self._spoke, connection)

    def _spoke(self, connection: _Connection) -> None:
        """The first bytes (a TLS hello, normally) or the end: start the handshake."""
        self._silent.pop(connection, None)
        asyncio.get_running_loop().remove_reader(connection.sock.fileno())
        try:
            gone = connection.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:  # left without a word: nothing to log, no handshake to start
            connection.sock.close()
            self.forget(connection)
            return
        connection.task = asyncio.get_running_loop().create_task(self._serve(connection))

    def _note(self, reason: str, address: str) -> None:
        self.stats.limited[reason] += 1
        self._limited.hit(reason, remote=address, open=len(self._open))

    def _evict_oldest_waiting(self) -> bool:
        """Close a connection that has not made a request, to make room: the oldest of an
        address that holds several (a flood comes from few addresses, a consumer holds one
        or two), silent ones (not even a TLS hello) before those under way."""
        if not self._waiting:
            return False
        oldest = self._victim()
        self._note("evicted", oldest.address)
        self.close_connection(oldest)
        return True

    def _victim(self) -> _Connection:
        for queue in (self._silent, self._waiting):
            for connection in itertools.islice(queue, EVICTION_SCAN):
                if self._per_address[connection.address] > 1:
                    return connection
        return next(iter(self._silent or self._waiting))

    def _expire(self, connection: _Connection) -> None:
        if connection.waiting and not connection.closed:
            self._note("header_timeout", connection.address)
            self.close_connection(connection)

    def served(self, connection: _Connection) -> None:
        connection.waiting = False
        self._waiting.pop(connection, None)
        if connection.deadline is not None:
            connection.deadline.cancel()

    def close_connection(self, connection: _Connection) -> None:
        """Close it now (or as soon as its transport exists) and stop counting it."""
        if not connection.closed:
            connection.closed = True
            if connection in self._silent:  # only a socket so far
                self._silent.pop(connection)
                asyncio.get_running_loop().remove_reader(connection.sock.fileno())
                connection.sock.close()
            elif connection.transport is not None:
                connection.transport.abort()
            # else: its hand-over to asyncio is under way and will close it (`_serve`)
        self.forget(connection)

    def forget(self, connection: _Connection) -> None:
        """The connection is gone: it no longer counts against any limit (idempotent)."""
        if connection not in self._open:
            return
        self.served(connection)
        self._open.discard(connection)
        self._per_address[connection.address] -= 1
        if not self._per_address[connection.address]:
            del self._per_address[connection.address]
        self.stats.open = len(self._open)

    async def _serve(self, connection: _Connection) -> None:
        if connection.closed:  # closed to make room before its turn came
            connection.sock.close()
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Handshake(connection, self._server, self._context, self._limits),
                connection.sock,
            )
        except OSError:
            connection.sock.close()
            self.forget(connection)


class _Handshake(asyncio.Protocol):
    """Owns a connection until its TLS handshake is done, then steps aside."""

    def __init__(
        self,
        connection: _Connection,
        server: web.Server,
        context: ssl.SSLContext,
        limits: ListenConfig,
    ) -> None:
        self._connection = connection
        self._server = server
        self._context = context
        self._timeout = limits.header_timeout_s + 1  # the header deadline, which covers the
        # handshake, comes first
        self._early: list[bytes] = []  # application data that came before the hand-over
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
        self._connection.listener.forget(self._connection)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        connection = self._connection
        listener = connection.listener
        _CONNECTION.set(connection)  # copied into the tasks aiohttp starts for it
        try:
            secure = await asyncio.get_running_loop().start_tls(
                transport, self, self._context, server_side=True,
                ssl_handshake_timeout=self._timeout,
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
            listener.forget(connection)
            return
        if secure is None or connection.closed:  # gone, or closed by a limit meanwhile
            listener.forget(connection)
            return
        handler = _Served(self._server(), connection)
        secure.set_protocol(handler)
        handler.connection_made(secure)
        for data in self._early:
            handler.data_received(data)


class _Served(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the listener told when it ends."""

    def __init__(self, handler: asyncio.Protocol, connection: _Connection) -> None:
        self._handler = handler
        self._connection = connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.listener.forget(self._connection)
        self._handler.connection_lost(exc)


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    limits: ListenConfig = DEFAULT_LIMITS,
    stats: ConnectionStats | None = None,
) -> Listener:
    """Start accepting; close the returned listener before `runner.cleanup()`."""
    server = runner.server
    assert server is not None, "call runner.setup() first"
    listener = Listener(server, context, limits, stats)
    await listener.start(host, port)
    return listener

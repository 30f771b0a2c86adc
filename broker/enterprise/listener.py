"""The consumer-facing listener: it accepts TCP itself, within limits, before any TLS.

Accepting here, not in asyncio's server, is what lets it keep the IT side's connections
within bounds the operator sets (ADR 0014):

- at most `max_connections` open at once, and `max_connections_per_address` per client
  address; at the overall limit, a connection that is not in a request is closed to make
  room: first the oldest of those that have not sent a byte (not even a TLS hello), then,
  among the rest, the oldest of a client (an address, an IPv6 /64) that has several waiting,
  then the oldest. A connection is in a request from the moment the API knows its consumer
  (`handshake.request_started`) until its response is written; an idle kept-alive
  connection, or one of an identity the policy does not know, may be closed. So idle,
  slow-header and stranger-certificate floods cannot lock a consumer out; a connection from
  an address at its own limit, or when every open connection is in a request, is closed at
  once;
- a connection must send its first request's headers within `header_timeout_s` of being
  accepted (TLS handshake included); later requests on a kept-alive connection within
  `idle_timeout_s` (aiohttp's keep-alive timeout, which `handshake.Served` sets);
- accept errors (EMFILE, ENFILE, ENOBUFS...) pause accepting with backoff and close a
  connection that is not in a request; the process carries on.

The TLS handshake and the hand-over to aiohttp are broker.enterprise.handshake's. This
module never logs per connection for a limit: each kind of trouble is counted and logged
once per episode (`connections_limited`, `accept_failed`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import resource
import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import structlog
from aiohttp import web

from broker.config import ListenConfig
from broker.enterprise.episodes import Episode
from broker.enterprise.handshake import Connection, Handshake, HttpErrors, Served
from broker.errors import ConfigError

ACCEPT_BATCH = 16  # connections taken per wake-up: bounds descriptors held past the limit
BACKLOG = 128  # the kernel's queue of connections not yet accepted
ACCEPT_RETRY_S = (0.05, 1.0)  # first and longest pause after a failed accept
EVICTION_SCAN = 16  # candidates looked at per eviction: bounds its cost under a flood
EPISODE_QUIET_S = 10.0  # a limit episode ends after this long without a hit
IPV6_CLIENT_PREFIX = 64  # one IPv6 host picks any address of its /64 (ADR 0014)
# Descriptors the half needs besides consumer connections: spool segment and position,
# audit segment, TLS, policy and metrics files while read, the MQTT and SIEM sockets and
# the SIEM export's audit readers, stdio, the event loop; plus a batch of accepts.
RESERVED_FILES = 64 + ACCEPT_BATCH

limits_log = structlog.get_logger("listener")
DEFAULT_LIMITS = ListenConfig()


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


def client_of(address: str) -> str:
    """Who holds a connection, for choosing one to close: the address, or for IPv6 its /64
    (a host there can use any of its 2^64 addresses)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return address


@dataclass
class ConnectionStats:
    """What `/metrics` shows of the listener."""

    open: int = 0
    limited: Counter[str] = field(default_factory=Counter)  # by reason
    accept_errors: Counter[str] = field(default_factory=Counter)  # by errno name
    http_errors: Counter[str] = field(default_factory=Counter)  # answered by aiohttp, by status


class ContextInForce(Protocol):
    """Holds the TLS context in force and replaces it on a reload (tls.EndpointReloader)."""

    @property
    def context(self) -> ssl.SSLContext: ...


class Listener:
    """Accepting sockets, the open connections, and their limits.

    Each new handshake takes the TLS context in force when it starts: a reloaded context
    serves every handshake after the reload, and established connections keep theirs.
    """

    def __init__(
        self,
        server: web.Server,
        tls: ssl.SSLContext | ContextInForce,
        limits: ListenConfig,
        stats: ConnectionStats | None = None,
    ) -> None:
        self._server = server
        self._tls = tls
        self._limits = limits
        self._sockets: list[socket.socket] = []
        self._per_address: Counter[str] = Counter()
        self._waiting: dict[Connection, None] = {}  # not in a request, oldest first
        self._silent: dict[Connection, None] = {}  # not a byte yet (no TLS hello), oldest first
        self._open: set[Connection] = set()
        self._pause = ACCEPT_RETRY_S[0]
        self._resume: asyncio.TimerHandle | None = None
        self._limited = Episode(limits_log, "connections_limited", "connections_limited_ended",
                                quiet_s=EPISODE_QUIET_S)  # fmt: skip
        self._accept_failing = Episode(limits_log, "accept_failed", "accept_recovered")
        self.stats = stats or ConnectionStats()
        self._http_errors = HttpErrors(self.stats.http_errors, EPISODE_QUIET_S)

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
        """Stop accepting, close every connection not handed to aiohttp yet (silent, or in
        its handshake) and end what is pending; aiohttp's shutdown closes the others."""
        self._accepting(False)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for connection in list(self._open):
            if connection.deadline is not None:
                connection.deadline.cancel()
            if not connection.handed_over:
                self.close_connection(connection)
        self._limited.end()
        self._accept_failing.end()
        self._http_errors.end()

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
        self._make_room()
        self._accepting(False)
        if self._resume is not None:  # one pause at a time: the latest, longest, counts
            self._resume.cancel()
        self._resume = asyncio.get_running_loop().call_later(self._pause, self._accepting, True)
        self._pause = min(ACCEPT_RETRY_S[1], self._pause * 2)

    def _admit(self, sock: socket.socket, address: str) -> None:
        limits = self._limits
        if self._per_address[address] >= limits.max_connections_per_address:
            sock.close()
            self._note("per_address", address)
            return
        if len(self._open) >= limits.max_connections and not self._make_room():
            sock.close()
            self._note("overall", address)
            return
        sock.setblocking(False)
        connection = Connection(self, address, sock)
        self._open.add(connection)
        self._per_address[address] += 1
        self._waiting[connection] = None
        self._silent[connection] = None
        self.stats.open = len(self._open)
        loop = asyncio.get_running_loop()
        connection.deadline = loop.call_later(limits.header_timeout_s, self._expire, connection)
        # Until its first byte, a connection is only a socket: no transport, no TLS state.
        loop.add_reader(sock.fileno(), self._spoke, connection)

    def _spoke(self, connection: Connection) -> None:
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

    def _make_room(self) -> bool:
        """Close a connection that is not in a request, if there is one."""
        if not self._waiting:
            return False
        victim = self._victim()
        self._note("evicted", victim.address)
        self.close_connection(victim)
        return True

    def _victim(self) -> Connection:
        """A connection that has not sent a byte, the oldest, whoever holds it: a consumer
        sends its hello at once, so such a connection is no consumer's. Else, among those
        waiting, the oldest of a client with several waiting (a flood comes from few
        clients; a consumer waits with one connection at a time), else the oldest."""
        if self._silent:
            return next(iter(self._silent))
        oldest = list(itertools.islice(self._waiting, EVICTION_SCAN))
        waiting_by_client = Counter(client_of(c.address) for c in oldest)
        for connection in oldest:
            if waiting_by_client[client_of(connection.address)] > 1:
                return connection
        return oldest[0]

    def _expire(self, connection: Connection) -> None:
        if connection.waiting and not connection.closed:
            self._note("header_timeout", connection.address)
            self.close_connection(connection)

    def served(self, connection: Connection) -> None:
        """In a request: its header deadline ends, and it is not closed to make room."""
        connection.waiting = False
        self._waiting.pop(connection, None)
        if connection.deadline is not None:
            connection.deadline.cancel()

    def idle(self, connection: Connection) -> None:
        """Its response is written and it waits for another request: it may be closed to
        make room again (the newest of those waiting)."""
        if connection in self._open and not connection.waiting and not connection.closed:
            connection.waiting = True
            self._waiting[connection] = None

    def close_connection(self, connection: Connection) -> None:
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

    def forget(self, connection: Connection) -> None:
        """The connection is gone: it no longer counts against any limit (idempotent)."""
        if connection not in self._open:
            return
        self.served(connection)
        self._open.discard(connection)
        self._per_address[connection.address] -= 1
        if not self._per_address[connection.address]:
            del self._per_address[connection.address]
        self.stats.open = len(self._open)

    async def _serve(self, connection: Connection) -> None:
        if connection.closed:  # closed to make room before its turn came
            connection.sock.close()
            return
        # The header deadline, which covers the handshake, comes first.
        timeout_s = self._limits.header_timeout_s + 1
        tls = self._tls
        context = tls if isinstance(tls, ssl.SSLContext) else tls.context
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: Handshake(connection, context, timeout_s, self._handler),
                connection.sock,
            )
        except OSError:
            connection.sock.close()
            self.forget(connection)

    def _handler(self, connection: Connection) -> Served:
        return Served(connection, self._server, self._http_errors, self._limits.idle_timeout_s)


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    tls: ssl.SSLContext | ContextInForce,
    *,
    limits: ListenConfig = DEFAULT_LIMITS,
    stats: ConnectionStats | None = None,
) -> Listener:
    """Start accepting with a fixed TLS context, or the one in force at each handshake;
    close the returned listener before `runner.cleanup()`. Each
    connection's aiohttp handler is made here (`handshake.Served`): the runner's handler
    options (`keepalive_timeout`, `access_log`) do not apply; `limits` sets the idle timeout,
    and there is no access log."""
    server = runner.server
    assert server is not None, "call runner.setup() first"
    listener = Listener(server, tls, limits, stats)
    await listener.start(host, port)
    return listener

"""The OPC UA server's TCP connections (asyncua 2.1.0's protocol, closed where it is open):
what anyone who can reach the port gets before proving anything, bounded (ADR 0025).

- Admission: at most `MAX_UNACTIVATED_PER_ADDRESS` connections without an activated session
  per remote address, and `max_connections` in all. A newcomer over either cap takes the
  place of the oldest connection of that scope that holds no trusted secure channel and is
  older than `EVICTABLE_AFTER_S`, else it is refused: Hellos alone cannot keep a client with
  a trusted certificate out, and an attacker cannot push out a client that just connected.
- Deadlines: a connection without a SignAndEncrypt channel of a trusted certificate is
  closed after `CHANNEL_S` (asyncua's watchdog closes one without an activated session
  after `ACTIVATION_S`).
- Framing: a chunk's size is read from its first 8 bytes, whatever arrived so far (a
  header cut by a slow link is waited for), and one claiming more than `MAX_CHUNK_BYTES`
  closes the connection before it is buffered. The first message is a Hello, there is one
  Hello, and its buffer sizes are at least 8,192 bytes (OPC UA Part 6 §7.1.2.3): a client
  asking for tiny chunks would make every answer thousands of chunks built on the loop.
  An Acknowledge from a client is refused too (asyncua would take its sizes as the limits).
- Fairness: the loop is yielded between two messages of one connection, and a connection
  whose answers are not read stops being read (its transport's buffer over the high-water
  mark, 64 KiB) and is dropped past `MAX_UNREAD_BYTES`.

The processor (`opcua_guard.GuardedProcessor`) does the checks that need a decoded message.
This module never writes to the address space, the spool, or anything the plant half reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import structlog
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import struct_from_binary, uatcp_to_binary

from broker.enterprise.outputs.opcua_space import status

log = structlog.get_logger("opcua_server")

MAX_CHUNK_BYTES = 65_535  # one chunk, refused before it is buffered whole
MIN_BUFFER_BYTES = 8192  # a Hello's Receive/SendBufferSize at least (OPC UA Part 6)
MAX_UNACTIVATED_PER_ADDRESS = 4  # connections without an activated session, per address
EVICTABLE_AFTER_S = 1.0  # a connection younger than this is never pushed out
CHANNEL_S = 3.0  # to open a SignAndEncrypt channel with a trusted certificate
MAX_UNREAD_BYTES = 4 * 1024 * 1024  # answers buffered for a client that does not read them

ProcessorFactory = Callable[[Any, Any, Any], UaProcessor]  # (iserver, transport, limits)


def secured(processor: UaProcessor | None) -> bool:
    """Whether a connection holds a SignAndEncrypt channel of a trusted certificate."""
    return (
        processor is not None
        and getattr(processor, "peer", None) is not None
        and processor._connection.is_open()
    )


class GuardedProtocol(OPCUAProtocol):
    """A connection: admitted, framed, paced and read as the module docstring says, with
    the processor `make_processor` makes instead of asyncua's."""

    make_processor: ProcessorFactory

    address: str | None = None
    opened_at = 0.0
    _hello = False
    _lost = False
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.opened_at = time.monotonic()
        name = transport.get_extra_info("peername")
        self.address = name[0] if isinstance(name, tuple) and name else None
        refusal = self._admission()
        if refusal is not None:
            _refused(name, "connection", *refusal)
            cast(asyncio.Transport, transport).abort()
            return
        super().connection_made(transport)
        if self.processor is None:
            return  # refused at max_connections
        self.processor = self.make_processor(self.iserver, self.transport, self.limits)
        self.processor.set_policies(self.policies)  # type: ignore[no-untyped-call]
        self._deadline = asyncio.get_running_loop().call_later(CHANNEL_S, self._channel_due)

    def _admission(self) -> tuple[str, str] | None:
        """Why this connection is refused, after pushing out an older one where it may."""
        mine = [c for c in self._peers() if c.address == self.address and not c.activated]
        if len(mine) >= MAX_UNACTIVATED_PER_ADDRESS and not self._evict(mine):
            return "too_many_connections", (
                f"{len(mine)} connections of this address without a session, "
                f"at most {MAX_UNACTIVATED_PER_ADDRESS}"
            )
        if len(self.clients) >= self.iserver.max_connections and not self._evict(self._peers()):
            return "no_room", f"{len(self.clients)} connections, all in use"
        return None

    def _peers(self) -> list[GuardedProtocol]:
        return [c for c in self.clients if isinstance(c, GuardedProtocol)]

    def _evict(self, candidates: list[GuardedProtocol]) -> bool:
        now = time.monotonic()
        idle = [
            c for c in candidates
            if not secured(c.processor) and now - c.opened_at >= EVICTABLE_AFTER_S
        ]  # fmt: skip
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.opened_at)
        _refused(oldest.peer_name, "connection", "pushed_out", "a newer connection took its place")
        self.clients.remove(oldest)  # now: asyncio reports the loss on its next turn
        if oldest.transport is not None:
            oldest.transport.abort()
        return True

    @property
    def activated(self) -> bool:
        session = self.processor.session if self.processor is not None else None
        return session is not None and session.is_activated()

    def _channel_due(self) -> None:
        if not secured(self.processor) and self.transport is not None:
            _refused(self.peer_name, "connection", "no_secure_channel",
                     f"no SignAndEncrypt channel of a trusted certificate within {CHANNEL_S:g} s")  # fmt: skip
            self.transport.close()

    def connection_lost(self, ex: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if not self._lost:
            self._lost = True
            super().connection_lost(ex)

    def data_received(self, data: bytes) -> None:
        if self.processor is None:
            return  # refused: nothing is read
        start = self._buffer[:8] if len(self._buffer) >= 8 else (self._buffer + data)[:8]
        if len(start) == 8 and int.from_bytes(start[4:8], "little") > MAX_CHUNK_BYTES:
            if self.transport is not None:
                self.transport.abort()
            return
        super().data_received(data)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()  # its answers wait: read nothing more

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def _process_one_msg(self, header: Any, buf: Buffer) -> bool:
        await asyncio.sleep(0)  # the other connections and the half's tasks run in between
        refusal = self._hello_refusal(header, buf)
        if refusal is not None:
            self._close_with_error(*refusal)
            return False
        kept = bool(await super()._process_one_msg(header, buf))
        transport = self.transport
        if kept and transport is not None and transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            _refused(self.peer_name, "connection", "not_reading",
                     f"more than {MAX_UNREAD_BYTES} bytes of answers unread")  # fmt: skip
            transport.abort()
            return False
        return kept

    def _hello_refusal(self, header: Any, buf: Buffer) -> tuple[str, str, int] | None:
        """Why a message breaks the Hello's rules (module docstring), or None."""
        invalid = StatusCodes.BadTcpMessageTypeInvalid
        kind = header.MessageType
        if kind == ua.MessageType.Acknowledge:  # asyncua would take its sizes as its limits
            return "acknowledge", "a client sends no Acknowledge", invalid
        if kind != ua.MessageType.Hello:
            return (
                None if self._hello else ("no_hello", "a connection starts with a Hello", invalid)
            )
        if self._hello:
            return "second_hello", "one Hello per connection", invalid
        try:
            hello = struct_from_binary(ua.Hello, buf.copy())
        except Exception:  # whatever asyncua's decoder raises on bytes it cannot read
            return "hello_unreadable", "the Hello cannot be read", StatusCodes.BadTcpInternalError
        smallest = min(hello.ReceiveBufferSize, hello.SendBufferSize)
        if smallest < MIN_BUFFER_BYTES:
            detail = f"buffer size {smallest}, at least {MIN_BUFFER_BYTES}"
            return "buffer_too_small", detail, StatusCodes.BadTcpInternalError
        self._hello = True
        return None

    def _close_with_error(self, reason: str, detail: str, code: int) -> None:
        _refused(self.peer_name, "connection", reason, detail)
        if self.transport is not None:
            close_with_error(self.transport, code, detail)


def close_with_error(transport: Any, code: int, detail: str) -> None:
    """Answer an Error (OPC UA Part 6 §7.1.2.5) and close: how every refusal ends."""
    error = ua.ErrorMessage(status(code), ua.String(detail))
    transport.write(uatcp_to_binary(cast(ua.MessageType, ua.MessageType.Error), error))
    transport.close()


def remote_of(name: Any) -> str | None:
    """host:port of a peer name as asyncio gives it."""
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else None


def _refused(name: Any, stage: str, reason: str, detail: str) -> None:
    log.warning(
        "opcua_client_refused", stage=stage, reason=reason, detail=detail, remote=remote_of(name)
    )


class ConnectionServer(BinaryServer):
    """asyncua's BinaryServer on a socket bound beforehand (its own start would bind
    again), making `GuardedProtocol`s whose processors `make_processor` makes."""

    make_processor: ProcessorFactory
    listening: asyncio.Server

    async def start(self) -> None:
        self._server = self.listening
        self.cleanup_task = asyncio.create_task(self._close_task_loop())
        await self.listening.start_serving()

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = GuardedProtocol(
            self.iserver, self._policies, self.clients, self.closing_tasks, self.limits
        )
        protocol.make_processor = self.make_processor
        return protocol

"""How much an OPC UA server can make the plant half hold: one message, its chunks, one chunk.

asyncua's client enforces none of it by itself: it announces no limit in its Hello, takes
whatever the server's Acknowledge says as its own receive limits (0: none), and buffers a
chunk of whatever size its header announces before checking anything. A hostile or broken
server could stream chunks until the plant half's memory limit kills it, and every device
with it. Here the client announces MAX_MESSAGE_BYTES and MAX_CHUNKS, keeps them whatever the
server acknowledges, and drops the connection as soon as a chunk outgrows the message limit.
A message over the limit fails the request (BadRequestTooLarge): the device goes down and is
retried like any other session failure. This module must never loosen a limit asyncua sets.
"""

from __future__ import annotations

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UASocketProtocol
from asyncua.common.connection import TransportLimits

# A Read or Publish response of 1,000 values (ITEMS_PER_CALL) with texts at their limit
# (opcua_types.MAX_TEXT_BYTES) stays below 5 MiB; a server sending more is refused.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_CHUNKS = 1024  # 8 MiB in chunks of 8,192 bytes, the smallest a server may use (Part 6)
_HEADER_BYTES = 8  # a chunk's message type, chunk type and size


class _Limits(TransportLimits):
    """The receive limits, kept when the server's Acknowledge says otherwise."""

    def update_client_limits(self, msg: ua.Acknowledge) -> None:
        super().update_client_limits(msg)
        self.max_message_size = _tighter(self.max_message_size, MAX_MESSAGE_BYTES)
        self.max_chunk_count = _tighter(self.max_chunk_count, MAX_CHUNKS)
        self.max_recv_buffer = _tighter(self.max_recv_buffer, MAX_MESSAGE_BYTES)


def _tighter(announced: int, ours: int) -> int:
    return ours if announced <= 0 else min(announced, ours)


class _BoundedProtocol(UASocketProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # What is left unparsed is one incomplete chunk: past the limit, it is a chunk no
        # message may hold, and waiting for the rest of it is what the server wants.
        if self.receive_buffer is not None and (
            len(self.receive_buffer) > MAX_MESSAGE_BYTES + _HEADER_BYTES
        ):
            self.receive_buffer = None
            self.disconnect_socket()  # pending requests fail: the session is lost


def bounded_client(endpoint: str, timeout_s: float) -> Client:
    """An asyncua client whose connections hold at most MAX_MESSAGE_BYTES of the server's."""
    client = Client(endpoint, timeout=timeout_s)
    client.max_messagesize, client.max_chunkcount = MAX_MESSAGE_BYTES, MAX_CHUNKS  # in Hello
    uaclient = client.uaclient
    make_protocol = uaclient._make_protocol

    def bounded() -> UASocketProtocol:
        protocol = make_protocol()  # asyncua's, with every hook it sets
        protocol.__class__ = _BoundedProtocol  # adds a check, holds no state of its own
        protocol._connection._limits = _Limits(
            max_recv_buffer=TransportLimits.max_recv_buffer,  # until the server acknowledges
            max_send_buffer=TransportLimits.max_send_buffer,
            max_chunk_count=MAX_CHUNKS,
            max_message_size=MAX_MESSAGE_BYTES,
        )
        return protocol

    uaclient._make_protocol = bounded  # type: ignore[method-assign]
    return client

"""The diode's UDP sockets (ADR 0019): where the receiver is, and how large the kernel's
buffers are, for both ends.

It resolves and sizes; it never sends, receives, binds or connects a socket.
"""

from __future__ import annotations

import socket
from typing import Any

from broker.config import DiodeConfig
from broker.errors import ConfigError

SOCKET_BUFFER = 8 * 1024 * 1024  # bytes, each end's: bursts at the full rate
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python does not name it


def address(diode: DiodeConfig) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The receiver's address, as the sender sends to it and the receiver binds it."""
    try:
        infos = socket.getaddrinfo(diode.host, diode.port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise ConfigError(f"diode.host: cannot resolve {diode.host!r}: {e}") from e
    family, _, _, _, resolved = infos[0]
    return family, resolved


def enlarge_receive_buffer(sock: socket.socket) -> None:
    """SOCKET_BUFFER to absorb bursts: past net.core.rmem_max only with CAP_NET_ADMIN
    (SO_RCVBUFFORCE); otherwise as much as rmem_max allows (docs/deployment.md)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)

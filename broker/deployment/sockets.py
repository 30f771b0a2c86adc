"""Which sockets a process listens on, and how they compare with a declared manifest.

Listening: TCP sockets in LISTEN and UDP sockets bound without a peer (psutil, which reads
the reader's network namespace: run it in the halves'), and unix sockets the kernel flags as
listening (/proc/PID/net/unix, matched by inode). A connected socket (a client, a socketpair) is not listening.
This module only reads /proc; it never opens, closes or binds a socket of the process.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import psutil

from broker.safe_files import read_regular

_LISTENING_UNIX = 0x10000  # __SO_ACCEPTCON in /proc/PID/net/unix's Flags column
_PROC_LIMIT = 64 * 1024 * 1024  # /proc/PID/net/unix of a busy host stays far below this


class Socket(msgspec.Struct, frozen=True, order=True):
    protocol: Literal["tcp", "udp", "unix"]
    address: str  # an IP address (compressed), or a unix socket's path (`@…`: abstract)
    port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return f"{self.protocol} {self.address}"
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol} {host}:{self.port}"


class SocketCheck(msgspec.Struct, frozen=True):
    expected: list[Socket]
    extra: list[Socket]  # listening, not in the manifest
    missing: list[Socket]  # in the manifest, not listening
    matches: bool


def listening(process: psutil.Process) -> list[Socket]:
    """The sockets `process` listens on; psutil.Error or OSError when they cannot be read
    (psutil.AccessDenied: only root or the process's user may)."""
    connections = process.net_connections(kind="inet")
    inodes = _socket_inodes(process.pid)
    unix = read_regular(Path(f"/proc/{process.pid}/net/unix"), _PROC_LIMIT)
    found = inet_listening(connections) + unix_listening(unix.decode(errors="replace"), inodes)
    return sorted(set(found))


def compare(expected: Sequence[Socket], listening: Iterable[Socket]) -> SocketCheck:
    """The sockets listening beyond the manifest, and those of the manifest not listening."""
    found, wanted = set(listening), set(expected)
    extra, missing = sorted(found - wanted), sorted(wanted - found)
    return SocketCheck(sorted(wanted), extra, missing, not extra and not missing)


def inet_listening(connections: Iterable[Any]) -> list[Socket]:
    """From psutil's connections of one process (`laddr`, `raddr`, `type`, `status`)."""
    found = []
    for c in connections:
        if not c.laddr:
            continue
        if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
            found.append(Socket("tcp", ip(c.laddr.ip), c.laddr.port))
        elif c.type == socket.SOCK_DGRAM and not c.raddr:
            found.append(Socket("udp", ip(c.laddr.ip), c.laddr.port))
    return found


def unix_listening(proc_net_unix: str, inodes: set[str]) -> list[Socket]:
    """The listening unix sockets among `inodes`, from the text of /proc/PID/net/unix."""
    found = []
    for line in proc_net_unix.splitlines()[1:]:
        fields = line.split(maxsplit=7)
        if len(fields) < 7 or fields[6] not in inodes:
            continue
        try:
            flags = int(fields[3], 16)
        except ValueError:
            continue
        if flags & _LISTENING_UNIX:
            found.append(Socket("unix", fields[7] if len(fields) == 8 else "(unnamed)"))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def ip(text: str) -> str:
    """`text` as one IP address is written (compressed, without a zone), else as it is."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).compressed
    except ValueError:
        return text

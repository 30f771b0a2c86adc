"""What a packet capture showed, protocol by protocol: the types the protocol readers
(modbus.py, dnp3.py, bacnet.py) produce and the rest of passive discovery consumes.

Passive discovery reads a file someone else captured (a SPAN port, a tap): nothing in
`broker.passive` opens a socket or sends a packet. A reader turns the bytes a poller and a
device exchanged into `Request`s (what was asked, when, by whom), `Values` (what an answer or
a write carried, address by address) and `Description`s (a name or unit a device gave for a
point). A point is addressed the same way for every protocol: (server, unit, table,
address), whose meaning each protocol gives below. Bad input is never an exception out of
a reader: it is one `Warnings.add`, and the reader goes on with the next frame it can trust.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["modbus", "dnp3", "bacnet"]
Value = bool | int | float | str

# `table` and `address`, per protocol:
# - modbus: "coil", "discrete_input", "holding_register", "input_register" (policy names);
#   the 0-based address; a register's value is its raw 16-bit word (0-65535), a bit a bool.
# - dnp3: the static group as a string ("1", "3", "10", "20", "21", "30", "40"; an event
#   group is reported as its static one); the point index; the value as decoded
#   (bool, int, float, or a double-bit word such as "on").
# - bacnet: the object type as the policy writes it ("analog-input", ...); the instance;
#   the present-value as decoded (float, bool, int).
# `unit`: the Modbus unit id; the DNP3 outstation's link address; the BACnet device
# instance, or UNKNOWN_UNIT when the capture never showed it.
UNKNOWN_UNIT = -1


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    host: str  # an IPv4 or IPv6 address as text
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Request:
    """One request a poller sent to a device, as the capture shows it."""

    protocol: Protocol
    time: float  # capture time of the request, seconds since the epoch
    client: str  # the poller's address
    server: Peer
    unit: int
    table: str  # "" for a request that names no table (a DNP3 class poll)
    start: int
    count: int  # points asked for (0 for a class poll)
    function: str  # for the evidence: "FC3", "READ class 0", "ReadPropertyMultiple", ...
    write: bool  # a write or a control (Modbus FC 5/6/15/16, DNP3 operate, BACnet WriteProperty)


@dataclass(frozen=True, slots=True)
class Values:
    """The values one answer (or one write) carried for consecutive addresses of one table."""

    protocol: Protocol
    time: float  # capture time of the answer (of the request for a write)
    server: Peer
    unit: int
    table: str
    start: int
    values: tuple[Value, ...]  # values[i] is address start + i
    written: bool = False  # what a poller wrote, not what the device answered


@dataclass(frozen=True, slots=True)
class Description:
    """What a device said about one point: its name, units, description (BACnet)."""

    protocol: Protocol
    server: Peer
    unit: int
    table: str
    address: int
    name: str | None = None
    units: str | None = None  # in the policy's unit words where known, else the device's
    description: str | None = None


Observation = Request | Values | Description


class Warnings:
    """What a capture held that discovery could not use: counted by kind, with where the
    first one was (`packet 1234`, `10.0.0.5:502 → 10.0.0.7:49152 at byte 88`), bounded."""

    MAX_KINDS = 64  # distinct kinds kept; more are counted under "other"

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._first: dict[str, str] = {}

    def add(self, kind: str, where: str) -> None:
        if kind not in self._first and len(self._first) >= self.MAX_KINDS:
            kind = "other"
        self._counts[kind] += 1
        self._first.setdefault(kind, where)

    def items(self) -> list[tuple[str, int, str]]:
        """(kind, count, where the first was), most frequent first."""
        return [(kind, n, self._first[kind]) for kind, n in self._counts.most_common()]

    def __len__(self) -> int:
        return self._counts.total()

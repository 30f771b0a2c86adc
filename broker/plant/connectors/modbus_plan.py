"""The Modbus request planner: which read requests one scan of a device sends.

Pure: no I/O. Per unit id and table it plans the fewest requests that read every modelled
address and no other one, within the protocol's limits (125 registers, 2,000 bits). A request
never bridges a gap between modelled addresses, even when bridging would save a request;
signals that touch or overlap may share one; a signal is never split across two. The only
Modbus function codes in the code base are in `READ_FUNCTIONS` (1–4, reads); nothing here or
anywhere else names a write function code. ADR 0008 gives the argument that the plan is a
minimum.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from broker.policy import ModbusSource, Signal
from broker.policy.schema import ModbusTable

# table → (function code, client method, most items one request may ask for)
READ_FUNCTIONS: dict[ModbusTable, tuple[int, str, int]] = {
    "coil": (1, "read_coils", 2000),
    "discrete_input": (2, "read_discrete_inputs", 2000),
    "holding_register": (3, "read_holding_registers", 125),
    "input_register": (4, "read_input_registers", 125),
}
_TABLE_ORDER = {table: i for i, table in enumerate(READ_FUNCTIONS)}

Span = tuple[int, int]  # [start, end): the addresses one signal occupies


@dataclass(frozen=True)
class Slot:
    signal: str
    offset: int  # position of the signal's first item in the response
    width: int


@dataclass(frozen=True)
class ReadRequest:
    unit_id: int
    table: ModbusTable
    address: int
    count: int
    slots: tuple[Slot, ...]

    @property
    def function_code(self) -> int:
        return READ_FUNCTIONS[self.table][0]


@dataclass(frozen=True)
class Window:
    start: int
    end: int
    members: tuple[int, ...]  # indices of the spans it reads


def cover(spans: Sequence[Span], limit: int) -> list[Window]:
    """The fewest windows of at most `limit` addresses that hold every span whole and read
    no address outside the spans' union.

    Per block of contiguous modelled addresses, greedily: a window starts at the lowest start
    not yet read and takes every unread span that ends within `limit` of it. Any window holding
    that lowest span holds no span this one lacks, so greedy is never worse (ADR 0008).
    """
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    windows: list[Window] = []
    block: list[int] = []
    block_end = -1
    for i in order:
        start, end = spans[i]
        if end - start > limit:
            raise ValueError(f"a span of {end - start} exceeds the request limit of {limit}")
        if block and start > block_end:  # a gap: nothing may read across it
            windows.extend(_cover_block(spans, block, limit))
            block = []
        block_end = max(block_end, end) if block else end
        block.append(i)
    if block:
        windows.extend(_cover_block(spans, block, limit))
    return windows


def _cover_block(spans: Sequence[Span], block: list[int], limit: int) -> list[Window]:
    """Greedy cover of one gap-free block; `block` is sorted by start."""
    windows = []
    unread = block
    while unread:
        start = spans[unread[0]][0]
        taken = [i for i in unread if spans[i][1] <= start + limit]
        unread = [i for i in unread if spans[i][1] > start + limit]
        windows.append(Window(start, max(spans[i][1] for i in taken), tuple(taken)))
    return windows


def modbus_source(signal: Signal) -> ModbusSource:
    assert isinstance(signal.source, ModbusSource)  # the policy loader matched it to the device
    return signal.source


def plan_reads(signals: Sequence[Signal], default_unit_id: int) -> list[ReadRequest]:
    """One scan's requests, by unit id, table and address."""
    groups: dict[tuple[int, ModbusTable], list[Signal]] = defaultdict(list)
    for signal in signals:
        source = modbus_source(signal)
        unit = default_unit_id if source.unit_id is None else source.unit_id
        groups[unit, source.table].append(signal)
    requests: list[ReadRequest] = []
    for (unit, table), group in sorted(
        groups.items(), key=lambda g: (g[0][0], _TABLE_ORDER[g[0][1]])
    ):
        sources = [modbus_source(s) for s in group]
        spans = [(s.address, s.address + s.width) for s in sources]
        for window in cover(spans, READ_FUNCTIONS[table][2]):
            slots = tuple(
                Slot(group[i].path, spans[i][0] - window.start, sources[i].width)
                for i in window.members
            )
            requests.append(
                ReadRequest(unit, table, window.start, window.end - window.start, slots)
            )
    return requests

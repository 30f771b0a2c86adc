"""DNP3 requests in a capture: the function codes by name, which of them change an outstation,
and a request's object headers → the points it reads (`reads`) or the controls it carries
with the values they set (`object_headers`, `commanded`). Pure parsing for dnp3.py; it never sends.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Final, NamedTuple

from broker.passive.observations import Observation, Request, Value
from broker.plant.connectors.dnp3_frames import FrameError
from broker.plant.connectors.dnp3_objects import STATIC_GROUP
from broker.plant.decode import float32_text

# IEEE 1815-2012 table 4-1: the request function codes, by name.
FUNCTIONS: Final = (
    "CONFIRM", "READ", "WRITE", "SELECT", "OPERATE", "DIRECT_OPERATE", "DIRECT_OPERATE_NR",
    "IMMED_FREEZE", "IMMED_FREEZE_NR", "FREEZE_CLEAR", "FREEZE_CLEAR_NR", "FREEZE_AT_TIME",
    "FREEZE_AT_TIME_NR", "COLD_RESTART", "WARM_RESTART", "INITIALIZE_DATA",
    "INITIALIZE_APPLICATION", "START_APPLICATION", "STOP_APPLICATION", "SAVE_CONFIGURATION",
    "ENABLE_UNSOLICITED", "DISABLE_UNSOLICITED", "ASSIGN_CLASS", "DELAY_MEASURE",
    "RECORD_CURRENT_TIME", "OPEN_FILE", "CLOSE_FILE", "DELETE_FILE", "GET_FILE_INFO",
    "AUTHENTICATE_FILE", "ABORT_FILE", "ACTIVATE_CONFIG", "AUTHENTICATE_REQ", "AUTH_REQ_NO_ACK",
)  # fmt: skip
# Requests that change nothing in the outstation; every other one counts as a write.
READ_ONLY: Final = frozenset({"READ", "DELAY_MEASURE", "GET_FILE_INFO"})
OPERATES = frozenset({"OPERATE", "DIRECT_OPERATE", "DIRECT_OPERATE_NR"})
CONTROLS = OPERATES | {"SELECT"}
POINT_TABLES: Final = frozenset({1, 3, 10, 20, 21, 30, 40})  # static groups of points

# Object header qualifiers: index/count width of ranges, counts, and index-prefixed lists
_RANGES = {0x00: 1, 0x01: 2, 0x02: 4}
_COUNTS = {0x07: 1, 0x08: 2, 0x09: 4}
_PREFIXED = {0x17: 1, 0x28: 2, 0x39: 4}
_ALL = 0x06
# Control objects: size, and the static group whose point they command
CONTROL_OBJECTS: Final = {
    (12, 1): (11, 10),  # control relay output block
    (41, 1): (5, 40), (41, 2): (3, 40), (41, 3): (5, 40), (41, 4): (9, 40),  # analog outputs
}  # fmt: skip
_ANALOG_OUTPUT = {1: "<i", 2: "<h", 3: "<f", 4: "<d"}
_LATCH_ON, _LATCH_OFF, _CLOSE, _TRIP = 3, 4, 1, 2


class Header(NamedTuple):
    """One object header of a request, with the indexes it names (None: all points)."""

    group: int
    variation: int
    indexes: range | list[int] | None
    objects: list[bytes]  # the objects it carries (controls), one per index


RequestMaker = Callable[[str, int, int, str], Request]  # table, start, count, function


def object_headers(apdu: bytes, *, controls: bool) -> Iterator[Header]:
    """The object headers of a request (from byte 2), with the objects of a control."""
    pos = 2

    def take(size: int, what: str) -> bytes:
        nonlocal pos
        if pos + size > len(apdu):
            raise FrameError(f"{what} at byte {pos} needs {size} bytes, {len(apdu) - pos} left")
        pos += size
        return apdu[pos - size : pos]

    while pos < len(apdu):
        group, variation, qualifier = take(3, "an object header")
        number = f"g{group}v{variation} qualifier 0x{qualifier:02x}"
        size = 0
        if controls:
            if (group, variation) not in CONTROL_OBJECTS:
                raise FrameError(f"{number}: not a control object this reader knows")
            size = CONTROL_OBJECTS[group, variation][0]
        indexes, prefix = _range(qualifier, take, number)
        if controls and indexes is None:
            raise FrameError(f"{number}: a control names its points")
        count = len(indexes) if indexes is not None else 0
        if count * (prefix + size) > len(apdu) - pos:  # never trust a count over the bytes
            raise FrameError(f"{number}: {count} objects, {len(apdu) - pos} bytes left")
        objects, listed = [], []
        for _ in range(count if prefix or size else 0):
            if prefix:
                listed.append(int.from_bytes(take(prefix, number), "little"))
            objects.append(take(size, number))
        # an index-prefixed header names the indexes its objects carry
        yield Header(group, variation, listed if prefix else indexes, objects)


def _range(
    qualifier: int, take: Callable[[int, str], bytes], number: str
) -> tuple[range | None, int]:
    """The indexes a header's qualifier and range name (None: all points; for an
    index-prefixed list, as many as its count says), and the octets of each index prefix."""
    if qualifier in _RANGES:
        width = _RANGES[qualifier]
        first = int.from_bytes(take(width, number), "little")
        last = int.from_bytes(take(width, number), "little")
        if last < first:
            raise FrameError(f"{number}: range {first}..{last} runs backwards")
        return range(first, last + 1), 0
    if qualifier in _COUNTS:
        return range(int.from_bytes(take(_COUNTS[qualifier], number), "little")), 0
    if qualifier in _PREFIXED:
        prefix = _PREFIXED[qualifier]
        return range(int.from_bytes(take(prefix, number), "little")), prefix
    if qualifier != _ALL:
        raise FrameError(f"{number}: qualifier not read")
    return None, 0


def reads(headers: list[Header], request: RequestMaker) -> list[Observation]:
    """A READ's Requests: one for its class poll, one per run of points of a table named.
    Headers of other groups (time, attributes, files) ask for no point and give none."""
    classes = sorted({h.variation - 1 for h in headers if h.group == 60 and 1 <= h.variation <= 4})
    observations: list[Observation] = []
    if classes:
        observations.append(request("", 0, 0, "READ class " + " ".join(map(str, classes))))
    for h in headers:
        table = STATIC_GROUP.get(h.group, h.group)
        if table not in POINT_TABLES:
            continue
        what = f"READ g{h.group}v{h.variation}"
        if h.indexes is None:
            observations.append(request(str(table), 0, 0, what))
            continue
        runs = (
            _runs(h.indexes) if isinstance(h.indexes, list) else [(h.indexes.start, len(h.indexes))]
        )
        for start, count in runs:  # a range stays a range: 2^32 indexes are never listed
            observations.append(request(str(table), start, count, what))
    return observations


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """(start, count) of each run of consecutive indexes, in order."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and index == sum(runs[-1]):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def commanded(header: Header, body: bytes) -> Value | None:
    """The value a control sets: an analog output's number; a relay's latch or
    trip/close state (None for a pulse, which leaves no state)."""
    if header.group == 41:
        (value,) = struct.unpack_from(_ANALOG_OUTPUT[header.variation], body)
        return float(float32_text(value)) if header.variation == 3 else value
    code = body[0]
    operation, trip_close = code & 0x0F, code >> 6
    if operation == _LATCH_ON or trip_close == _CLOSE:
        return True
    if operation == _LATCH_OFF or trip_close == _TRIP:
        return False
    return None

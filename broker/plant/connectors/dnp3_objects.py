"""DNP3 application layer of a read-only master (IEEE 1815-2012, clauses 4 and A).

Encodes the only two requests the master sends, READ (integrity and event polls, static
ranges) and CONFIRM (of a response that asks for one), and parses responses: the
application header, the internal indications (IIN) and the objects of the groups the
connector reads (binary and double-bit inputs, binary output status, counters, frozen
counters, analog inputs, analog output status, static and event variations), their flags
and times. Groups 50, 51, 52, 80 and the octet strings 110 and 111 (whose variation is
their length) are sized and passed over (a g51 common time of occurrence dates the relative
times after it). Pure functions of bytes.

This module must never build any function code but READ (1) and CONFIRM (0):
`FUNCTIONS_SENT` names them, and no encoder of another exists. It never allocates from a
count an object header claims: every count is checked against the bytes present first.
An object it cannot size stops the parse of that fragment, keeping what came before and
saying in `skipped` what was lost; it never guesses a size.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple

from broker.plant.connectors.dnp3_frames import FrameError
from broker.plant.decode import float32_text
from broker.records import Quality

FUNCTIONS_SENT: Final = {"CONFIRM": 0, "READ": 1}
RESPONSE: Final = 129
UNSOLICITED_RESPONSE: Final = 130

# Application control octet
_FIR, _FIN, _CON, _UNS, _SEQ = 0x80, 0x40, 0x20, 0x10, 0x0F

_IIN_NAMES: Final = (
    # IIN1, bit 0 upwards
    "BROADCAST", "CLASS_1_EVENTS", "CLASS_2_EVENTS", "CLASS_3_EVENTS",
    "NEED_TIME", "LOCAL_CONTROL", "DEVICE_TROUBLE", "DEVICE_RESTART",
    # IIN2
    "NO_FUNC_CODE_SUPPORT", "OBJECT_UNKNOWN", "PARAMETER_ERROR", "EVENT_BUFFER_OVERFLOW",
    "ALREADY_EXECUTING", "CONFIG_CORRUPT", "RESERVED_2", "RESERVED_1",
)  # fmt: skip

# Flags octet: bits 0..4 are common to every point type, 5..7 depend on it (by static group)
_ONLINE, _COMM_LOST = 0x01, 0x04
_COMMON_FLAGS = (
    (0x02, "RESTART"),
    (0x04, "COMM_LOST"),
    (0x08, "REMOTE_FORCED"),
    (0x10, "LOCAL_FORCED"),
)
_TYPE_FLAGS: Final[dict[int, tuple[tuple[int, str], ...]]] = {
    1: ((0x20, "CHATTER_FILTER"),),
    3: ((0x20, "CHATTER_FILTER"),),
    10: (),
    20: ((0x20, "ROLLOVER"), (0x40, "DISCONTINUITY")),
    21: ((0x20, "ROLLOVER"), (0x40, "DISCONTINUITY")),
    30: ((0x20, "OVER_RANGE"), (0x40, "REFERENCE_ERR")),
    40: ((0x20, "OVER_RANGE"), (0x40, "REFERENCE_ERR")),
}
STATIC_GROUP: Final = {2: 1, 4: 3, 11: 10, 22: 20, 23: 21, 32: 30, 42: 40}  # event → static
DOUBLE_BIT: Final = ("intermediate", "off", "on", "indeterminate")


class Header(NamedTuple):
    """One object header of a READ: all points of a group (0x06) or an index range."""

    group: int
    variation: int
    qualifier: int  # 0x00 (1-octet start/stop), 0x01 (2-octet), 0x06 (all)
    start: int = 0
    stop: int = 0


def class_header(cls: int) -> Header:
    """Class 0 (static data, the integrity poll) or the events of class 1..3: g60v1..v4."""
    if not 0 <= cls <= 3:
        raise ValueError(f"class {cls} is not 0..3")
    return Header(60, cls + 1, 0x06)


def range_header(group: int, variation: int, start: int, stop: int) -> Header:
    """Points start..stop of a group (variation 0: the outstation's default)."""
    if not (0 <= group <= 255 and 0 <= variation <= 255):
        raise ValueError(f"g{group}v{variation} is not a group and variation")
    if not 0 <= start <= stop <= 0xFFFF:
        raise ValueError(f"index range {start}..{stop} is not within 0..65535")
    return Header(group, variation, 0x00 if stop <= 0xFF else 0x01, start, stop)


def _encode(header: Header) -> bytes:
    octets = bytes((header.group, header.variation, header.qualifier))
    if header.qualifier == 0x06:
        return octets
    width = {0x00: 1, 0x01: 2}[header.qualifier]
    return octets + header.start.to_bytes(width, "little") + header.stop.to_bytes(width, "little")


def _control(seq: int, *, unsolicited: bool = False) -> int:
    if not 0 <= seq <= _SEQ:
        raise ValueError(f"application sequence {seq} is not 0..15")
    return _FIR | _FIN | (_UNS if unsolicited else 0) | seq


def read_request(seq: int, headers: Sequence[Header]) -> bytes:
    """A READ APDU (one fragment: FIR and FIN) of these object headers."""
    if not headers:
        raise ValueError("a READ names at least one object header")
    return bytes((_control(seq), FUNCTIONS_SENT["READ"])) + b"".join(map(_encode, headers))


def confirm(seq: int, *, unsolicited: bool) -> bytes:
    """The CONFIRM of the response (or unsolicited response) with sequence `seq`."""
    return bytes((_control(seq, unsolicited=unsolicited), FUNCTIONS_SENT["CONFIRM"]))


class Point(NamedTuple):
    group: int  # the STATIC group: an event of g32 is reported as 30, g2 as 1, …
    variation: int  # the variation it came in
    index: int  # type: ignore[assignment]  # the contract's name, over tuple.index
    value: bool | int | float | str  # double-bit: "off"|"on"|"intermediate"|"indeterminate"
    flags: int | None  # the flags octet; None for variations without flags
    time: datetime | None  # UTC, when the variation carries one
    event: bool


class Response(NamedTuple):
    function: int  # 129 RESPONSE or 130 UNSOLICITED_RESPONSE
    seq: int
    first: bool
    final: bool
    confirm: bool
    unsolicited: bool
    iin: int  # IIN1 | IIN2 << 8
    points: list[Point]
    skipped: list[str]  # headers not decoded, and why


class _Layout(NamedTuple):
    """How the objects of one group and variation are laid out."""

    number: str  # struct format of the value; "" when the state is in the flags
    flags: bool
    time: int  # 0, 6 (absolute, ms since 1970 UTC), 2 (ms after the g51 CTO)
    packed: int = 0  # bits per point of a packed variation (no flags, no number)

    @property
    def size(self) -> int:
        return self.flags + (struct.calcsize("<" + self.number) if self.number else 0) + self.time


_STATE = _Layout("", True, 0)
_COUNTER_EVENTS = {
    1: _Layout("I", True, 0), 2: _Layout("H", True, 0), 3: _Layout("I", True, 0),
    4: _Layout("H", True, 0), 5: _Layout("I", True, 6), 6: _Layout("H", True, 6),
    7: _Layout("I", True, 6), 8: _Layout("H", True, 6),
}  # fmt: skip
_ANALOG_EVENTS = {
    1: _Layout("i", True, 0), 2: _Layout("h", True, 0), 3: _Layout("i", True, 6),
    4: _Layout("h", True, 6), 5: _Layout("f", True, 0), 6: _Layout("d", True, 0),
    7: _Layout("f", True, 6), 8: _Layout("d", True, 6),
}  # fmt: skip
_VALUES: Final[dict[tuple[int, int], _Layout]] = {
    (1, 1): _Layout("", False, 0, packed=1), (1, 2): _STATE,
    (2, 1): _STATE, (2, 2): _STATE._replace(time=6), (2, 3): _STATE._replace(time=2),
    (3, 1): _Layout("", False, 0, packed=2), (3, 2): _STATE,
    (4, 1): _STATE, (4, 2): _STATE._replace(time=6), (4, 3): _STATE._replace(time=2),
    (10, 1): _Layout("", False, 0, packed=1), (10, 2): _STATE,
    (11, 1): _STATE, (11, 2): _STATE._replace(time=6),
    **{(20, v): _COUNTER_EVENTS[v] for v in (1, 2, 3, 4)},
    (20, 5): _Layout("I", False, 0), (20, 6): _Layout("H", False, 0),
    (20, 7): _Layout("I", False, 0), (20, 8): _Layout("H", False, 0),
    **{(21, v): layout for v, layout in _COUNTER_EVENTS.items()},
    (21, 9): _Layout("I", False, 0), (21, 10): _Layout("H", False, 0),
    (21, 11): _Layout("I", False, 0), (21, 12): _Layout("H", False, 0),
    **{(22, v): layout for v, layout in _COUNTER_EVENTS.items()},
    **{(23, v): layout for v, layout in _COUNTER_EVENTS.items()},
    (30, 1): _Layout("i", True, 0), (30, 2): _Layout("h", True, 0),
    (30, 3): _Layout("i", False, 0), (30, 4): _Layout("h", False, 0),
    (30, 5): _Layout("f", True, 0), (30, 6): _Layout("d", True, 0),
    **{(32, v): layout for v, layout in _ANALOG_EVENTS.items()},
    (40, 1): _Layout("i", True, 0), (40, 2): _Layout("h", True, 0),
    (40, 3): _Layout("f", True, 0), (40, 4): _Layout("d", True, 0),
    **{(42, v): layout for v, layout in _ANALOG_EVENTS.items()},
}  # fmt: skip
# Sized and passed over: time and date, common time of occurrence, time delay, IIN bits.
_PASSED_OVER: Final[dict[tuple[int, int], _Layout]] = {
    (50, 1): _Layout("", False, 6), (50, 2): _Layout("I", False, 6),
    (50, 3): _Layout("", False, 6), (50, 4): _Layout("IB", False, 6),
    (51, 1): _Layout("", False, 6), (51, 2): _Layout("", False, 6),
    (52, 1): _Layout("H", False, 0), (52, 2): _Layout("H", False, 0),
    (80, 1): _Layout("", False, 0, packed=1),
}  # fmt: skip
# Qualifier → (index prefix octets, range octets, whether the range is start/stop or a count)
_QUALIFIERS: Final = {
    0x00: (0, 1, True), 0x01: (0, 2, True),
    0x07: (0, 1, False), 0x08: (0, 2, False),
    0x17: (1, 1, False), 0x28: (2, 2, False),
}  # fmt: skip
_OCTET_STRINGS = (110, 111)  # static and event; the variation is the length in octets
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_response(apdu: bytes) -> Response:
    """The response or unsolicited response in one fragment; FrameError when malformed."""
    if len(apdu) < 4:
        raise FrameError(f"a response of {len(apdu)} bytes, shorter than its 4-byte header")
    control, function = apdu[0], apdu[1]
    if function not in (RESPONSE, UNSOLICITED_RESPONSE):
        raise FrameError(f"function code {function} at byte 1 is no response")
    unsolicited = bool(control & _UNS)
    if unsolicited != (function == UNSOLICITED_RESPONSE):
        raise FrameError(
            f"function code {function} with the UNS bit {'set' if unsolicited else 'clear'}"
        )
    parser = _Objects(apdu)
    parser.run()
    return Response(
        function=function,
        seq=control & _SEQ,
        first=bool(control & _FIR),
        final=bool(control & _FIN),
        confirm=bool(control & _CON),
        unsolicited=unsolicited,
        iin=apdu[2] | apdu[3] << 8,
        points=parser.points,
        skipped=parser.skipped,
    )


class _Objects:
    """The object headers of one response, read front to back."""

    def __init__(self, apdu: bytes) -> None:
        self.apdu = apdu
        self.pos = 4
        self.cto: datetime | None = None  # from the last g51 object
        self.points: list[Point] = []
        self.skipped: list[str] = []

    def take(self, size: int, what: str) -> bytes:
        if self.pos + size > len(self.apdu):
            raise FrameError(
                f"{what} at byte {self.pos} needs {size} bytes, {len(self.apdu) - self.pos} left"
            )
        chunk = self.apdu[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def run(self) -> None:
        while self.pos < len(self.apdu):
            start = self.pos
            group, variation, qualifier = self.take(3, "an object header")
            name = f"g{group}v{variation}"
            layout = _VALUES.get((group, variation)) or _passed_over(group, variation)
            shape = _QUALIFIERS.get(qualifier)
            if layout is None or shape is None or (layout.packed and shape[0]):
                why = f"qualifier 0x{qualifier:02x}" if layout else "an object it cannot size"
                self.skipped.append(
                    f"{name} at byte {start}: not read ({why}); "
                    f"the {len(self.apdu) - start} bytes from there are lost"
                )
                return
            prefix, width, is_range = shape
            first = int.from_bytes(self.take(width, f"{name}'s range"), "little")
            if is_range:
                last = int.from_bytes(self.take(width, f"{name}'s range"), "little")
                if last < first:
                    raise FrameError(
                        f"{name} at byte {start}: range {first}..{last} runs backwards"
                    )
                count = last - first + 1
            else:
                count, first = first, 0
            size = (
                -(-count * layout.packed // 8) if layout.packed else count * (prefix + layout.size)
            )
            if size > len(self.apdu) - self.pos:
                raise FrameError(
                    f"{name} at byte {start}: {count} objects need {size} bytes, "
                    f"{len(self.apdu) - self.pos} present"
                )
            body = self.take(size, name)
            if (group, variation) not in _VALUES:
                if group == 51 and count:
                    self.cto = _time(body[-6:])  # None when out of range: relative times skipped
            elif not (prefix or is_range):
                self.skipped.append(f"{name} at byte {start}: a count without indexes; not read")
            elif layout.time == 2 and self.cto is None:
                self.skipped.append(
                    f"{name} at byte {start}: relative times with no g51 before them; not read"
                )
            else:
                self.points += _points(
                    (group, variation), layout, body, first=first, prefix=prefix, count=count,
                    cto=self.cto,
                )  # fmt: skip


def _passed_over(group: int, variation: int) -> _Layout | None:
    if group in _OCTET_STRINGS and variation:
        return _Layout(f"{variation}s", False, 0)
    return _PASSED_OVER.get((group, variation))


def _points(
    key: tuple[int, int],
    layout: _Layout,
    body: bytes,
    *,
    first: int,
    prefix: int,
    count: int,
    cto: datetime | None,
) -> list[Point]:
    group, variation = key
    static = STATIC_GROUP.get(group, group)
    event = group != static
    if layout.packed:
        per_byte = 8 // layout.packed
        mask = (1 << layout.packed) - 1
        states = [
            body[i // per_byte] >> (i % per_byte * layout.packed) & mask for i in range(count)
        ]
        return [
            Point(
                static,
                variation,
                first + i,
                DOUBLE_BIT[s] if static == 3 else bool(s),
                None,
                None,
                event,
            )
            for i, s in enumerate(states)
        ]
    number = struct.Struct("<" + layout.number) if layout.number else None
    points = []
    step = prefix + layout.size
    for n in range(count):
        item = body[n * step : (n + 1) * step]
        index = int.from_bytes(item[:prefix], "little") if prefix else first + n
        pos = prefix
        flags = item[pos] if layout.flags else None
        pos += layout.flags
        value: bool | int | float | str
        if number is None:
            state = flags or 0
            value = DOUBLE_BIT[state >> 6] if static == 3 else bool(state & 0x80)
        else:
            (number_value,) = number.unpack_from(item, pos)
            pos += number.size
            if layout.number == "f" and math.isfinite(number_value):
                number_value = float(float32_text(number_value))  # 21.5, not the double's noise
            value = number_value
        when = None
        if layout.time == 6:
            when = _time(item[pos : pos + 6])
        elif layout.time == 2 and cto is not None:
            delay = timedelta(milliseconds=int.from_bytes(item[pos : pos + 2], "little"))
            when = cto + delay if cto <= datetime.max.replace(tzinfo=UTC) - delay else None
        points.append(Point(static, variation, index, value, flags, when, event))
    return points


def _time(octets: bytes) -> datetime | None:
    """A 48-bit time (ms since 1970 UTC); None past the year 9999 (some devices send all
    ones for "no time"): the point keeps its value, `quality_of` says its time is lost."""
    try:
        return _EPOCH + timedelta(milliseconds=int.from_bytes(octets, "little"))
    except OverflowError:
        return None


def quality_of(point: Point) -> tuple[Quality, str | None]:
    """The quality the point's flags give, and the flags that made it so; `uncertain` when
    its variation carries a time that could not be read."""
    no_time = point.time is None and _carries_time(point)
    if point.flags is None:
        return ("uncertain", _NO_TIME) if no_time else ("good", None)
    flags = point.flags
    named = [name for bit, name in _COMMON_FLAGS + _TYPE_FLAGS.get(point.group, ()) if flags & bit]
    if not flags & _ONLINE or flags & _COMM_LOST:
        return "bad", "DNP3 flags: " + ", ".join(
            named if flags & _ONLINE else ["not ONLINE", *named]
        )
    if named:
        return "uncertain", "DNP3 flags: " + ", ".join(named) + ("; " + _NO_TIME if no_time else "")
    return ("uncertain", _NO_TIME) if no_time else ("good", None)


_NO_TIME: Final = "DNP3: the point's time is out of range (past the year 9999)"
_EVENT_GROUP: Final = {static: event for event, static in STATIC_GROUP.items()}


def _carries_time(point: Point) -> bool:
    group = _EVENT_GROUP.get(point.group, point.group) if point.event else point.group
    layout = _VALUES.get((group, point.variation))
    return layout is not None and layout.time != 0


def indications(iin: int) -> list[str]:
    """The names of the IIN bits set in `iin` (IIN1 | IIN2 << 8), from IIN1.0 up."""
    return [name for bit, name in enumerate(_IIN_NAMES) if iin >> bit & 1]

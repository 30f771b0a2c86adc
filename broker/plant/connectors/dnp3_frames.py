"""DNP3 link and transport layers of a read-only master (IEEE 1815-2012, clauses 9 and 8).

Link frames: 0x05 0x64, length, control, destination, source (little-endian), a CRC over
that header, then the user data in blocks of 16 bytes each followed by its CRC-16/DNP.
Transport: one octet (FIN, FIR, a 6-bit sequence) in front of each segment of at most 249
bytes of an application fragment (APDU).

`Channel` is one master↔outstation link, sans-I/O: `request` turns an APDU into the frames
to send, `receive` turns bytes from the outstation into whole APDUs, and `replies` gives
the link answers the outstation is owed. The master sends its user data as primary frames
with DIR=1, PRM=1 and function UNCONFIRMED_USER_DATA, so the outstation's link owes nothing
back and no link reset is ever needed.

This module must never originate a link request (no RESET_LINK_STATES, no
TEST_LINK_STATES, no REQUEST_LINK_STATUS): it answers only what the outstation's primary
frames are owed by a secondary (IEEE 1815-2012 clause 9): REQUEST_LINK_STATUS with
LINK_STATUS; RESET_LINK_STATES, TEST_LINK_STATES and CONFIRMED_USER_DATA with ACK. It never accepts
a frame that is not from the configured outstation to the configured master, a frame whose
CRC is wrong, or a fragment over MAX_FRAGMENT; it never allocates from a length the peer
claims beyond what one frame can hold. It builds no application function code: that is
dnp3_objects' job, which builds READ and CONFIRM only.
"""

from __future__ import annotations

from typing import Final


class FrameError(ValueError):
    """Bytes from the outstation that are no valid DNP3 frame or fragment; says what and
    where. The connection they came on can no longer be trusted to be in step."""


MAX_FRAGMENT: Final = 2048  # bytes of one reassembled APDU accepted
SEGMENT_PAYLOAD: Final = 249  # bytes of an APDU per transport segment (250 user data - header)
MAX_ADDRESS: Final = 0xFFEF  # 0xFFF0..0xFFFF are reserved and broadcast addresses

START: Final = b"\x05\x64"
_HEADER = 10  # start, length, control, destination, source, CRC
_BLOCK = 16
_MAX_USER_DATA = 250  # length octet 255 minus control and addresses

# Control octet
DIR: Final = 0x80  # set in frames from a master
PRM: Final = 0x40  # primary (initiating) frame
FCB: Final = 0x20
FCV: Final = 0x10  # in a primary frame; DFC in a secondary one
# Link function codes (the low four bits of the control octet)
PRI_RESET_LINK_STATES: Final = 0
PRI_TEST_LINK_STATES: Final = 2
PRI_CONFIRMED_USER_DATA: Final = 3
PRI_UNCONFIRMED_USER_DATA: Final = 4
PRI_REQUEST_LINK_STATUS: Final = 9
SEC_ACK: Final = 0
SEC_NACK: Final = 1
SEC_LINK_STATUS: Final = 11
SEC_NOT_SUPPORTED: Final = 15
_CARRIES_DATA = frozenset({PRI_CONFIRMED_USER_DATA, PRI_UNCONFIRMED_USER_DATA})

# Transport header
FIN: Final = 0x80
FIR: Final = 0x40
_SEQ = 0x3F


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA6BC if crc & 1 else crc >> 1  # 0x3D65, reflected
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/DNP: polynomial 0x3D65, reflected, initial 0, final XOR 0xFFFF."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFF


def _with_crc(data: bytes) -> bytes:
    return data + crc16(data).to_bytes(2, "little")


def encode_frame(control: int, destination: int, source: int, user_data: bytes = b"") -> bytes:
    """One link frame: header with its CRC, then the user data in CRC'd 16-byte blocks."""
    if len(user_data) > _MAX_USER_DATA:
        raise ValueError(f"{len(user_data)} bytes of user data, at most {_MAX_USER_DATA} fit")
    for name, address in (("destination", destination), ("source", source)):
        if not 0 <= address <= 0xFFFF:
            raise ValueError(f"{name} address {address} is not 16 bits")
    header = START + bytes((5 + len(user_data), control & 0xFF))
    header += destination.to_bytes(2, "little") + source.to_bytes(2, "little")
    blocks = (user_data[i : i + _BLOCK] for i in range(0, len(user_data), _BLOCK))
    return _with_crc(header) + b"".join(_with_crc(block) for block in blocks)


def segment(apdu: bytes, seq: int) -> list[bytes]:
    """The transport segments (header octet + payload) of one APDU, numbered from `seq`."""
    if not apdu:
        raise ValueError("an empty APDU has no segments")
    chunks = [apdu[i : i + SEGMENT_PAYLOAD] for i in range(0, len(apdu), SEGMENT_PAYLOAD)]
    return [
        bytes(((seq + n) & _SEQ | (FIR if n == 0 else 0) | (FIN if n == len(chunks) - 1 else 0),))
        + chunk
        for n, chunk in enumerate(chunks)
    ]


class Reassembler:
    """Transport reception (IEEE 1815-2012 8.2): segments in, whole APDUs out.

    A FIR segment starts a new fragment (dropping one in progress); a segment without FIR
    and no fragment in progress, or out of sequence, is discarded; a fragment that would
    grow past MAX_FRAGMENT is a FrameError."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._next_seq = 0

    def add(self, tpdu: bytes) -> bytes | None:
        """The APDU this segment completes, or None."""
        header, payload = tpdu[0], tpdu[1:]
        seq = header & _SEQ
        if header & FIR:
            self._parts, self._size = [], 0
        elif not self._parts or seq != self._next_seq:
            return None
        if self._size + len(payload) > MAX_FRAGMENT:
            self._parts, self._size = [], 0
            raise FrameError(f"fragment grows past {MAX_FRAGMENT} bytes (segment seq {seq})")
        self._parts.append(payload)
        self._size += len(payload)
        self._next_seq = (seq + 1) & _SEQ
        if not header & FIN:
            return None
        apdu = b"".join(self._parts)
        self._parts, self._size = [], 0
        return apdu or None  # a fragment of nothing carries no application header


class Channel:
    """One master↔outstation link, sans-I/O; see the module docstring."""

    def __init__(self, master: int, outstation: int) -> None:
        for name, address in (("master", master), ("outstation", outstation)):
            if not 0 <= address <= MAX_ADDRESS:
                raise ValueError(f"{name} address {address} is not in 0..{MAX_ADDRESS}")
        if master == outstation:
            raise ValueError(f"master and outstation share address {master}")
        self.master = master
        self.outstation = outstation
        self._tx_seq = 0
        self._buffer = b""
        self._rx = Reassembler()
        self._replies: list[bytes] = []
        self._answered: set[int] = set()  # link services answered for this receive() call
        self._link_status = encode_frame(DIR | SEC_LINK_STATUS, outstation, master)
        self._ack = encode_frame(DIR | SEC_ACK, outstation, master)
        self._checked_header = b""  # the last header whose CRC matched: a repeat is not redone
        self._last_fcb: int | None = None  # of the last CONFIRMED_USER_DATA accepted
        self._offset = 0  # bytes received before the buffer: where an error is

    def request(self, apdu: bytes) -> bytes:
        """The link frames (UNCONFIRMED_USER_DATA, transport-segmented) carrying `apdu`."""
        segments = segment(apdu, self._tx_seq)
        self._tx_seq = (self._tx_seq + len(segments)) & _SEQ
        control = DIR | PRM | PRI_UNCONFIRMED_USER_DATA
        return b"".join(encode_frame(control, self.outstation, self.master, s) for s in segments)

    def replies(self) -> bytes:
        """The link answers owed to the outstation, once; b"" when none."""
        owed, self._replies = b"".join(self._replies), []
        return owed

    def receive(self, chunk: bytes) -> list[bytes]:
        """Whole APDUs from the outstation completed by `chunk`, in order."""
        buffer = self._buffer + chunk
        self._answered.clear()
        apdus = []
        pos = 0  # sliced once at the end: a large chunk costs linear time, not quadratic
        try:
            while len(buffer) - pos >= _HEADER:
                frame_size = self._check_header(buffer[pos : pos + _HEADER])
                if len(buffer) - pos < frame_size:
                    break
                apdu = self._frame(buffer[pos : pos + frame_size])
                pos += frame_size
                self._offset += frame_size
                if apdu is not None:
                    apdus.append(apdu)
        finally:
            self._buffer = buffer[pos:]
        if not START.startswith(self._buffer[:2]):  # checked early: never wait on garbage
            raise FrameError(f"no frame start (05 64) at byte {self._offset}")
        return apdus

    def _check_header(self, header: bytes) -> int:
        """The size of the frame this verified header starts."""
        where = f"frame at byte {self._offset}"
        if header[:2] != START:
            raise FrameError(f"no frame start (05 64) at byte {self._offset}")
        if header != self._checked_header:  # a flood repeats one frame: one CRC, not one each
            if int.from_bytes(header[8:10], "little") != crc16(header[:8]):
                raise FrameError(f"{where}: header CRC does not match")
            self._checked_header = header
        length = header[2]
        if length < 5:
            raise FrameError(f"{where}: length {length} is below the minimum 5")
        user = length - 5
        return _HEADER + user + 2 * -(-user // _BLOCK)

    def _frame(self, frame: bytes) -> bytes | None:
        where = f"frame at byte {self._offset}"
        control = frame[3]
        destination = int.from_bytes(frame[4:6], "little")
        source = int.from_bytes(frame[6:8], "little")
        if (source, destination) != (self.outstation, self.master):
            raise FrameError(
                f"{where}: from {source} to {destination}, "
                f"not from outstation {self.outstation} to master {self.master}"
            )
        if control & DIR:
            raise FrameError(f"{where}: DIR bit set, a master's frame")
        data = bytearray()
        for start in range(_HEADER, len(frame), _BLOCK + 2):
            block = frame[start : min(start + _BLOCK + 2, len(frame))]
            if int.from_bytes(block[-2:], "little") != crc16(block[:-2]):
                raise FrameError(f"{where}: CRC of the data block at byte {start} does not match")
            data += block[:-2]
        function = control & 0x0F
        if not control & PRM:
            return None  # a secondary frame answers a request this master never sends
        if (function in _CARRIES_DATA) != bool(data):
            raise FrameError(f"{where}: link function {function} with {len(data)} bytes of data")
        self._owe(function)
        if function == PRI_CONFIRMED_USER_DATA:
            fcb = control & FCB
            if control & FCV and fcb == self._last_fcb:
                return None  # a repeat of a frame whose ACK was lost: acknowledged, not used
            self._last_fcb = fcb
        elif function != PRI_UNCONFIRMED_USER_DATA:
            return None  # link status, reset or test link states: answered; anything else: ignored
        return self._rx.add(bytes(data))

    def _owe(self, function: int) -> None:
        """The answer a secondary owes to the outstation's primary frame of `function`.

        A primary waits for the answer to each frame before it sends the next, so a chunk
        holding many link-service requests is a flood: one LINK_STATUS, and one ACK per reset
        or test, answers them all (answering each would amplify the flood, and cost a frame's
        encoding each). Every CONFIRMED_USER_DATA frame gets its ACK, as the standard needs."""
        if function == PRI_CONFIRMED_USER_DATA:
            self._replies.append(self._ack)
        elif function in (PRI_REQUEST_LINK_STATUS, PRI_RESET_LINK_STATES, PRI_TEST_LINK_STATES):
            # An outstation that uses link confirms resets (and tests) its link to us before
            # its confirmed data and waits for the ACK our secondary owes: an answer, not a
            # request of ours.
            if function not in self._answered:
                self._answered.add(function)
                link_status = function == PRI_REQUEST_LINK_STATUS
                self._replies.append(self._link_status if link_status else self._ack)
            if function == PRI_RESET_LINK_STATES:
                self._last_fcb = None  # the next confirmed frame is new, whatever its FCB

"""Hostile and broken captures through `dmzbroker discover pcap`, end to end: malformed
frames, wrong and huge claimed lengths, garbage, zero-length packets, a file cut short give
warnings and exit 0 with what could be read; a file that is no capture at all is one error
line and exit 2. Never a traceback."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from broker.cli import main
from tests.harness import dmzbroker
from tests.passive.conftest import discover
from tests.passive.plant_capture import PLC_HOST, SCADA_HOST, T0, write_conversation

pytestmark = pytest.mark.timeout(120)


def mbap(transaction: int, pdu: bytes, *, protocol: int = 0, length: int | None = None) -> bytes:
    size = len(pdu) + 1 if length is None else length
    return struct.pack(">HHHB", transaction, protocol, size, 1) + pdu


def read(transaction: int) -> bytes:
    return mbap(transaction, struct.pack(">BHH", 3, 0, 2))  # holding registers 0-1


def answer(transaction: int, first: int, second: int) -> bytes:
    return mbap(transaction, struct.pack(">BBHH", 3, 4, first, second))


def good(transaction: int, at: float) -> list[tuple[float, bool, bytes]]:
    """A read of holding registers 0-1 and its answer; both values change from one to the
    next (a register that never changed is not proposed)."""
    return [
        (at, True, read(transaction)),
        (at + 0.001, False, answer(transaction, int(at) % 97, 3 * int(at) % 89)),
    ]


def hostile_messages() -> list[tuple[float, bool, bytes]]:
    garbage = random.Random(18).randbytes(300)
    return [
        *good(1, T0),
        (T0 + 1, True, mbap(2, struct.pack(">BHH", 3, 0, 2), protocol=7)),  # not Modbus
        (T0 + 1.001, False, mbap(3, b"\x03\x02\x00", length=0)),  # zero length
        (T0 + 2, True, mbap(4, struct.pack(">BHH", 3, 0, 2), length=0xFFFF)),  # huge length
        *good(5, T0 + 3),
        (T0 + 4, True, read(6)),
        (T0 + 4.001, False, mbap(6, struct.pack(">BB", 3, 40) + b"\x00\x01")),  # count ≠ bytes
        (T0 + 5, True, garbage),
        (T0 + 6, True, mbap(7, b"\x2b\x0e\x01\x00")),  # FC 43: neither a read nor a write
        (T0 + 6.001, False, mbap(7, b"\xab\x01")),
        (T0 + 7, True, read(8)),
        (T0 + 7.001, False, mbap(8, b"\x83\x02")),  # an exception
        (T0 + 8, False, answer(99, 1, 2)),  # an answer to nothing asked
        (T0 + 9, False, b""),  # an empty segment
        *(m for i in range(10) for m in good(10 + i, T0 + 10 + i)),
    ]


def broken_frames() -> list[tuple[float, bytes, None]]:
    """Frames broken below Modbus, and garbage for the DNP3 and BACnet/IP readers."""
    ether = Ether(src="02:00:0a:00:00:05", dst="02:00:0a:00:00:07")
    ip = IP(src=SCADA_HOST, dst=PLC_HOST)
    garbage = random.Random(19).randbytes(200)
    frames = [
        b"",  # a zero-length frame
        bytes(ether)[:5],  # cut inside the Ethernet header
        bytes(ether / IP(src=SCADA_HOST, dst=PLC_HOST, len=2000) / TCP(dport=502)),  # IP too long
        bytes(ether / ip / TCP(dport=502, dataofs=2) / Raw(b"xx")),  # TCP header too short
        bytes(ether / IP(src=SCADA_HOST, dst=PLC_HOST, frag=100, proto=6) / Raw(garbage[:40])),
        bytes(ether / ip / TCP(sport=40_000, dport=20_000, flags="PA", seq=1) / Raw(garbage)),
        bytes(ether / ip / UDP(sport=47_808, dport=47_808) / Raw(garbage[:120])),
        bytes(ether / ip / UDP(sport=47_808, dport=47_808) / Raw(b"\x81\x0a\xff\xff" + garbage)),
    ]
    return [(T0 + 9.5 + i * 0.01, frame, None) for i, frame in enumerate(frames)]


def registers(found: dict[str, Any]) -> set[tuple[str, int]]:
    draft = yaml.safe_load(found["draft"])
    return {(s["source"]["table"], s["source"]["address"]) for s in draft["signals"]}


def test_hostile_frames_are_warnings_and_the_good_ones_still_count(tmp_path: Path) -> None:
    capture = write_conversation(tmp_path / "hostile.pcap", hostile_messages(), broken_frames())
    found = discover(capture)
    assert len(found["warnings"]) >= 5, found["warnings"]
    assert registers(found) == {("holding_register", 0), ("holding_register", 1)}
    draft = tmp_path / "draft.yaml"
    draft.write_text(found["draft"])
    assert main(["policy", "compile", str(draft), "--out", str(tmp_path / "draft.dsse.json")]) == 0


def record_offsets(capture: bytes) -> list[int]:
    """Where each record of a classic pcap file starts."""
    offsets, at = [], 24
    while at < len(capture):
        offsets.append(at)
        at += 16 + struct.unpack_from("<I", capture, at + 8)[0]
    return offsets


@pytest.mark.parametrize("into", [16 + 20, 9], ids=["inside-a-record", "inside-a-record-header"])
def test_a_capture_cut_short_keeps_what_came_before(tmp_path: Path, into: int) -> None:
    messages = [m for i in range(12) for m in good(1 + i, T0 + i)]
    capture = write_conversation(tmp_path / "cut.pcap", messages)
    whole = capture.read_bytes()
    last_answer = record_offsets(whole)[-4]  # before the three of the closing handshake
    capture.write_bytes(whole[: last_answer + into])
    found = discover(capture)
    assert found["warnings"]
    assert registers(found) == {("holding_register", 0), ("holding_register", 1)}


def test_a_record_claiming_gigabytes_is_a_warning(tmp_path: Path) -> None:
    capture = write_conversation(
        tmp_path / "huge.pcap", [m for i in range(4) for m in good(i, T0 + i)]
    )
    with capture.open("ab") as f:  # a record header claiming 2 GB, then a few bytes
        f.write(struct.pack("<IIII", int(T0) + 10, 0, 0x7FFF_FFFF, 0x7FFF_FFFF) + b"\x00" * 64)
    found = discover(capture)
    assert found["warnings"]
    assert registers(found) == {("holding_register", 0), ("holding_register", 1)}


@pytest.mark.parametrize(
    "content",
    [b"", b"GET / HTTP/1.1\r\n\r\n" * 10, random.Random(20).randbytes(4096)],
    ids=["empty", "text", "garbage"],
)
def test_a_file_that_is_no_capture_is_one_error_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not-a-capture.pcap"
    path.write_bytes(content)
    result = dmzbroker("discover", "pcap", str(path), check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("dmzbroker: error:") and str(path) in line


def test_a_missing_file_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "missing.pcap"
    result = dmzbroker("discover", "pcap", str(path), check=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("dmzbroker: error:") and str(path) in line

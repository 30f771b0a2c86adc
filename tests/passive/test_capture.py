"""broker.passive.capture: capture files written by scapy (pcap, pcapng, gzip, nanosecond)
read back into TCP/UDP payloads, through every link layer it claims; broken packets and
broken files give warnings (or CaptureError for a non-capture), never an exception."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet as ScapyPacket
from scapy.utils import PcapNgWriter, PcapWriter

from broker.passive.capture import CaptureError, Packet, packets
from broker.passive.observations import Peer, Warnings

SCADA, PLC = "10.0.0.5", "10.0.0.7"
REQUEST = bytes.fromhex("000100000006010300000002")  # Modbus read 2 holding registers
T0 = 1_700_000_000.25


def _ether() -> Ether:
    return Ether(src="02:00:00:00:00:05", dst="02:00:00:00:00:07")


def _tcp(payload: bytes = REQUEST, seq: int = 1000, flags: str = "PA") -> ScapyPacket:
    return IP(src=SCADA, dst=PLC) / TCP(sport=40001, dport=502, seq=seq, flags=flags) / payload


def _write(path: Path, frames: list[ScapyPacket | bytes], linktype: int = 1, **kw: bool) -> Path:
    """A pcap of `frames` (scapy packets or raw bytes), packet i at T0 + i."""
    with PcapWriter(str(path), linktype=linktype, **kw) as writer:
        writer.write_header(None)
        for i, frame in enumerate(frames):
            writer.write_packet(
                bytes(frame), sec=int(T0 + i), usec=250_000 * (1000 if kw.get("nano") else 1)
            )
    if linktype == 0:  # scapy's writer takes 0 for "not given" and writes Ethernet's 1
        with path.open("r+b") as file:
            file.seek(20)
            file.write(struct.pack("=I", 0))
    return path


def _read(path: Path) -> tuple[list[Packet], Warnings]:
    warnings = Warnings()
    return list(packets(path, warnings)), warnings


def _kinds(warnings: Warnings) -> dict[str, int]:
    return {kind: n for kind, n, _ in warnings.items()}


def test_ethernet_tcp_and_udp_read_with_times_numbers_and_flags(tmp_path: Path) -> None:
    frames: list[ScapyPacket | bytes] = [
        _ether() / _tcp(b"", seq=999, flags="S"),
        _ether() / _tcp(),
        _ether() / ARP(),  # other traffic: skipped silently, still numbered
        _ether() / IP(src=SCADA, dst=PLC) / ICMP(),
        _ether() / IP(src=PLC, dst="10.0.0.255") / UDP(sport=47808, dport=47808) / b"bacnet",
    ]
    got, warnings = _read(_write(tmp_path / "c.pcap", frames))
    assert len(warnings) == 0
    assert got == [
        Packet(1, T0, "tcp", Peer(SCADA, 40001), Peer(PLC, 502), b"", 999, 0x02),
        Packet(2, T0 + 1, "tcp", Peer(SCADA, 40001), Peer(PLC, 502), REQUEST, 1000, 0x18),
        Packet(5, T0 + 4, "udp", Peer(PLC, 47808), Peer("10.0.0.255", 47808), b"bacnet"),
    ]


@pytest.mark.parametrize(
    ("linktype", "frame"),
    [
        (1, _ether() / Dot1Q(vlan=10) / _tcp()),
        (1, _ether() / Dot1AD(vlan=20) / Dot1Q(vlan=10) / _tcp()),  # QinQ
        (1, _ether() / Dot1Q(type=0x8100) / Dot1Q(vlan=10) / _tcp()),  # old-style double tag
        (113, CookedLinux(proto=0x0800) / _tcp()),
        (276, CookedLinuxV2(proto=0x0800) / _tcp()),
        (101, _tcp()),
        (12, _tcp()),
        (228, _tcp()),
        (0, struct.pack("<I", 2) + bytes(_tcp())),  # BSD loopback, little-endian host
        (0, struct.pack(">I", 2) + bytes(_tcp())),  # ... written by a big-endian host
        (108, struct.pack(">I", 2) + bytes(_tcp())),  # OpenBSD loopback
    ],
    ids=[
        "vlan",
        "qinq",
        "double-8100",
        "sll",
        "sll2",
        "raw",
        "raw12",
        "ipv4",
        "null-le",
        "null-be",
        "loop",
    ],
)
def test_link_layers(tmp_path: Path, linktype: int, frame: ScapyPacket | bytes) -> None:
    got, warnings = _read(_write(tmp_path / "c.pcap", [frame], linktype))
    assert len(warnings) == 0
    assert [(p.src, p.dst, p.payload) for p in got] == [
        (Peer(SCADA, 40001), Peer(PLC, 502), REQUEST)
    ]


def test_ipv6_with_extension_headers_and_ipv4_options(tmp_path: Path) -> None:
    six = IPv6(src="fd00::5", dst="fd00::7")
    frames: list[ScapyPacket | bytes] = [
        _ether() / six / TCP(sport=40001, dport=20000, seq=7) / b"dnp3",
        _ether()
        / six
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / UDP(sport=1, dport=47808)
        / b"x",
        _ether()
        / IP(src=SCADA, dst=PLC, options=b"\x01\x01\x01\x00")
        / TCP(sport=1, dport=502)
        / b"o",
        _ether() / IP(src=SCADA, dst=PLC) / TCP(sport=1, dport=502, options=[("MSS", 1460)]) / b"m",
    ]
    got, warnings = _read(_write(tmp_path / "c.pcap", frames))
    assert len(warnings) == 0
    assert [(str(p.src), str(p.dst), p.transport, p.payload) for p in got] == [
        ("[fd00::5]:40001", "[fd00::7]:20000", "tcp", b"dnp3"),
        ("[fd00::5]:1", "[fd00::7]:47808", "udp", b"x"),
        (f"{SCADA}:1", f"{PLC}:502", "tcp", b"o"),
        (f"{SCADA}:1", f"{PLC}:502", "tcp", b"m"),
    ]


def test_ethernet_padding_is_not_payload(tmp_path: Path) -> None:
    # a 60-byte minimum frame: the IP total length says where the segment ends
    frame = bytes(_ether() / _tcp(b"ab")) + b"\x00" * 6
    got, _ = _read(_write(tmp_path / "c.pcap", [frame]))
    assert [p.payload for p in got] == [b"ab"]


def test_pcapng_gzip_and_nanosecond_captures(tmp_path: Path) -> None:
    frames = [_ether() / _tcp(bytes([i]) * 3) for i in range(3)]
    ng = tmp_path / "c.pcapng"
    with PcapNgWriter(str(ng)) as writer:
        for i, frame in enumerate(frames):
            frame.time = T0 + i
            writer.write(frame)
    nano = _write(tmp_path / "nano.pcap", list(frames), nano=True)
    zipped = tmp_path / "c.pcap.gz"
    zipped.write_bytes(gzip.compress(_write(tmp_path / "c.pcap", list(frames)).read_bytes()))
    for path in (ng, nano, zipped):
        got, warnings = _read(path)
        assert len(warnings) == 0, path
        assert [p.payload for p in got] == [bytes([i]) * 3 for i in range(3)], path
        assert [p.time for p in got] == pytest.approx([T0, T0 + 1, T0 + 2], abs=1e-6), path


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (bytes(_ether() / _tcp())[:30], "truncated packet"),  # snaplen cut inside the IP header
        (bytes(_ether() / _tcp())[:-4], "truncated packet"),  # IP length says more than is there
        (bytes(_ether())[:10], "truncated packet"),
        (bytes(_ether() / Dot1Q())[:16], "truncated packet"),
        (_ether() / IP(src=SCADA, dst=PLC, ihl=3) / TCP(), "malformed IPv4 header"),
        (_ether() / IP(src=SCADA, dst=PLC, len=10) / TCP(), "malformed IPv4 header"),
        (_ether() / IP(src=SCADA, dst=PLC) / TCP(dataofs=3) / b"abc", "malformed TCP header"),
        (_ether() / IP(src=SCADA, dst=PLC) / TCP(dataofs=15) / b"abc", "malformed TCP header"),
        (_ether() / IP(src=SCADA, dst=PLC) / UDP(len=4) / b"abc", "malformed UDP header"),
        (_ether() / IP(src=SCADA, dst=PLC) / UDP(len=400) / b"abc", "malformed UDP header"),
        (_ether() / IP(src=SCADA, dst=PLC, flags="MF") / TCP() / b"a", "IP fragment"),
        (_ether() / IP(src=SCADA, dst=PLC, frag=100, proto=6) / b"rest", "IP fragment"),
        (_ether() / IPv6() / IPv6ExtHdrFragment(offset=8) / TCP(), "IP fragment"),
        (bytes(_ether() / IPv6(plen=400) / TCP()), "truncated packet"),
        (_ether() / IP(src=SCADA, dst=PLC, proto=6) / b"short", "truncated packet"),
    ],
)
def test_broken_packets_warn_and_reading_goes_on(
    tmp_path: Path, frame: ScapyPacket | bytes, kind: str
) -> None:
    path = _write(tmp_path / "c.pcap", [frame, _ether() / _tcp()])
    got, warnings = _read(path)
    assert [p.number for p in got] == [2]
    assert warnings.items() == [(kind, 1, "packet 1")]


def test_an_unknown_link_type_warns_per_packet(tmp_path: Path) -> None:
    _, warnings = _read(_write(tmp_path / "c.pcap", [b"\x01\x02", b"\x03"], linktype=147))
    assert warnings.items() == [("link type 147 not supported", 2, "packet 1")]


@pytest.mark.parametrize("cut", [1, 40, 102])  # in the data; in the record header
def test_a_file_cut_mid_record_keeps_what_came_before(tmp_path: Path, cut: int) -> None:
    whole = _write(tmp_path / "c.pcap", [_ether() / _tcp(bytes([i]) * 40) for i in range(3)])
    cut_file = tmp_path / "cut.pcap"
    cut_file.write_bytes(whole.read_bytes()[:-cut])
    got, warnings = _read(cut_file)
    assert [p.payload[0] for p in got] == [0, 1]
    assert _kinds(warnings) == {"capture file cut short": 1}


def test_a_pcapng_cut_mid_block_keeps_what_came_before(tmp_path: Path) -> None:
    ng = tmp_path / "c.pcapng"
    with PcapNgWriter(str(ng)) as writer:
        for i in range(3):
            writer.write(_ether() / _tcp(bytes([i]) * 40))
    ng.write_bytes(ng.read_bytes()[:-10])
    got, warnings = _read(ng)
    assert [p.payload[0] for p in got] == [0, 1]
    assert _kinds(warnings) == {"capture file cut short": 1}


@pytest.mark.parametrize("length", [0xFFFF_FFF0, 17 * 1024 * 1024, 8])
def test_a_pcapng_block_length_no_block_has_is_corrupt_not_cut_short(
    tmp_path: Path, length: int
) -> None:
    ng = tmp_path / "c.pcapng"
    with PcapNgWriter(str(ng)) as writer:
        for i in range(3):
            writer.write(_ether() / _tcp(bytes([i]) * 40))
    data = bytearray(ng.read_bytes())
    starts, at = [], 0
    while at < len(data):  # the blocks: section header, interface, three packets
        starts.append(at)
        at += struct.unpack_from("<I", data, at + 4)[0]
    struct.pack_into("<I", data, starts[-1] + 4, length)  # the third packet's block
    ng.write_bytes(bytes(data))
    got, warnings = _read(ng)
    assert [p.payload[0] for p in got] == [0, 1]
    assert warnings.items() == [("capture file corrupt", 1, "after packet 2")]


def test_a_huge_record_length_stops_reading_with_a_warning(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.pcap", [_ether() / _tcp(), _ether() / _tcp()])
    data = bytearray(path.read_bytes())
    second = 24 + 16 + len(bytes(_ether() / _tcp()))
    struct.pack_into("=I", data, second + 8, 0x7FFF_FFFF)  # its captured length
    path.write_bytes(bytes(data) + b"\x00" * 300_000)
    got, warnings = _read(path)
    assert [p.number for p in got] == [1]
    assert _kinds(warnings) == {"capture file corrupt": 1}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, this is not a capture at all\n" * 10,
        b"\xa1\xb2\xc3\xd4\x00",
        b"\x0a\x0d\x0d\x0a" + b"\xff" * 40,
    ],
    ids=["empty", "text", "pcap-header-cut", "pcapng-bad-section"],
)
def test_a_file_that_is_not_a_capture_is_a_capture_error_naming_it(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(CaptureError, match=r"notes\.txt is not a packet capture"):
        list(packets(path, Warnings()))


def test_a_missing_or_unreadable_file_is_a_capture_error(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"cannot read capture .*missing\.pcap"):
        list(packets(tmp_path / "missing.pcap", Warnings()))
    with pytest.raises(CaptureError, match="cannot read capture"):
        list(packets(tmp_path, Warnings()))


def test_progress_ends_at_the_file_size_and_scapy_logging_is_restored(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.pcap", [bytes(_ether() / _tcp())] * 600)
    seen: list[int] = []
    logger = logging.getLogger("scapy.runtime")
    level = logger.level
    got = list(packets(path, Warnings(), seen.append))
    assert len(got) == 600
    assert seen[-1] == path.stat().st_size
    assert seen == sorted(seen)
    assert logger.level == level


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """A good pcapng and pcap to damage (written once: scapy's writers are slow)."""
    tmp_path = tmp_path_factory.mktemp("seeds")
    frames = [_ether() / _tcp(bytes([i]) * 5, seq=i * 5) for i in range(3)]
    frames.append(_ether() / Dot1Q() / IPv6(src="fd00::5", dst="fd00::7") / UDP() / b"x")
    ng = tmp_path / "seed.pcapng"
    with PcapNgWriter(str(ng)) as writer:
        for frame in frames:
            writer.write(frame)
    return [ng.read_bytes(), _write(tmp_path / "seed.pcap", list(frames)).read_bytes()]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_damage_to_a_capture_gives_warnings_or_capture_error_never_a_crash(
    seeds: list[bytes], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    seed = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(seed) - 1))
        change = data.draw(st.sampled_from(["set", "cut", "insert"]))
        if change == "set":
            seed[at] = data.draw(st.integers(0, 255))
        elif change == "cut":
            del seed[at : at + data.draw(st.integers(1, 20))]
        else:
            seed[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp_path_factory.getbasetemp() / "damaged-capture"
    path.write_bytes(bytes(seed))
    try:
        read = list(packets(path, Warnings()))
    except CaptureError:
        return
    assert all(p.transport in ("tcp", "udp") for p in read)

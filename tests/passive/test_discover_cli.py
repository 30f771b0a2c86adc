"""`dmzbroker discover pcap`: the draft from hand-made guesses (touching and overlapping SCADA
ranges, written-only points, DNP3 and BACnet devices, hostile BACnet names) and the command
end to end on captures of the real simulator polled by the scripted SCADA: the draft compiles
as printed, `--json` keys, `--redact` leaves no address of the capture, bad files are one line."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from bacpypes3.apdu import IAmRequest, ReadPropertyACK
from bacpypes3.constructeddata import Any as AnyValue
from bacpypes3.primitivedata import CharacterString, ObjectIdentifier, Real
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from broker.cli import main
from broker.commands.plan import scans
from broker.passive import discover as discover_module
from broker.passive import summary
from broker.passive.draft import Draft, draft
from broker.passive.infer import Guess
from broker.passive.observations import UNKNOWN_UNIT, Peer
from broker.passive.polls import Polled
from broker.passive.shown import Hosts
from broker.plant.connectors import bacnet_frames as frames
from broker.policy import parse
from tests.harness import dmzbroker
from tests.passive.conftest import run_discover as discover  # the CLI, whatever its outcome
from tests.passive.plant_capture import PLC_HOST, SCADA_HOST

PLC = Peer("10.0.0.7", 502)
SCADA = "10.0.0.5"


def guess(table: str, address: int, type_: str = "uint16", **kw: Any) -> Guess:
    fields: dict[str, Any] = {
        "protocol": "modbus", "server": PLC, "unit": 1, "table": table, "address": address,
        "type": type_, "word_order": None, "width": 1, "kind": "measurement",
        "confidence": 0.9, "evidence": f"{type_}, 40 samples", "scale": None, "minimum": 3,
        "maximum": 70, "samples": 40, "written": False, "changes_with": (),
    }  # fmt: skip
    return Guess(**(fields | kw))


def polled(table: str, start: int, count: int, interval: float | None = 1.0, **kw: Any) -> Polled:
    fields: dict[str, Any] = {
        "protocol": "modbus", "client": SCADA, "server": PLC, "unit": 1, "table": table,
        "start": start, "count": count, "function": "FC3", "requests": 1 if interval is None else 9,
        "interval_s": interval, "write": False,
    }  # fmt: skip
    return Polled(**(fields | kw))


def drafted(
    guesses: list[Guess], ranges: list[Polled], *, redact: bool = False, **how: bool
) -> tuple[Draft, Hosts]:
    hosts = Hosts(redact)
    return draft(guesses, ranges, site="plant", hosts=hosts, source="test.pcap", **how), hosts


def loaded(text: str | None) -> Any:
    """The draft as `policy compile` loads it (in process: the CLI's own loader)."""
    assert text is not None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "draft.yaml")
        path.write_text(text)
        return parse.load(path)


def planned(text: str | None) -> list[tuple[str, int, int, float]]:
    """(table, start, end, poll interval) of every request one scan of the draft sends."""
    return [
        (r.table, r.address, r.address + r.count, device.poll_interval_s)
        for device, _, requests in scans(loaded(text))
        for r in requests
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["holding_register", "coil"]),
            st.integers(0, 40),
            st.integers(1, 12),
            st.sampled_from([0.5, 1.0, 2.5, None]),
            st.sampled_from([2, 9, 100]),  # requests: 2 against 100 is read rarely
        ),
        min_size=1,
        max_size=6,
    ),
    st.data(),
)
def test_every_planned_request_is_inside_one_range_the_scada_polled(
    ranges: list[tuple[str, int, int, float | None, int]], data: st.DataObject
) -> None:
    scada = [polled(t, s, n, i, requests=r) for t, s, n, i, r in ranges]
    read = {(t, a) for t, s, n, *_ in ranges for a in range(s, s + n)}
    # a 32-bit pair somewhere inside one range, as inference reports pairs read together
    pairs = [(t, s) for t, s, n, *_ in ranges if n >= 2 and t == "holding_register"]
    with_pair: bool = bool(pairs) and data.draw(st.booleans())
    pair = data.draw(st.sampled_from(pairs)) if with_pair else None
    guesses = [
        guess(t, a, "bool" if t == "coil" else "uint16")
        for t, a in sorted(read)
        if pair is None or (t, a) not in {pair, (pair[0], pair[1] + 1)}
    ]
    if pair is not None:
        guesses.append(guess(pair[0], pair[1], "float32", width=2, word_order="little"))
    result, _ = drafted(guesses, scada)
    asked: dict[tuple[str, int, int], int] = {}  # per range, every poller's requests
    for p in scada:
        if p.interval_s is not None:
            asked[p.table, p.start, p.count] = (
                asked.get((p.table, p.start, p.count), 0) + p.requests
            )
    most = max(asked.values(), default=0)
    regular = [p for p in scada if p.interval_s is not None
               and asked[p.table, p.start, p.count] * 10 >= most]  # fmt: skip
    if result.text is None:
        assert not any(p.signal for p in result.points)
        return
    for table, start, end, every in planned(result.text):
        # inside one range the SCADA polled regularly (never one it read rarely) ...
        assert any(
            p.table == table and p.start <= start and end <= p.start + p.count for p in regular
        ), (table, start, end, scada)
        # ... and no address of it read more often than the SCADA read it
        for a in range(start, end):
            assert any(p.table == table and p.start <= a < p.start + p.count
                       and p.interval_s <= every for p in regular), (a, every, scada)  # fmt: skip
    # nothing the SCADA polled is lost without a comment saying why
    for point in result.points:
        assert point.signal is not None or point.comment


def test_touching_and_overlapping_ranges_leave_out_one_point_each_with_the_reason() -> None:
    scada = [polled("holding_register", 0, 10), polled("holding_register", 10, 10, 2.0),
             polled("holding_register", 15, 10, 0.5)]  # fmt: skip
    result, _ = drafted([guess("holding_register", a) for a in range(25)], scada)
    left_out = [p.guess.address for p in result.points if p.signal is None]
    assert left_out == [10, 20]
    assert all("touches or overlaps" in p.comment for p in result.points if p.signal is None)
    assert sorted({(s, e) for _, s, e, _ in planned(result.text)}) == [(0, 10), (11, 20), (21, 25)]
    # the slowest range decides: 2.0 s, never the 0.5 s of another range
    assert {every for *_, every in planned(result.text)} == {2.0}


def test_touching_blocks_of_125_registers_keep_every_register() -> None:
    # the planner splits at 125 where the SCADA did: no register at a block's edge is lost
    scada = [polled("holding_register", 0, 125), polled("holding_register", 125, 125)]
    result, _ = drafted([guess("holding_register", a) for a in range(250)], scada)
    assert all(p.signal for p in result.points)
    assert [(s, e) for _, s, e, _ in planned(result.text)] == [(0, 125), (125, 250)]


def test_registers_that_never_changed_are_one_comment_per_run_unless_asked_for() -> None:
    scada = [polled("holding_register", 0, 125)]
    spare: dict[str, Any] = {"kind": "constant", "minimum": 0, "maximum": 0}
    # hr-1 is a lone still register: as likely a quiet status word as a spare, it is kept
    guesses = [guess("holding_register", a, **({} if a in (0, 2) else spare)) for a in range(125)]
    result, _ = drafted(guesses, scada)
    assert [p.guess.address for p in result.points if p.signal] == [0, 1, 2]
    assert result.left_out == [
        "# Not proposed: modbus-10-0-0-7-unit-1 hr-3..124: never changed in the capture (0): "
        "a spare? (--include-constant proposes it)"
    ]
    assert [(s, e) for _, s, e, _ in planned(result.text)] == [(0, 3)]
    everything, _ = drafted(guesses, scada, include_constant=True)
    assert all(p.signal for p in everything.points)
    assert [(s, e) for _, s, e, _ in planned(everything.text)] == [(0, 125)]
    redacted, _ = drafted(guesses, scada, redact=True)  # the value is an observed one
    assert redacted.left_out[0].endswith("hr-3..124: never changed in the capture: a spare? "
                                         "(--include-constant proposes it)")  # fmt: skip


def test_a_range_read_rarely_does_not_slow_the_device_and_says_so() -> None:
    # the SCADA reads hr 0-3 every second; an HMI's diagnostics screen read hr 100-101 twice
    scada = [polled("holding_register", 0, 4, 1.0, requests=300),
             polled("holding_register", 100, 2, 240.0, requests=2, client="10.0.0.6")]  # fmt: skip
    guesses = [guess("holding_register", a) for a in (0, 1, 2, 3, 100, 101)]
    result, _ = drafted(guesses, scada)
    (device,) = loaded(result.text).devices
    assert device.poll_interval_s == 1.0
    assert [(s, e) for _, s, e, _ in planned(result.text)] == [(0, 4)]
    assert result.left_out == [
        "# Not proposed: modbus-10-0-0-7-unit-1 hr-100..101: read rarely: every 240.0 s, 2 "
        "request(s) against 300 of the device's most-read range; drafted, it would slow the "
        "whole device to its pace"
    ]
    rare = next(p for p in result.points if p.guess.address == 100)
    assert (rare.interval_s, rare.polled_by, rare.draft_interval_s) == (240.0, ("10.0.0.6",), None)
    # the SCADA's rate and the draft's side by side, in the evidence and in the table
    signal = next(p for p in result.points if p.signal)
    assert "polled every 1.0 s by 10.0.0.5, the draft reads it every 1.0 s" in signal.comment
    header, row = summary.table(result).splitlines()[:2]
    assert header.split()[5:8] == ["scada", "draft", "by"]
    assert row.split()[5:9] == ["1.0", "s", "1.0", "s"]


def test_written_only_points_are_comments_and_a_read_setpoint_is_marked_never_written() -> None:
    scada = [
        polled("holding_register", 0, 2),
        polled("holding_register", 0, 1, None, write=True, function="FC6"),
        polled("holding_register", 50, 1, None, write=True, function="FC6"),
        polled("coil", 7, 1, None, write=True, function="FC5"),
    ]
    guesses = [
        guess("holding_register", 0, "int16", kind="setpoint", written=True),
        guess("holding_register", 1),
        guess("holding_register", 50, "int16", kind="setpoint", written=True),
        guess("coil", 7, "bool", kind="setpoint", written=True),
    ]
    result, _ = drafted(guesses, scada)
    signals = {p.guess.address: p for p in result.points if p.signal}
    assert set(signals) == {0, 1}
    assert result.text is not None
    assert (
        "  # written by the SCADA (a setpoint): read only, never written\n"
        "  - path: plant/modbus-10-0-0-7-unit-1/hr-0\n"
    ) in result.text
    assert "hr-50: written by the SCADA, never read" in result.text
    assert "coil-7: written by the SCADA, never read" in result.text
    assert [(t, s, e) for t, s, e, _ in planned(result.text)] == [("holding_register", 0, 2)]


def test_a_range_read_once_is_not_polled_by_the_draft() -> None:
    scada = [polled("input_register", 0, 2), polled("input_register", 10, 2, None)]
    guesses = [guess("input_register", 0, "bool", kind="bool")]  # a register only ever 0/1
    result, _ = drafted(guesses + [guess("input_register", a) for a in (1, 10, 11)], scada)
    assert [(s, e) for _, s, e, _ in planned(result.text)] == [(0, 2)]
    flag = next(s for s in loaded(result.text).signals if s.path.endswith("ir-0"))
    assert (flag.source.type, flag.source.bit) == ("bool", 0)
    assert result.text is not None and "ir-10..11: read once in the capture" in result.text


def test_dnp3_and_bacnet_devices_get_addresses_of_their_own_and_compile() -> None:
    outstation = Peer("10.0.0.8", 20000)
    controller = Peer("10.0.0.9", 47808)
    scada = [
        polled("", 0, 0, 1.0, protocol="dnp3", server=outstation, unit=1,
               function="READ class 0 (master 2)"),
        polled("analog-input", 3, 1, 5.0, protocol="bacnet", server=controller,
               unit=UNKNOWN_UNIT, function="ReadProperty"),
    ]  # fmt: skip
    guesses = [
        guess("30", 4, "float32", protocol="dnp3", server=outstation, unit=1),
        guess("1", 0, "bool", protocol="dnp3", server=outstation, unit=1),
        guess("12", 0, "bool", protocol="dnp3", server=outstation, unit=1, written=True),
        guess("analog-input", 3, "float32", protocol="bacnet", server=controller,
              unit=UNKNOWN_UNIT, units="degC", name="Room\u202e\nsignals: []  # x",
              description="temp: {evil: 1}\u2028devices: []\x9b31m\x85\u2066"),
    ]  # fmt: skip
    result, _ = drafted(guesses, scada)
    assert result.text is not None and "# Modbus" not in result.text  # no Modbus device
    assert not {"\u202e", "\u2028", "\x9b", "\x85", "\u2066"} & set(result.text)
    policy = loaded(result.text)
    dnp3 = next(d for d in policy.devices if d.protocol == "dnp3")
    # neither the outstation's address (1) nor the SCADA's master (2)
    assert (dnp3.outstation_address, dnp3.master_address) == (1, 3)
    assert dnp3.poll_interval_s == 1.0
    bacnet = next(d for d in policy.devices if d.protocol == "bacnet")
    assert bacnet.device_instance == 0 and bacnet.poll_interval_s == 5.0
    assert result.text is not None and "device_instance 0 is a placeholder" in result.text
    assert sorted(s.path for s in policy.signals) == [
        "plant/bacnet-10-0-0-9/ai-3", "plant/dnp3-10-0-0-8-outstation-1/ai-4",
        "plant/dnp3-10-0-0-8-outstation-1/bi-0",
    ]  # fmt: skip
    assert all(s.lifecycle == "proposed" for s in policy.signals)
    room = next(s for s in policy.signals if s.path.endswith("ai-3"))
    assert room.unit == "degC"  # a device's text stays a value, one line of printable text
    assert room.description == "Room signals: [] # x: temp: {evil: 1} devices: [] 31m"
    ai4 = next(s for s in policy.signals if s.path.endswith("ai-4"))
    assert ai4.description == "ai 4, measurement"  # the path's word, not the group number
    assert "12-0: the broker does not read dnp3 table '12'" in result.text


def test_redaction_names_addresses_by_pseudonym_in_any_text() -> None:
    hosts = Hosts(redact=True)
    assert hosts("10.0.0.7") == "host-1"
    said = hosts.text("10.0.0.5:49152 → 10.0.0.7:502 at byte 8; [fe80::1]:502, ::ffff:10.1.2.3")
    assert said == "host-2:49152 → host-1:502 at byte 8; [host-3]:502, host-4"
    assert Hosts(redact=False).text("10.0.0.7:502") == "10.0.0.7:502"


# -- the command end to end, on the real simulator's traffic (plant_pcap: conftest.py) ---------


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("dmzbroker: error: ") and "Traceback" not in done.stderr
    return line


def test_the_draft_compiles_as_printed_and_the_summary_goes_to_stderr(
    plant_pcap: Path, tmp_path: Path
) -> None:
    done = discover(str(plant_pcap), "--site", "cold-store")
    assert done.returncode == 0, done.stderr
    (tmp_path / "draft.yaml").write_text(done.stdout)
    compiled = dmzbroker("policy", "compile", str(tmp_path / "draft.yaml"), check=False)
    assert compiled.returncode == 0, compiled.stderr + compiled.stdout
    document = yaml.safe_load(done.stdout)
    (device,) = document["devices"]
    assert (device["host"], device["port"], device["unit_id"]) == (PLC_HOST, 502, 1)
    assert all(s["lifecycle"] == "proposed" for s in document["signals"])
    assert all(
        s["path"].startswith("cold-store/modbus-10-0-0-7-unit-1/") for s in document["signals"]
    )
    assert "polled every" in done.stdout and f"by {SCADA_HOST}" in done.stdout
    assert done.stderr.splitlines()[0].split()[:3] == ["device", "point", "type"]


def test_json_and_output(plant_pcap: Path, tmp_path: Path) -> None:
    out = tmp_path / "draft.yaml"
    done = discover(str(plant_pcap), "--json", "--output", str(out))
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert list(document) == ["draft", "devices", "signals", "polled", "warnings"]
    assert out.read_text() == document["draft"]  # --json with --output: the draft there too
    assert document["draft"].startswith("# Draft policy from the packet capture plant.pcap")
    assert {p["function"] for p in document["polled"]} >= {"FC1", "FC2", "FC3", "FC4", "FC6"}
    setpoint = next(s for s in document["signals"] if s["path"].endswith("/hr-0"))
    assert setpoint["written"] and setpoint["proposed"]
    assert setpoint["draft_interval_s"] >= setpoint["interval_s"]
    # an existing file is never replaced unless asked for
    out.write_text("precious: the live policy\n")
    line = one_line(discover(str(plant_pcap), "--output", str(out)), 2)
    assert line == f"dmzbroker: error: --output {out}: the file exists; --force replaces it"
    assert out.read_text() == "precious: the live policy\n"
    done = discover(str(plant_pcap), "--output", str(out), "--force")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(out.read_text())["signals"]
    assert done.stdout.splitlines()[0].split()[:2] == ["device", "point"]


def test_redact_leaves_no_address_or_value_of_the_capture(plant_pcap: Path) -> None:
    done = discover(str(plant_pcap), "--json", "--redact")
    assert done.returncode == 0, done.stderr
    for address in (SCADA_HOST, PLC_HOST, "10-0-0-7", "10-0-0-5"):
        assert address not in done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert "plant.pcap" not in document["draft"]
    assert {d["host"] for d in document["devices"]} == {"host-1"}
    assert {p["client"] for p in document["polled"]} == {"host-2"}
    assert all(s["minimum"] is None and s["maximum"] is None for s in document["signals"])
    assert all(s["type"] for s in document["signals"])  # types, intervals, ranges are kept
    intervals = {round(p["interval_s"], 2) for p in document["polled"] if not p["write"]}
    assert intervals == {0.5, 1.0, 2.0, 4.0}


def _bacnet(src: str, dst: str, datagram: bytes, time: float) -> Any:
    frame = Ether() / IP(src=src, dst=dst) / UDP(sport=47808, dport=47808) / datagram
    frame.time = time
    return frame


def _present_value(invoke_id: int, value: float, name: str) -> list[bytes]:
    """The SCADA's ReadProperty of analog-input 1 and the device's ACK; then its object-name."""
    ai1 = ObjectIdentifier("analog-input,1")
    datagrams = []
    for prop, said in (("present-value", Real(value)), ("object-name", CharacterString(name))):
        ack = ReadPropertyACK(
            objectIdentifier=ai1, propertyIdentifier=prop, propertyValue=AnyValue(said)
        )
        ack.apduInvokeID, ack.apduSeg, ack.apduMor = invoke_id, 0, 0
        datagrams += [
            frames.read_property(invoke_id, ai1, prop),
            frames._datagram(ack.encode(), expecting_reply=False),
        ]
        invoke_id += 1
    return datagrams


def bacnet_capture(path: Path) -> Path:
    """A device 10.0.0.20 read every 2 s whose I-Am comes after the first poll, and whose
    object-name holds a line break and a right-to-left override."""
    scada, device = "10.0.0.5", "10.0.0.20"
    i_am = IAmRequest(iAmDeviceIdentifier=ObjectIdentifier(("device", 1234)),
                      maxAPDULengthAccepted=1476, segmentationSupported="noSegmentation",
                      vendorID=999)  # fmt: skip
    frames_ = []
    for i in range(6):
        t = 1_783_000_000.0 + 2 * i
        said = _present_value(10 + 2 * i, 20.0 + i / 10, "Room\u202e\ndevices: []")
        for n, datagram in enumerate(said):
            ends = (scada, device) if n % 2 == 0 else (device, scada)
            frames_.append(_bacnet(*ends, datagram, t + n / 100))
        if i == 0:
            announced = frames._datagram(i_am.encode(), expecting_reply=False)
            frames_.append(_bacnet(device, "10.0.0.255", announced, t + 1))
    wrpcap(str(path), frames_)
    return path


def test_a_bacnet_device_named_by_a_later_i_am_is_one_device_and_its_names_stay_text(
    tmp_path: Path,
) -> None:
    done = discover(str(bacnet_capture(tmp_path / "bacnet.pcap")), "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    policy = loaded(document["draft"])
    (bacnet,) = policy.devices
    assert (bacnet.host, bacnet.device_instance, bacnet.poll_interval_s) == ("10.0.0.20", 1234, 2.0)
    (signal,) = policy.signals
    assert signal.path == "site/bacnet-10-0-0-20-device-1234/ai-1"
    assert signal.description == "Room devices: []"  # a device's text stays a value
    # nor does the JSON carry a control or bidi character a terminal or viewer would obey
    (point,) = document["signals"]
    assert point["name"] == "Room devices: []"


@pytest.mark.parametrize("case", ["a folder", "in a file"])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    out = tmp_path / "folder" if case == "a folder" else tmp_path / "file" / "draft.yaml"
    capture = bacnet_capture(tmp_path / "bacnet.pcap")
    line = one_line(discover(str(capture), "--output", str(out), "--force"), 2)
    expected = {"a folder": "Is a directory", "in a file": f"File exists ({out.parent})"}
    assert line == f"dmzbroker: error: --output {out}: cannot write: {expected[case]}"


def test_a_capture_without_plant_traffic_drafts_nothing_and_names_likely_ports(
    tmp_path: Path,
) -> None:
    web = Ether() / IP(src="10.0.0.5", dst="10.0.0.80") / TCP(sport=40000, dport=80) / b"GET /"
    # a PLC on a port of its own: a Modbus read (MBAP: protocol 0, length 6, FC 3) and DNP3
    plc = (Ether() / IP(src="10.0.0.5", dst="10.0.0.7") / TCP(sport=40001, dport=5020)
           / bytes.fromhex("0001 0000 0006 01 03 0000 0002"))  # fmt: skip
    rtu = (Ether() / IP(src="10.0.0.5", dst="10.0.0.8") / TCP(sport=40002, dport=20001)
           / bytes.fromhex("0564 05c0 0100 0200 0000"))  # fmt: skip
    capture = tmp_path / "plantA-10.20.0.0.pcap"  # names often say what --redact hides
    wrpcap(str(capture), [web, plc, rtu])
    line = one_line(discover(str(capture)), 1)
    assert line.startswith(f"dmzbroker: error: {capture}: nothing to draft")
    assert "--port PROTOCOL=PORT" in line
    assert "port 5020 looks like Modbus/TCP: add --port modbus=5020" in line
    assert "port 20001 looks like DNP3: add --port dnp3=20001" in line
    assert "port 80" not in line and "port 40000" not in line
    line = one_line(discover(str(capture), "--redact"), 1)
    assert "plantA" not in line and "10.20.0.0" not in line and "nothing to draft" in line


@pytest.mark.parametrize("case", ["missing", "garbage", "redacted"])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    (tmp_path / "garbage.pcap").write_bytes(b"this is not a capture at all" * 10)
    (tmp_path / "redacted.pcap").write_bytes(b"this is not a capture at all" * 10)
    done = discover(str(tmp_path / f"{case}.pcap"), *(["--redact"] if case == "redacted" else []))
    line = one_line(done, 2)
    assert done.stdout == ""
    expected = {"missing": "missing.pcap", "garbage": "garbage.pcap is not a packet capture",
                "redacted": "the capture (name redacted) is not a packet capture"}  # fmt: skip
    assert expected[case] in line
    assert case != "redacted" or str(tmp_path) not in line


@pytest.mark.parametrize(
    ("option", "expected"),
    [(["--port", "modbus=70000"], "--port 'modbus=70000': expected PROTOCOL=PORT"),
     (["--port", "opcua=4840"], "PROTOCOL one of modbus, dnp3, bacnet"),
     (["--port", "dnp3=502"], "--port 'dnp3=502': port 502 is already modbus's"),
     (["--port", "modbus=5020", "--port", "bacnet=5020"], "port 5020 is already modbus's"),
     (["--site", "Cold Store"], "--site 'Cold Store': must be one word")],
)  # fmt: skip
def test_a_bad_option_is_one_line_and_exit_2(
    option: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # in process: options are checked before anything else (logging too) is touched
    assert main(["discover", "pcap", "unread.pcap", *option]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"dmzbroker: error: {err.removeprefix('dmzbroker: error: ')}"
    assert expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_shows_only_after_two_seconds_and_in_a_log_every_ten(
    tmp_path: Path, terminal: bool, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    now = [100.0]
    monkeypatch.setattr(discover_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    (tmp_path / "big.pcap").write_bytes(bytes(4_000_000))
    progress = discover_module._Progress(tmp_path / "big.pcap")
    shown = []
    for t, read in ((101.9, 1_000_000), (102.1, 2_000_000), (103.0, 2_500_000),
                    (112.2, 4_000_000)):  # fmt: skip
        now[0] = t
        progress.packets += 10
        progress(read)
        shown.append(capsys.readouterr().err)
    progress.done()
    if terminal:  # one line, rewritten in place at each call after 2 s
        assert shown[0] == "" and all(s.startswith("\rdiscover pcap: ") for s in shown[1:])
        assert capsys.readouterr().err == "\n"
    else:  # a log: a line at 2 s, then none until 10 s later
        assert shown == ["", "discover pcap: 2 of 4 MB (50 %), 20 packets\n", "",
                         "discover pcap: 4 of 4 MB (100 %), 40 packets\n"]  # fmt: skip
        assert capsys.readouterr().err == ""


def test_the_discover_group_says_it_reads_captures_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "read a device, or a capture of its traffic, and print a starter" in " ".join(
        capsys.readouterr().out.split()
    )

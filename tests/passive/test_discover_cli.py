"""`dmzbroker discover pcap`: the draft from hand-made guesses (touching and overlapping SCADA
ranges, written-only points, DNP3 and BACnet devices, hostile BACnet names) and the command
end to end on captures of the real simulator polled by the scripted SCADA: the draft compiles
as printed, `--json` keys, `--redact` leaves no address of the capture, bad files are one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
from pathlib import Path
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
from broker.passive.draft import Draft, Hosts, draft
from broker.passive.infer import Guess
from broker.passive.observations import UNKNOWN_UNIT, Peer
from broker.passive.polls import Polled
from broker.plant.connectors import bacnet_frames as frames
from broker.policy import parse
from tests.harness import dmzbroker
from tests.passive.plant_capture import PLC_HOST, SCADA_HOST, record, write_capture

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
    guesses: list[Guess], ranges: list[Polled], *, redact: bool = False
) -> tuple[Draft, Hosts]:
    def interval_s(server: Peer, unit: int) -> float | None:  # PollLog's rule, for the read ranges
        known = [p.interval_s for p in ranges if p.server == server and p.unit == unit
                 and not p.write and p.interval_s is not None]  # fmt: skip
        return max(known, default=None)

    hosts = Hosts(redact)
    return draft(guesses, ranges, interval_s, site="plant", hosts=hosts, source="test.pcap"), hosts


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
        ),
        min_size=1,
        max_size=6,
    ),
    st.data(),
)
def test_every_planned_request_is_inside_one_range_the_scada_polled(
    ranges: list[tuple[str, int, int, float | None]], data: st.DataObject
) -> None:
    scada = [polled(t, s, n, i) for t, s, n, i in ranges]
    read = {(t, a) for t, s, n, _ in ranges for a in range(s, s + n)}
    # a 32-bit pair somewhere inside one range, as inference reports pairs read together
    pairs = [(t, s) for t, s, n, _ in ranges if n >= 2 and t == "holding_register"]
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
    polled_twice = [p for p in scada if p.interval_s is not None]
    if result.text is None:
        assert not any(p.signal for p in result.points)
        return
    slowest = max(p.interval_s for p in polled_twice if p.interval_s is not None)
    for table, start, end, every in planned(result.text):
        assert any(
            p.table == table and p.start <= start and end <= p.start + p.count for p in polled_twice
        ), (table, start, end, scada)
        assert every >= slowest
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
    assert result.text is not None and "ir-10: read once in the capture" in result.text


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
              unit=UNKNOWN_UNIT, units="degC", name="Room\nsignals: []  # x",
              description="temp: {evil: 1}\u2028devices: []"),
    ]  # fmt: skip
    result, _ = drafted(guesses, scada)
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
    assert room.unit == "degC" and "\n" not in room.description  # a device's text stays a value
    assert "12-0: the broker does not read dnp3 table '12'" in result.text


def test_redaction_names_addresses_by_pseudonym_in_any_text() -> None:
    hosts = Hosts(redact=True)
    assert hosts("10.0.0.7") == "host-1"
    said = hosts.text("10.0.0.5:49152 → 10.0.0.7:502 at byte 8; [fe80::1]:502, ::ffff:10.1.2.3")
    assert said == "host-2:49152 → host-1:502 at byte 8; [host-3]:502, host-4"
    assert Hosts(redact=False).text("10.0.0.7:502") == "10.0.0.7:502"


# -- the command end to end, on the real simulator's traffic -----------------------------------


@pytest.fixture(scope="module")
def plant_pcap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recording = asyncio.run(record(30.0))
    return write_capture(tmp_path_factory.mktemp("pcap") / "plant.pcap", recording)


def discover(*args: str) -> subprocess.CompletedProcess[str]:
    return dmzbroker("discover", "pcap", *args, check=False)


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
    assert not out.exists()  # --json: the draft is in the document
    assert document["draft"].startswith("# Draft policy from the packet capture plant.pcap")
    assert {p["function"] for p in document["polled"]} >= {"FC1", "FC2", "FC3", "FC4", "FC6"}
    setpoint = next(s for s in document["signals"] if s["path"].endswith("/hr-0"))
    assert setpoint["written"] and setpoint["proposed"]
    done = discover(str(plant_pcap), "--output", str(out))
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


def test_a_bacnet_device_named_by_a_later_i_am_is_one_device_and_its_names_stay_text(
    tmp_path: Path,
) -> None:
    scada, device = "10.0.0.5", "10.0.0.20"
    i_am = IAmRequest(iAmDeviceIdentifier=ObjectIdentifier(("device", 1234)),
                      maxAPDULengthAccepted=1476, segmentationSupported="noSegmentation",
                      vendorID=999)  # fmt: skip
    frames_ = []
    for i in range(6):  # every 2 s; the I-Am comes after the first poll
        t = 1_783_000_000.0 + 2 * i
        for n, datagram in enumerate(
            _present_value(10 + 2 * i, 20.0 + i / 10, "Room\ndevices: []")
        ):
            frames_.append(
                _bacnet(
                    *((scada, device) if n % 2 == 0 else (device, scada)), datagram, t + n / 100
                )
            )
        if i == 0:
            frames_.append(
                _bacnet(
                    device,
                    "10.0.0.255",
                    frames._datagram(i_am.encode(), expecting_reply=False),
                    t + 1,
                )
            )
    wrpcap(str(tmp_path / "bacnet.pcap"), frames_)
    done = discover(str(tmp_path / "bacnet.pcap"), "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    policy = loaded(document["draft"])
    (bacnet,) = policy.devices
    assert (bacnet.host, bacnet.device_instance, bacnet.poll_interval_s) == (device, 1234, 2.0)
    (signal,) = policy.signals
    assert signal.path == "site/bacnet-10-0-0-20-device-1234/ai-1"
    assert signal.description == "Room devices: []"  # a device's text stays a value


def test_a_capture_without_plant_traffic_drafts_nothing(tmp_path: Path) -> None:
    web = Ether() / IP(src="10.0.0.5", dst="10.0.0.80") / TCP(sport=40000, dport=80) / b"GET /"
    wrpcap(str(tmp_path / "web.pcap"), [web])
    line = one_line(discover(str(tmp_path / "web.pcap")), 1)
    assert "nothing to draft" in line and "--port PROTOCOL=PORT" in line


@pytest.mark.parametrize("case", ["missing", "garbage"])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    (tmp_path / "garbage.pcap").write_bytes(b"this is not a capture at all" * 10)
    done = discover(str(tmp_path / f"{case}.pcap"))
    line = one_line(done, 2)
    assert done.stdout == ""
    expected = {"missing": "missing.pcap", "garbage": "garbage.pcap is not a packet capture"}
    assert expected[case] in line


@pytest.mark.parametrize(
    ("option", "expected"),
    [(["--port", "modbus=70000"], "--port 'modbus=70000': expected PROTOCOL=PORT"),
     (["--port", "opcua=4840"], "PROTOCOL one of modbus, dnp3, bacnet"),
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

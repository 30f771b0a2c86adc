"""The issue's proof on a known plant: the refrigeration simulator polled by a scripted SCADA,
captured (tests/passive/plant_capture.py, once per test run: conftest.py), then `dmzbroker
discover pcap` on the capture.

The draft must find every register the SCADA polled with the type and word order the demo
policy (which states the simulator's map) gives it, the SCADA's setpoint writes, and a poll
interval never below the SCADA's; `policy compile` accepts it as printed; the requests
`dmzbroker plan` makes of it each stay inside one range the SCADA read. The same draft comes
out of a capture with every impairment real captures hold, as pcap and as pcapng.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import policy
from broker.cli import main
from broker.commands.plan import scans
from broker.passive.capture import packets
from broker.passive.modbus import ModbusReader
from broker.passive.observations import Values, Warnings
from broker.passive.streams import Streams
from broker.plant.connectors.modbus_plan import READ_FUNCTIONS
from broker.policy import ModbusSource
from tests.harness import DEMO_POLICY, REPO, free_port, free_udp_port
from tests.passive.conftest import discover, once_per_run
from tests.passive.plant_capture import (
    ALL,
    PLC_HOST,
    PLC_PORT,
    SCADA_HOST,
    Recording,
    write_capture,
)

pytestmark = pytest.mark.timeout(120)

# Registers whose values are negative in the recording (the setpoint, the room at -18 °C):
# the only 16-bit ones whose signedness a capture can show. For the others, and for the
# 32-bit counters that never reach their top bit, int and uint decode the same values.
NEGATIVE = {("holding_register", 0), ("input_register", 30)}
TABLE_OF_FUNCTION = {fc: table for table, (fc, _, _) in READ_FUNCTIONS.items()}


def plant_map() -> dict[tuple[str, int], tuple[str, str | None]]:
    """(table, address) → (type, word order) of every Modbus signal of the demo policy."""
    return {
        (s.source.table, s.source.address): (s.source.type, s.source.word_order)
        for s in policy.load(DEMO_POLICY).signals
        if isinstance(s.source, ModbusSource)
    }


def same_type(table: str, address: int, expected: str, drafted: str) -> bool:
    if (table, address) in NEGATIVE or expected in ("bool", "float32"):
        return drafted == expected
    return drafted.lstrip("u") == expected.lstrip("u")


def polled_registers(recording: Recording) -> set[tuple[str, int]]:
    return {
        (TABLE_OF_FUNCTION[p.function], p.address + i)
        for p in recording.polls
        for i in range(p.count)
    }


def signals(found: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The draft's signals by (table, address), their type and word order as the policy
    reads them (uint16 and big by default)."""
    drafted = {}
    for s in yaml.safe_load(found["draft"])["signals"]:
        source = s["source"]
        source.setdefault("type", "uint16")
        if source["type"].endswith("32"):
            source.setdefault("word_order", "big")
        drafted[(source["table"], source["address"])] = s
    return drafted


def check_draft(found: dict[str, Any], recording: Recording, tmp_path: Path) -> None:
    """What every capture of the known plant must give, whatever its impairments."""
    draft_path = tmp_path / "draft.yaml"
    draft_path.write_text(found["draft"])
    # `policy compile` in this process (it changes no global state): a process each costs CPU
    assert main(["policy", "compile", str(draft_path), "--out", str(tmp_path / "d.json")]) == 0
    [device] = yaml.safe_load(found["draft"])["devices"]
    assert (device["protocol"], device["host"], device.get("port", 502)) == (
        "modbus", PLC_HOST, PLC_PORT,
    )  # fmt: skip
    assert device.get("unit_id", 1) == 1
    # Never more often than the SCADA asks any range it reads: its slowest range's interval.
    slowest = max(p.every_s for p in recording.polls)
    assert slowest <= device["poll_interval_s"] <= slowest + 0.1

    # Every register polled is in exactly one proposed signal.
    drafted = signals(found)
    covered = [
        (table, address + i)
        for (table, address), s in drafted.items()
        for i in range(_width(s["source"]["type"]))
    ]
    assert sorted(covered) == sorted(polled_registers(recording))
    assert {s["lifecycle"] for s in drafted.values()} == {"proposed"}

    written = {(s["table"], s["address"]) for s in found["signals"] if s["written"]}
    assert written == {(TABLE_OF_FUNCTION[3], w.address) for w in recording.writes}

    # Per range the SCADA read, its own interval.
    polled = {
        (p["table"], p["start"], p["count"]): p["interval_s"]
        for p in found["polled"]
        if not p["write"]
    }
    assert polled == pytest.approx(
        {(TABLE_OF_FUNCTION[p.function], p.address, p.count): p.every_s for p in recording.polls},
        abs=0.01,  # the requests of one tick go out a few ms apart
    )

    # Each request the broker would send stays inside one range the SCADA already read.
    ranges = {(TABLE_OF_FUNCTION[p.function], p.address, p.count) for p in recording.polls}
    for _, _, requests in scans(policy.load(draft_path)):
        for r in requests:
            assert any(
                r.table == t and s <= r.address and r.address + r.count <= s + c
                for t, s, c in ranges
            ), r


@pytest.fixture(scope="module")
def clean(plant_pcap: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What discovery makes of the plant's capture (conftest.py) without impairments."""

    def make(path: Path) -> None:
        path.write_text(json.dumps(discover(plant_pcap)))

    found: dict[str, Any] = json.loads(
        once_per_run(tmp_path_factory, "clean.json", make).read_text()
    )
    return found


def test_the_draft_covers_every_register_the_scada_polls(
    clean: dict[str, Any], recording: Recording, tmp_path: Path
) -> None:
    check_draft(clean, recording, tmp_path)
    assert clean["warnings"] == []  # a clean capture leaves nothing unexplained
    assert f"by {SCADA_HOST}" in clean["draft"]  # the evidence names the poller


def test_the_draft_types_every_register_as_the_plant_map(clean: dict[str, Any]) -> None:
    drafted = signals(clean)
    expected = plant_map()
    assert set(drafted) == set(expected)
    for (table, address), (type_, word_order) in expected.items():
        source = drafted[(table, address)]["source"]
        assert same_type(table, address, type_, source["type"]), (source, type_)
        if type_.endswith("32"):
            assert source["word_order"] == (word_order or "big"), (source, word_order)


@pytest.mark.parametrize("pcapng", [False, True], ids=["pcap", "pcapng"])
def test_the_same_draft_from_an_impaired_capture(
    clean: dict[str, Any], recording: Recording, tmp_path: Path, pcapng: bool
) -> None:
    """VLAN tags, pipelined and split frames, reordered, retransmitted, lost and cut segments,
    other traffic. A hole in a TCP stream is given up as soon as the peer's ACK passes it, so
    only the answers lost with the capture's lost and cut segments are missing."""
    capture = write_capture(tmp_path / "impaired.pcap", recording, ALL, pcapng=pcapng)
    reads = sum(1 for e in recording.exchanges if e.request[7] in TABLE_OF_FUNCTION)
    assert _answers(capture) >= reads - 8  # 1,300 of the 1,308 answers the SCADA read
    found = discover(capture)
    check_draft(found, recording, tmp_path)
    assert found["warnings"], "the cut packet and the lost segment are reported"
    typed = {
        key: (s["source"]["type"], s["source"].get("word_order"))
        for key, s in signals(found).items()
    }
    assert typed == {
        key: (s["source"]["type"], s["source"].get("word_order"))
        for key, s in signals(clean).items()
    }


def test_redacted_draft_names_no_address_of_the_capture(
    clean: dict[str, Any], plant_pcap: Path
) -> None:
    found = discover(plant_pcap, "--redact")
    text = json.dumps(found)
    assert SCADA_HOST not in text and PLC_HOST not in text
    assert set(signals(found)) == set(signals(clean))


# On any exit, a failed line's too, the shell stops what it started and waits for it.
STOP_JOBS = "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT"


def readme_demo() -> str:
    """The README's demo of passive discovery, its shell lines as written there."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Draft a policy from the plant's own traffic") :]
    return section.split("```\n")[1]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tcpdump") is None,
    reason="capturing loopback traffic needs root and tcpdump (make system-packages)",
)
def test_the_readme_demo_as_written(tmp_path: Path) -> None:
    """The README's lines (`dmzbroker sim`, `tcpdump`, the scripted poller started at once,
    `discover pcap`, `policy compile`, `plan`) run by bash in a folder of their own, on the wall
    clock. Only free ports replace the README's and a 10 s run its 30 s."""
    lines = readme_demo()
    assert lines.count("5020") == 4 and lines.count("--seconds 30") == 1, lines
    port = free_port()
    script = (
        lines.replace("5020", str(port))
        .replace(f"--port {port} &", f"--port {port} --bacnet-port {free_udp_port()} &", 1)
        .replace("--seconds 30", "--seconds 10")
    )
    venv = Path(sys.executable).parent
    (tmp_path / ".venv").symlink_to(venv.parent)  # the README's `.venv/bin/python`
    log = tmp_path / "demo.log"
    with log.open("wb") as output:
        shell = subprocess.Popen(
            ["bash", "-c", f"set -e\n{STOP_JOBS}\n{script}"],
            cwd=tmp_path, env={**os.environ, "PATH": f"{venv}:{os.environ['PATH']}"},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        shell.wait(timeout=100)
    finally:
        if shell.poll() is None:  # hung: the shell and everything it started, at once
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(timeout=10)
    assert shell.returncode == 0, log.read_text()
    assert "nothing to draft" not in log.read_text()

    draft = yaml.safe_load((tmp_path / "draft.yaml").read_text())
    assert [(d["host"], d["port"]) for d in draft["devices"]] == [("127.0.0.1", port)]
    # Ten seconds of the wall clock are too few samples to tell every type, or to propose what
    # did not change or was read only a few times: signals only where the SCADA polled.
    covered = {
        (s["source"]["table"], s["source"]["address"] + i)
        for s in draft["signals"]
        for i in range(_width(s["source"].get("type", "uint16")))
    }
    polled = {
        (t, a + i) for (t, a), (type_, _) in plant_map().items() for i in range(_width(type_))
    }
    assert covered and covered <= polled


def _answers(capture: Path) -> int:
    """How many read answers the capture's reassembled streams give a Modbus reader."""
    warnings = Warnings()
    streams, reader = Streams(warnings), ModbusReader(warnings)
    chunks = [c for p in packets(capture, warnings) for c in streams.add(p)] + streams.flush()
    found = [o for c in chunks for o in reader.feed(c, from_client=c.dst.port == PLC_PORT)]
    return sum(1 for o in found if isinstance(o, Values) and not o.written)


def _width(type_: str) -> int:
    return 2 if type_.endswith("32") else 1

"""`dmzbroker validate`: the real CLI against the simulated plant, and the verdict rules."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from broker import config
from broker.plant import validate
from broker.plant.quality import SignalStats
from broker.policy import load
from broker.policy.device_schema import Device, OpcUaDevice
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import (
    DEMO_POLICY,
    REPO,
    Deployment,
    Owners,
    Pki,
    demo_policy,
    dmzbroker,
    free_port,
    free_udp_port,
    sign_policy,
    write_config,
)
from tests.test_cli import assert_one_line_error

pytestmark = pytest.mark.timeout(60)

DEFROST = "coldstore/storage/cold-room-1/defrost_heater_current"
INTAKE = "coldstore/outdoor/weather/intake_temperature"  # ambient ~24 degC, range says 40-55
SPARE = "coldstore/outdoor/spare/heater_current"  # on a device nobody answers for


async def validate_cli(config_file: Path, *args: str) -> Any:
    """The real CLI in a child process; the simulator keeps answering meanwhile."""
    return await asyncio.to_thread(
        dmzbroker, "validate", "--config", str(config_file), *args, check=False
    )


def by_signal(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["signal"]: s for s in report["signals"]}


async def test_a_healthy_proposed_signal_is_fit_and_nothing_is_published(
    deployment: Deployment,
) -> None:
    result = await validate_cli(deployment.config, "--duration", "4s", "--json")

    report = json.loads(result.stdout)
    defrost = by_signal(report)[DEFROST]
    assert defrost["lifecycle"] == "proposed"
    assert defrost["samples"] >= defrost["expected_samples"] * 0.95  # polled every 0.2 s
    assert defrost["verdict"] == "fit", defrost["reasons"]
    assert report["promotable"] == [DEFROST]
    assert report["complete"] is True
    assert result.returncode == 0, result.stderr
    assert (
        by_signal(report)[DEFROST.replace("defrost_heater_current", "temperature")]["lifecycle"]
        == "approved"
    )
    # derived: computed when its inputs arrive, so there is no count to hold it to
    approach = by_signal(report)["coldstore/machine-room/condenser-1/approach_temperature"]
    assert approach["samples"] > 0
    assert approach["completeness_pct"] is None
    assert not deployment.spool.exists()
    assert not (deployment.directory / "plant-state" / "policy-accepted.json").exists()
    assert "validation_finished" in result.stderr


async def test_a_dead_device_and_an_out_of_range_value_are_not_fit_with_the_reason(
    tmp_path: Path, plant_sim: RefrigerationPlant, pki: Pki, owners: Owners
) -> None:
    document = demo_policy(plant_sim.address[1])
    dead_port = free_port()  # nothing listens here
    document["devices"].append(
        {"name": "plc-spare", "protocol": "modbus", "host": "127.0.0.1", "port": dead_port,
         "poll_interval_s": 0.2, "timeout_s": 0.2}
    )  # fmt: skip
    document["signals"] += [
        {"path": INTAKE, "device": "plc-machine-room", "lifecycle": "proposed", "scale": 0.1,
         "source": {"table": "input_register", "address": 20, "type": "int16"},
         "range": {"min": 40, "max": 55}},
        {"path": SPARE, "device": "plc-spare", "lifecycle": "proposed",
         "source": {"table": "input_register", "address": 33, "type": "uint16"}},
    ]  # fmt: skip
    envelope = sign_policy(tmp_path, document, [owners.ot_key, owners.it_key])
    config_file = write_config(tmp_path, envelope, pki, free_port(), owners)

    result = await validate_cli(config_file, "--duration", "3s", "--json")

    assert result.returncode == 3, result.stderr  # ran to the end, a proposed signal is not fit
    signals = by_signal(json.loads(result.stdout))
    intake, spare = signals[INTAKE], signals[SPARE]
    assert intake["verdict"] == "not_fit"
    assert intake["failed_checks"]["out_of_range"] == intake["samples"] > 0
    assert f"out of range in {intake['samples']} samples" in intake["reasons"]
    assert spare["verdict"] == "not_fit"
    assert spare["good"] == 0 and spare["bad"] == spare["samples"] > 0
    assert spare["completeness_pct"] == 0.0
    assert any(r.startswith("completeness 0.0 %") for r in spare["reasons"])
    assert any("read_failed" in r for r in spare["reasons"])
    assert signals[DEFROST]["verdict"] == "fit"  # the live device is unaffected
    # its device sessions went into the audit log, under a writer of its own
    audited = (tmp_path / "audit" / "validate").glob("*.jsonl")
    assert any("device_session_down" in p.read_text() for p in audited)


async def test_the_table_names_what_is_fit_and_why_not(deployment: Deployment) -> None:
    result = await validate_cli(deployment.config, "--duration", "2s")

    lines = result.stdout.splitlines()
    assert lines[0].startswith("Read for ")
    header = next(line for line in lines if line.startswith("SIGNAL"))
    assert header.split() == [
        "SIGNAL", "LIFECYCLE", "SAMPLES", "COMPLETE", "GOOD/UNC/BAD", "GAP/STALE", "VERDICT",
    ]  # fmt: skip
    (row,) = [line for line in lines if line.startswith(DEFROST)]
    assert row.split()[1] == "proposed"
    assert "n/a" in next(line for line in lines if "approach_temperature" in line)
    assert lines[-1].startswith("Fit to promote (")


async def test_ctrl_c_stops_reading_and_reports_what_was_gathered(
    deployment: Deployment,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "validate", "--config", str(deployment.config),
        "--duration", "1h", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            while b"validation_started" not in await process.stderr.readline():
                pass
        await asyncio.sleep(1.5)  # a few scans
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            stdout, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 130  # the report covers less than was asked for
    report = json.loads(stdout)
    assert report["complete"] is False
    assert 1 < report["observed_s"] < 60
    assert by_signal(report)[DEFROST]["samples"] > 0
    assert not deployment.spool.exists()


async def test_an_unsigned_or_tampered_policy_is_refused_before_any_read(
    tmp_path: Path, plant_sim: RefrigerationPlant, pki: Pki, owners: Owners
) -> None:
    document = demo_policy(plant_sim.address[1])
    unsigned = sign_policy(tmp_path, document, [owners.ot_key], name="unsigned")
    config_file = write_config(tmp_path, unsigned, pki, free_port(), owners)
    result = await validate_cli(config_file, "--duration", "2s")
    assert_one_line_error(result, f"{unsigned}: needs 1 more IT owner signature(s)")

    tampered = sign_policy(tmp_path, document, [owners.ot_key, owners.it_key], name="tampered")
    envelope = json.loads(tampered.read_text())
    payload = base64.b64decode(envelope["payload"]).replace(b'"port":', b'"port": ', 1)
    envelope["payload"] = base64.b64encode(payload).decode()
    tampered.write_text(json.dumps(envelope))
    config_file = write_config(tmp_path, tampered, pki, free_port(), owners)
    result = await validate_cli(config_file, "--duration", "2s")
    assert_one_line_error(result, str(tampered))

    assert plant_sim.requests == {}  # neither run read the plant


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--duration", "10x"], "--duration: duration '10x': must be a number and s, m, h or d"),
        (["--duration", "0s"], "--duration: duration '0s'"),
    ],
)
def test_a_bad_duration_is_one_line_and_exit_2(
    tmp_path: Path, pki: Pki, owners: Owners, change: list[str], message: str
) -> None:
    envelope = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key, owners.it_key])
    config_file = write_config(tmp_path, envelope, pki, free_port(), owners)
    result = dmzbroker("validate", "--config", str(config_file), *change, check=False)
    assert_one_line_error(result, message)


def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, pki: Pki, owners: Owners) -> None:
    envelope = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key, owners.it_key])
    config_file = write_config(tmp_path, envelope, pki, free_port(), owners)
    config_file.write_text(config_file.read_text().replace("plant:", "plant:\n  spool_dir: x"))
    result = dmzbroker("validate", "--config", str(config_file), check=False)
    assert_one_line_error(result, str(config_file), "spool_dir")
    assert not (tmp_path / "spool").exists()


async def test_progress_is_logged_while_reading(
    plant_sim: RefrigerationPlant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(validate, "PROGRESS_EVERY_S", 0.3)
    demo = load(DEMO_POLICY)
    device = msgspec.structs.replace(demo.devices[0], port=plant_sim.address[1])
    room_controller = msgspec.structs.replace(demo.devices[1], port=free_udp_port())  # silent
    policy = msgspec.structs.replace(demo, devices=[device, room_controller])
    validation = validate.Validation(policy, config.PlantConfig(state_dir=tmp_path))

    with structlog.testing.capture_logs() as logged:
        await validation.observe(1.0)

    progress = [e for e in logged if e["event"] == "validation_progressed"]
    assert 1 <= len(progress) <= 4
    assert progress[-1]["samples"] > 0
    assert validation.complete


# The verdict rules on their own: one signal's tallies → fit or not, and why.

SIGNALS = {s.path: s for s in load(DEMO_POLICY).signals}
MODBUS = load(DEMO_POLICY).devices[0]  # polled every second
OPCUA = OpcUaDevice(name="ua", endpoint="opc.tcp://127.0.0.1:4840")  # subscribed


def tallies(good: int, uncertain: int = 0, bad: int = 0, gap_s: float = 1.0, **checks: int):
    stats = SignalStats(longest_gap_s=gap_s)  # samples: good + uncertain + bad
    stats.by_quality.update(good=good, uncertain=uncertain, bad=bad)
    stats.failed_checks.update(checks)
    return stats


def test_a_signal_that_kept_its_cadence_is_fit() -> None:
    verdict = validate.judge(SIGNALS[DEFROST], MODBUS, tallies(good=600), observed_s=600.4)
    assert (verdict.verdict, verdict.reasons) == ("fit", [])
    assert (verdict.expected_samples, verdict.completeness_pct) == (600, 100.0)
    assert verdict.stale_after_s == 3.0


@pytest.mark.parametrize(
    ("stats", "reason"),
    [
        (tallies(good=560), "completeness 93.3 % (560 good of 600 expected), below 95 %"),
        (tallies(good=560, uncertain=40, spike=30, flatline=10),
         "good 93.3 % of samples, below 95 % (flatline 10, spike 30)"),
        (tallies(good=600, uncertain=1, out_of_range=1), "out of range in 1 samples"),
        (tallies(good=600, gap_s=3.5), "longest gap 3.5 s, above 3 s (3 poll intervals)"),
        (tallies(good=0), "no samples in 600.0 s"),
    ],
)  # fmt: skip
def test_each_threshold_gives_its_reason(stats: SignalStats, reason: str) -> None:
    verdict = validate.judge(SIGNALS[DEFROST], MODBUS, stats, observed_s=600.0)
    assert verdict.verdict == "not_fit"
    assert reason in verdict.reasons, verdict.reasons


def test_a_few_failed_checks_within_the_allowance_stay_fit() -> None:
    stats = tallies(good=580, uncertain=20, spike=20)  # 96.7 % good
    verdict = validate.judge(SIGNALS[DEFROST], MODBUS, stats, observed_s=600.0)
    assert (verdict.verdict, verdict.reasons, verdict.failed_checks) == ("fit", [], {"spike": 20})


@pytest.mark.parametrize(
    ("signal", "device"),
    [("coldstore/machine-room/condenser-1/approach_temperature", None), (DEFROST, OPCUA)],
)
def test_completeness_and_staleness_are_not_judged_without_a_cadence(
    signal: str, device: Device | None
) -> None:
    verdict = validate.judge(SIGNALS[signal], device, tallies(good=3, gap_s=500), 600.0)
    assert verdict.expected_samples is verdict.completeness_pct is verdict.stale_after_s is None
    assert verdict.verdict == "fit"

"""The plant half's metrics reach /metrics through a file in the spool directory, one way."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from broker.metrics import DIODE_FILE, PLANT_FILE, EnterpriseMetrics, PlantMetrics


def test_the_enterprise_exposition_carries_the_plant_halfs_last_written_metrics(
    tmp_path: Path,
) -> None:
    dropped = Counter({"policy_denied": 3, "island_mode": 7})
    device = SimpleNamespace(scans=12, overruns=2, errors=1, last_scan_s=0.05)
    signal = SimpleNamespace(
        by_quality=Counter({"good": 9, "uncertain": 3}),
        failed_checks=Counter({"spike": 3}),
        last_s=time.time() - 30,
        longest_gap_s=4.5,
    )
    plant = PlantMetrics(
        dropped=lambda: dropped,
        island=lambda: False,
        audit_failing=lambda: True,
        devices=lambda: {"plc-1": device},
        written_seq=lambda: 1234,
        signals=lambda: {"site/pump/flow": signal},
    )
    plant.records_written.inc(42)
    plant.write(tmp_path)
    assert (tmp_path / PLANT_FILE).exists()

    enterprise = EnterpriseMetrics(
        lambda: 5,
        lambda: False,
        read_seq=lambda: 1200,
        certificates=lambda: {"server certificate": 45.5},
    )
    enterprise.records_received.inc(40)
    text = enterprise.exposition(tmp_path).decode()
    assert "dmzbroker_records_written_total 42.0" in text
    assert "dmzbroker_records_received_total 40.0" in text
    assert "dmzbroker_plant_audit_failing 1.0" in text
    assert 'dmzbroker_points_dropped_total{reason="island_mode"} 7.0' in text
    assert "dmzbroker_streams_open 5.0" in text
    assert 'dmzbroker_device_scans_total{device="plc-1"} 12.0' in text
    assert 'dmzbroker_device_skipped_scans_total{device="plc-1"} 2.0' in text
    assert 'dmzbroker_device_errors_total{device="plc-1"} 1.0' in text
    assert 'dmzbroker_device_scan_seconds{device="plc-1"} 0.05' in text
    assert (
        "dmzbroker_spool_written_seq 1234.0" in text and "dmzbroker_spool_read_seq 1200.0" in text
    )
    assert 'dmzbroker_certificate_days_left{what="server certificate"} 45.5' in text
    assert 'dmzbroker_signal_samples_total{quality="uncertain",signal="site/pump/flow"} 3.0' in text
    assert (
        'dmzbroker_signal_check_failures_total{check="spike",signal="site/pump/flow"} 3.0' in text
    )
    assert 'dmzbroker_signal_longest_gap_seconds{signal="site/pump/flow"} 4.5' in text
    [age] = [line for line in text.splitlines() if line.startswith("dmzbroker_signal_value_age")]
    assert 29 < float(age.rpartition(" ")[2]) < 60  # written a moment ago, 30 s after the value


def test_without_a_plant_file_the_enterprise_serves_its_own(tmp_path: Path) -> None:
    text = EnterpriseMetrics(lambda: 0, lambda: True).exposition(tmp_path).decode()
    assert "dmzbroker_records_received_total 0.0" in text
    assert "dmzbroker_enterprise_audit_failing 1.0" in text
    assert "dmzbroker_records_written" not in text


def test_the_enterprise_exposition_carries_the_diode_receivers_metrics(tmp_path: Path) -> None:
    (tmp_path / DIODE_FILE).write_text("dmzbroker_diode_datagrams_lost_total 3.0\n")
    text = EnterpriseMetrics(lambda: 0, lambda: False).exposition(tmp_path).decode()
    assert "dmzbroker_diode_datagrams_lost_total 3.0" in text

"""Clock steps, a filling disk and expiring certificates are noticed and logged."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from broker import health
from tests.harness import dmzbroker


def events(logs: list[dict]) -> list[str]:
    return [entry["event"] for entry in logs]


def test_a_stepped_wall_clock_is_logged_once_with_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine's clock must not be stepped by a test: the two clocks are scripted instead.
    wall, mono = [1000.0], [50.0]
    monkeypatch.setattr(health.time, "time", lambda: wall[0])
    monkeypatch.setattr(health.time, "monotonic", lambda: mono[0])
    watch = health.ClockWatch()
    with structlog.testing.capture_logs() as logs:
        wall[0], mono[0] = 1000.25, 50.25  # both advance alike: no step
        watch.check()
        wall[0], mono[0] = 1300.5, 50.5  # the wall clock jumps five minutes ahead
        watch.check()
        wall[0], mono[0] = 1300.75, 50.75
        watch.check()
    assert events(logs) == ["clock_stepped"]
    assert logs[0]["step_s"] == pytest.approx(300.0)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          check=False, capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def test_a_disk_under_ten_percent_free_is_logged_once_per_crossing(small_fs: Path) -> None:
    watch = health.DiskWatch(small_fs, "spool")
    with structlog.testing.capture_logs() as logs:
        watch.check()
        (small_fs / "fill").write_bytes(b"\0" * (950 * 1024))
        watch.check()
        watch.check()
        (small_fs / "fill").unlink()
        watch.check()
        (small_fs / "fill").write_bytes(b"\0" * (950 * 1024))
        watch.check()
    assert events(logs) == ["disk_space_low", "disk_space_low"]
    assert logs[0]["what"] == "spool" and logs[0]["free_pct"] < 10


def test_certificates_ending_within_30_days_are_named(tmp_path: Path) -> None:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "CA")
    dmzbroker("certs", "issue", "server", "--ca", str(tmp_path), "--out", str(tmp_path),
              "--name", "soon", "--dns", "localhost", "--days", "10")  # fmt: skip
    paths = {"server certificate": tmp_path / "soon.crt", "client CA": tmp_path / "ca.crt"}
    with structlog.testing.capture_logs() as logs:
        health.warn_expiring_certificates(paths)
        health.warn_expiring_certificates(paths, now=datetime.now(UTC) + timedelta(days=3640))
    warned = [(e["what"], round(e["days_left"])) for e in logs]
    assert warned[0] == ("server certificate", 10)
    assert ("client CA", 10) in warned[1:]  # the CA is near its end ten years on

"""Conditions the audit trail must note, checked by both halves a few times a second:
wall-clock steps, a filling disk, and certificates nearing expiry."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog
from cryptography import x509

CLOCK_STEP_S = 1.0  # a wall-clock jump larger than this, against the monotonic clock
DISK_LOW = 0.10  # free share of a file system under which `disk_space_low` is raised
CERT_WARNING_DAYS = 30

log = structlog.get_logger("health")


class ClockWatch:
    """Notices the wall clock being stepped (NTP, an operator): entry times jump there."""

    def __init__(self) -> None:
        self._wall, self._mono = time.time(), time.monotonic()

    def check(self) -> None:
        wall, mono = time.time(), time.monotonic()
        step = (wall - self._wall) - (mono - self._mono)
        if abs(step) > CLOCK_STEP_S:
            log.warning("clock_stepped", step_s=round(step, 3))
        self._wall, self._mono = wall, mono


class DiskWatch:
    """Raises `disk_space_low` once when a file system's free share drops under 10 %."""

    def __init__(self, path: Path, what: str) -> None:
        self._path = path
        self._what = what
        self._low = False

    def check(self) -> None:
        try:
            fs = os.statvfs(self._path)
        except OSError:
            return  # not created yet
        free = fs.f_bavail / fs.f_blocks if fs.f_blocks else 1.0
        low = free < DISK_LOW
        if low and not self._low:
            log.warning(
                "disk_space_low",
                what=self._what,
                path=str(self._path),
                free_pct=round(free * 100, 1),
            )
        self._low = low


def days_left(paths: dict[str, Path], now: datetime | None = None) -> dict[str, float]:
    """Days until each readable certificate file ends (negative: it has ended)."""
    now = now or datetime.now(UTC)
    found = {}
    for what, path in paths.items():
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue  # unreadable files are refused where they are used, with their name
        found[what] = (cert.not_valid_after_utc - now).total_seconds() / 86_400
    return found


def warn_expiring_certificates(paths: dict[str, Path], now: datetime | None = None) -> None:
    """`certificate_expiring` for each certificate file that ends within 30 days (or has)."""
    for what, days in days_left(paths, now).items():
        if days < CERT_WARNING_DAYS:
            log.warning(
                "certificate_expiring", what=what, path=str(paths[what]), days_left=round(days, 1)
            )

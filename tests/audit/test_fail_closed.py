"""A full audit file system stops data crossing and closes the device sessions; both resume
once it has room.

A real, small tmpfs mounted by the test (the suite runs as root, as CI does); without the
right to mount, the test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.log import MIN_FREE_BYTES, AuditLog
from broker.channel.spool import SpoolReceiver
from broker.sim.refrigeration import RefrigerationPlant
from broker.trust import tls
from tests.harness import (
    BrokerProcess,
    Deployment,
    Owners,
    Pki,
    consumer_ssl,
    dmzbroker,
    eventually,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "auditfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        for _ in range(64):  # 2 MiB disk: bounded well above its size
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def test_a_disk_found_full_with_nothing_waiting_stops_failing_once_it_has_room(
    small_fs: Path,
) -> None:
    """Under load, check() can find the disk short of room while the filler is still being
    written: every entry so far was written, so no later write clears `failing`; check()
    must, or the plant half's data path stays closed for good."""
    with AuditLog(small_fs, "plant", "coldstore-1", Ed25519PrivateKey.generate()) as log:
        fs = os.statvfs(small_fs)
        filler = small_fs / "filler"
        filler.write_bytes(b"\0" * (fs.f_bavail * fs.f_frsize - MIN_FREE_BYTES // 2))
        log.check()
        assert log.failing  # short of room: fail closed before an entry is refused
        filler.unlink()
        log.check()
        assert not log.failing
        seq = log.head[0]
        log.record("test_event", category="test", outcome="success")
        assert log.sync() and log.durable == log.head[0] > seq


async def api_status(deployment: Deployment, pki: Pki) -> int:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(deployment.base_url + "/v1/snapshot", ssl=consumer_ssl(pki)) as r,
        ):
            return r.status
    except aiohttp.ClientConnectionError:
        return 0


async def test_a_full_audit_disk_closes_the_data_path_until_it_has_room(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, owners: Owners,
    small_fs: Path, start_broker,
) -> None:  # fmt: skip
    document = yaml.safe_load(deployment.config.read_text())
    document["audit"]["dir"] = str(small_fs)
    deployment.config.write_text(yaml.safe_dump(document))
    reader = SpoolReceiver(deployment.spool, deployment.directory / "count-state")

    def crossed() -> int:
        return sum(len(reader.receive()) for _ in range(100))

    broker: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: _status_is(deployment, pki, 200), timeout=20)
    # The enterprise half can serve before the plant half has opened its audit log: a disk
    # filled before that stops the plant half's start instead (fail closed, another test).
    await eventually(lambda: crossed() > 0, timeout=20)

    filler = fill(small_fs)
    # Bounds are generous: a loaded 2-core machine (load 7-9) took over 5 s to notice.
    await eventually(lambda: _status_is(deployment, pki, 503), timeout=30)
    await eventually(lambda: any('"audit_write_failed"' in e for e in broker.events()), timeout=30)
    metrics = await _metrics(deployment, pki)
    assert "dmzbroker_enterprise_audit_failing 1.0" in metrics  # raised in metrics too
    # The two halves notice on their own: wait for the plant half's gate to close, then
    # drain what it wrote before, and nothing more may cross.
    await eventually(lambda: _plant_failing_in_metrics(deployment, pki), timeout=10)
    crossed()
    await asyncio.sleep(1.0)  # five poll intervals
    assert crossed() == 0
    polled = sum(plant_sim.requests.values())
    await asyncio.sleep(1.0)  # five poll intervals
    assert sum(plant_sim.requests.values()) == polled  # the device sessions were closed

    filler.unlink()
    await eventually(lambda: _status_is(deployment, pki, 200), timeout=30)
    await eventually(lambda: crossed() > 0, timeout=30)
    assert sum(plant_sim.requests.values()) > polled  # and reopened
    assert broker.stop() == 0

    verified = dmzbroker(
        "audit", "verify", str(small_fs), "--pubkey", str(owners.audit_key.with_suffix(".pub"))
    )
    assert "INTACT" in verified.stdout.splitlines()[-1], verified.stdout
    shown = dmzbroker(
        "audit", "show", str(small_fs), "--writer", "plant", "--format", "json"
    ).stdout
    events = [line for line in shown.splitlines() if "audit_write_" in line]
    assert any('"audit_write_failed"' in e for e in events)
    assert any('"audit_write_recovered"' in e for e in events)


async def _status_is(deployment: Deployment, pki: Pki, status: int) -> bool:
    return await api_status(deployment, pki) == status


async def _metrics(deployment: Deployment, pki: Pki) -> str:
    context = tls.client_context(pki.ca, pki.monitoring_cert, pki.monitoring_key)
    async with (
        aiohttp.ClientSession() as session,
        session.get(deployment.base_url + "/metrics", ssl=context) as response,
    ):
        assert response.status == 200
        return await response.text()


async def _plant_failing_in_metrics(deployment: Deployment, pki: Pki) -> bool:
    return "dmzbroker_plant_audit_failing 1.0" in await _metrics(deployment, pki)

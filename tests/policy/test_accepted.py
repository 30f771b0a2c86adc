"""Rollback protection an attacker with write access to the files but no owner key cannot
undo: deleted state files, a deleted audit log, a swapped or rolled-back trust root. Real
CLI, real plant-half processes, their real audit logs."""

from __future__ import annotations

import json
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.segments import read_entries, segment_numbers, segment_path
from broker.policy import envelope as envelopes
from broker.policy import trustroot
from broker.trust import keys
from broker.trust.keys import Role
from tests.harness import (
    BrokerProcess,
    Owners,
    Pki,
    demo_policy,
    dmzbroker,
    eventually,
    free_port,
    sign_policy,
    write_config,
)

pytestmark = pytest.mark.timeout(180)
STATE_FILES = ("plant-state/policy-accepted.json", "plant-state/trust-root-accepted.json")


@pytest.fixture
def site(tmp_path: Path, pki: Pki, owners: Owners) -> Path:
    """A broker.yaml with a trust root of its own (copied: tests replace it)."""
    shutil.copy(owners.trust_root, tmp_path / "trust-root.yaml")
    config = write_config(tmp_path, tmp_path / "policy.dsse.json", pki, free_port(), owners)
    document = yaml.safe_load(config.read_text())
    document["trust_root"] = str(tmp_path / "trust-root.yaml")
    config.write_text(yaml.safe_dump(document))
    return tmp_path


def install(site: Path, version: int, signers: list[Path]) -> None:
    sign_policy(site, demo_policy(free_port(), version=version), signers)


def audit_entries(site: Path, writer: str = "plant") -> list[dict[str, Any]]:
    directory = site / "audit" / writer
    return [
        e for n in segment_numbers(directory) for e in read_entries(segment_path(directory, n))[0]
    ]


def audited(site: Path, event: str, **details: object) -> list[dict[str, Any]]:
    return [
        e
        for e in audit_entries(site)
        if e["event"] == event and all(e["details"].get(k) == v for k, v in details.items())
    ]


def plant_args(site: Path, *extra: str) -> list[str]:
    return ["plant", "--config", str(site / "broker.yaml"), *extra]


async def started(start_broker: Any, site: Path, reset_state: bool | None = None) -> BrokerProcess:
    plant: BrokerProcess = start_broker("plant", site / "broker.yaml", reset_state)
    await eventually(lambda: '"plant_started"' in "".join(plant.events()), timeout=30)
    return plant


def root_of(
    site: Path,
    version: int,
    owners: list[tuple[str, Role, Ed25519PrivateKey]],
    signers: list[Ed25519PrivateKey],
) -> None:
    """Write a trust root over the site's file: `owners` listed, signed by `signers`."""
    listed = [trustroot.owner(name, role, key.public_key()) for name, role, key in owners]
    root = trustroot.unsigned("coldstore-demo", version, {"ot": 1, "it": 1}, listed)
    for key in signers:
        root = envelopes.sign(root, key)
    envelopes.write(root, site / "trust-root.yaml")


def owner_keys(owners: Owners) -> list[tuple[str, Role, Ed25519PrivateKey]]:
    return [
        ("Olga OT", "ot", keys.load_private(owners.ot_key, passphrase=None)),
        ("Ivan IT", "it", keys.load_private(owners.it_key, passphrase=None)),
    ]


async def test_deleted_state_files_do_not_let_version_1_replace_version_2(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    signers = [owners.ot_key, owners.it_key]
    install(site, 2, signers)
    plant = await started(start_broker, site)
    for name in STATE_FILES:
        (site / name).unlink()
    install(site, 1, signers)
    plant.process.send_signal(signal.SIGHUP)  # the running half: its floor is in memory
    await eventually(lambda: audited(site, "policy_refused", reason="rollback"), timeout=20)
    assert plant.process.poll() is None
    assert plant.stop() == 0
    assert not (site / STATE_FILES[0]).exists()  # the refusal wrote nothing back
    # After a restart the floor comes back from the half's own audit log.
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2, result.stderr
    assert "version 1 is lower than version 2" in result.stderr.splitlines()[-1]
    assert not (site / STATE_FILES[0]).exists()


async def test_without_state_and_audit_log_the_half_starts_only_when_told_reset_state(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 2, [owners.ot_key, owners.it_key])
    (await started(start_broker, site)).stop()
    shutil.rmtree(site / "plant-state")
    shutil.rmtree(site / "audit" / "plant")
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert f"neither {site / 'plant-state' / 'policy-accepted.json'} nor a policy_accepted" in error
    assert "start once with --reset-state" in error
    assert not (site / "audit" / "plant").exists() or not audited(site, "policy_accepted")
    plant = await started(start_broker, site, reset_state=True)
    assert plant.stop() == 0
    [reset] = audited(site, "state_reset")
    assert reset["category"] == "policy" and len(reset["details"]["missing"]) == 2
    # Recorded now: the next start needs no flag, and --reset-state lowers nothing.
    install(site, 1, [owners.ot_key, owners.it_key])
    result = dmzbroker(*plant_args(site, "--reset-state"), check=False)
    assert "version 1 is lower than version 2" in result.stderr, result.stderr


async def test_a_swapped_trust_root_and_a_policy_its_keys_signed_are_refused(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 2, [owners.ot_key, owners.it_key])
    plant = await started(start_broker, site)
    attacker_dir = site / "attacker"
    attacker_dir.mkdir()
    made = [keys.generate(attacker_dir, f"Mallory {r}", r, passphrase=None) for r in ("ot", "it")]
    mallory = [keys.load_private(k.private, passphrase=None) for k in made]
    root_of(site, 1, [("Mallory ot", "ot", mallory[0]), ("Mallory it", "it", mallory[1])], mallory)
    install(site, 3, [k.private for k in made])
    plant.process.send_signal(signal.SIGHUP)
    await eventually(lambda: audited(site, "trust_root_refused", reason="swapped"), timeout=20)
    await eventually(
        lambda: audited(site, "policy_refused", reason="threshold_not_met"), timeout=20
    )
    assert plant.process.poll() is None  # the old policy keeps running
    assert plant.stop() == 0
    assert json.loads((site / STATE_FILES[0]).read_text())["version"] == 2
    # At a restart too: the accepted root (restored from its record) stays in force.
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2 and "needs 1 more OT owner" in result.stderr, result.stderr
    assert len(audited(site, "trust_root_refused", reason="swapped")) == 2


async def test_trust_root_rotation_rollback_and_one_role_signatures(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 2, [owners.ot_key, owners.it_key])
    plant = await started(start_broker, site)
    ours = owner_keys(owners)
    ot, it = ours[0][2], ours[1][2]
    new_it = Ed25519PrivateKey.generate()
    rotated = [ours[0], ("Ivy IT", "it", new_it)]
    root_of(site, 2, rotated, [ot, new_it])  # the current IT owner did not sign
    plant.process.send_signal(signal.SIGHUP)
    await eventually(
        lambda: audited(site, "trust_root_refused", reason="not_signed_by_current"), timeout=20
    )
    root_of(site, 2, rotated, [ot, it, new_it])  # current thresholds and its own: accepted
    plant.process.send_signal(signal.SIGHUP)
    await eventually(lambda: audited(site, "trust_root_accepted", version=2), timeout=20)
    [accepted] = audited(site, "trust_root_accepted", version=2)
    assert accepted["details"]["previous_version"] == 1
    root_of(site, 1, ours, [ot, it])  # the old root again: rollback
    plant.process.send_signal(signal.SIGHUP)
    await eventually(lambda: audited(site, "trust_root_refused", reason="rollback"), timeout=20)
    assert plant.stop() == 0
    state = json.loads((site / STATE_FILES[1]).read_text())
    assert state["version"] == 2
    # Both state files gone: the rotated root comes back from the audit log, the old file
    # is still refused as a rollback, and the policy (signed by Olga and Ivan; Olga is
    # still an owner, Ivan not) needs an IT signature of the root in force.
    for name in STATE_FILES:
        (site / name).unlink()
    result = dmzbroker(*plant_args(site), check=False)
    assert "needs 1 more IT owner" in result.stderr, result.stderr
    assert len(audited(site, "trust_root_refused", reason="rollback")) == 2


def test_a_root_signed_by_one_role_is_refused_on_a_fresh_install(
    site: Path, owners: Owners
) -> None:
    install(site, 1, [owners.ot_key, owners.it_key])
    ours = owner_keys(owners)
    root_of(site, 1, ours, [ours[0][2]])
    result = dmzbroker(*plant_args(site, "--reset-state"), check=False)
    assert result.returncode == 2
    assert "needs 1 more IT owner signature(s)" in result.stderr.splitlines()[-1]


def test_policy_verify_says_expired_and_at_checks_another_moment(
    tmp_path: Path, owners: Owners
) -> None:
    expires = datetime.now(UTC) - timedelta(hours=1)
    envelope = sign_policy(
        tmp_path,
        demo_policy(free_port(), expires=expires.isoformat()),
        [owners.ot_key, owners.it_key],
    )
    args = ["policy", "verify", str(envelope), "--trust", str(owners.trust_root)]
    result = dmzbroker(*args, check=False)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1].startswith("EXPIRED: version 1 expired at ")
    earlier = (expires - timedelta(days=1)).isoformat()
    result = dmzbroker(*args, "--at", earlier, check=False)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("VERIFIED")
    result = dmzbroker(*args, "--at", "2026-01-01T00:00:00", check=False)
    assert result.returncode == 2 and "has no UTC offset" in result.stderr

"""Rollback protection an attacker with write access to the files but no owner key cannot
undo: deleted state files, a deleted audit log, a swapped or rolled-back trust root. Real
CLI, real plant-half processes, their real audit logs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
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
    # At a restart the half does not start: the file's root is not the accepted one.
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert str(site / "trust-root.yaml") in error and str(site / STATE_FILES[1]) in error
    assert "this half does not start" in error
    assert len(audited(site, "trust_root_refused", reason="swapped")) == 2


async def test_trust_root_rotation_rollback_and_one_role_signatures(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 2, [owners.ot_key, owners.it_key])
    plant = await started(start_broker, site)
    ours = owner_keys(owners)
    ot, it = ours[0][2], ours[1][2]
    ivy = keys.generate(site, "Ivy", "it", passphrase=None)
    new_it = keys.load_private(ivy.private, passphrase=None)
    rotated = [ours[0], ("Ivy IT", "it", new_it)]
    root_of(site, 2, rotated, [ot, new_it])  # the current IT owner did not sign
    plant.process.send_signal(signal.SIGHUP)
    await eventually(
        lambda: audited(site, "trust_root_refused", reason="not_signed_by_current"), timeout=20
    )
    root_of(site, 2, rotated, [ot, it, new_it])  # current thresholds and its own ...
    plant.process.send_signal(signal.SIGHUP)
    # ... but the policy file was signed by Ivan, no owner of the new root: refused, so that
    # no policy runs that the root in force does not vouch for.
    await eventually(
        lambda: audited(site, "trust_root_refused", reason="policy_not_signed"), timeout=20
    )
    [refused] = audited(site, "trust_root_refused", reason="policy_not_signed")
    assert "a policy the new owners signed" in refused["details"]["error"]
    install(site, 3, [owners.ot_key, ivy.private])  # deployed together: accepted
    plant.process.send_signal(signal.SIGHUP)
    await eventually(lambda: audited(site, "trust_root_accepted", version=2), timeout=20)
    [accepted] = audited(site, "trust_root_accepted", version=2)
    assert accepted["details"]["previous_version"] == 1
    root_of(site, 1, ours, [ot, it])  # the old root again: rollback
    plant.process.send_signal(signal.SIGHUP)
    await eventually(lambda: audited(site, "trust_root_refused", reason="rollback"), timeout=20)
    assert plant.stop() == 0
    await eventually(lambda: audited(site, "policy_accepted", version=3), timeout=20)
    state = json.loads((site / STATE_FILES[1]).read_text())
    assert state["version"] == 2
    # Both state files gone: the audit log still records root version 2, so the old file
    # is refused as a rollback at start and the half does not start.
    for name in STATE_FILES:
        (site / name).unlink()
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2 and "rollback refused" in result.stderr, result.stderr
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
    [refused] = audited(site, "trust_root_refused")
    assert "needs 1 more IT owner signature(s)" in refused["details"]["error"]


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


def attacker_root(site: Path, version: int) -> tuple[bytes, list[Path]]:
    """A trust root of attacker keys (named like the real owners), signed by them, and the
    attacker's key files; the site's trust-root.yaml is left as it is."""
    made = [keys.generate(site, f"Eve {r}", r, passphrase=None) for r in ("ot", "it")]
    eve = [keys.load_private(k.private, passphrase=None) for k in made]
    listed = [trustroot.owner("Olga OT", "ot", eve[0].public_key())]
    listed.append(trustroot.owner("Ivan IT", "it", eve[1].public_key()))
    root = trustroot.unsigned("coldstore-demo", version, {"ot": 1, "it": 1}, listed)
    for key in eve:
        root = envelopes.sign(root, key)
    return envelopes.encode(root), [k.private for k in made]


def append_line(site: Path, entry: dict[str, Any]) -> None:
    """One line added to the plant's newest audit segment, as someone without the writer
    would: a plausible seq and a hash of the wrong chain."""
    directory = site / "audit" / "plant"
    last = audit_entries(site)[-1]
    forged = {"seq": last["seq"] + 1, "prev_hash": last["hash"], "hash": "0" * 64, **entry}
    with segment_path(directory, segment_numbers(directory)[-1]).open("a") as f:
        f.write(json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n")


async def test_attack_a_an_attacker_root_in_the_state_file_stops_the_start_and_takes_nothing(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 2, [owners.ot_key, owners.it_key])
    assert (await started(start_broker, site)).stop() == 0
    real_policy = (site / "policy.dsse.json").read_bytes()
    document, eve = attacker_root(site, 50)
    forged = trustroot.parse(document, "attacker")
    (site / STATE_FILES[1]).write_text(
        json.dumps(
            {
                "version": 50,
                "sha256": forged.sha256,
                "document": base64.b64encode(document).decode(),
            }
        )
    )
    install(site, 9, eve)  # a policy the attacker signed
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert str(site / STATE_FILES[1]) in error and "rollback refused" in error
    assert audited(site, "trust_root_refused", reason="rollback")
    assert not audited(site, "policy_accepted", version=9)
    # The forged record removed: the real root and policy work again.
    (site / STATE_FILES[1]).unlink()
    (site / "policy.dsse.json").write_bytes(real_policy)
    plant = await started(start_broker, site)
    assert plant.stop() == 0
    assert json.loads((site / STATE_FILES[1]).read_text())["version"] == 1


async def test_attack_b_a_trust_root_accepted_line_appended_to_the_log_counts_for_nothing(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 2, [owners.ot_key, owners.it_key])
    assert (await started(start_broker, site)).stop() == 0
    real_policy = (site / "policy.dsse.json").read_bytes()
    (site / STATE_FILES[1]).unlink()
    document, eve = attacker_root(site, 1)  # the same version: a swap, were it counted
    forged = trustroot.parse(document, "attacker")
    details = {"version": 1, "sha256": forged.sha256, "document": [
        base64.b64encode(document).decode()
    ]}  # fmt: skip
    append_line(site, {"event": "trust_root_accepted", "details": details})
    install(site, 9, eve)
    result = dmzbroker(*plant_args(site), check=False)
    # The real root stays in force (the forged line is on no chain the writer adopted): the
    # attacker's policy is refused, not the root.
    assert result.returncode == 2 and "needs 1 more OT owner" in result.stderr, result.stderr
    assert not audited(site, "trust_root_refused")
    (site / "policy.dsse.json").write_bytes(real_policy)
    plant = await started(start_broker, site)
    assert plant.stop() == 0
    assert audited(site, "policy_accepted", version=2)


async def test_attack_c_a_policy_accepted_line_appended_to_the_log_lowers_no_floor(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    signers = [owners.ot_key, owners.it_key]
    install(site, 2, signers)
    assert (await started(start_broker, site)).stop() == 0
    (site / STATE_FILES[0]).unlink()
    real_policy = (site / "policy.dsse.json").read_bytes()
    sha = hashlib.sha256(envelopes.read(site / "policy.dsse.json").untrusted_payload)
    install(site, 1, signers)
    one = hashlib.sha256(envelopes.read(site / "policy.dsse.json").untrusted_payload)
    assert one.hexdigest() != sha.hexdigest()
    details = {"sha256": one.hexdigest(), "deployment_id": "coldstore-demo"}
    append_line(site, {"event": "policy_accepted", "policy_version": 1, "details": details})
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2, result.stderr
    assert "version 1 is lower than version 2" in result.stderr.splitlines()[-1]
    (site / "policy.dsse.json").write_bytes(real_policy)  # the real policy again
    plant = await started(start_broker, site)
    assert plant.stop() == 0


async def test_a_rotation_whose_owners_did_not_sign_the_policy_stops_the_start(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 2, [owners.ot_key, owners.it_key])
    assert (await started(start_broker, site)).stop() == 0
    ours = owner_keys(owners)
    ivy = keys.generate(site, "Ivy", "it", passphrase=None)
    new_it = keys.load_private(ivy.private, passphrase=None)
    root_of(site, 2, [ours[0], ("Ivy IT", "it", new_it)], [ours[0][2], ours[1][2], new_it])
    result = dmzbroker(*plant_args(site), check=False)
    assert result.returncode == 2, result.stderr
    assert "a policy the new owners signed" in result.stderr.splitlines()[-1]
    assert audited(site, "trust_root_refused", reason="policy_not_signed")
    assert json.loads((site / STATE_FILES[1]).read_text())["version"] == 1  # nothing recorded
    install(site, 3, [owners.ot_key, ivy.private])
    plant = await started(start_broker, site)
    assert plant.stop() == 0
    assert json.loads((site / STATE_FILES[1]).read_text())["version"] == 2
    [accepted] = audited(site, "trust_root_accepted", version=2)
    assert accepted["details"]["new"] is True and accepted["details"]["previous_version"] == 1


@pytest.mark.parametrize("kind", ["fifo", "zero", "symlink"])
async def test_a_state_file_that_is_no_regular_file_is_refused_at_once(
    site: Path, owners: Owners, start_broker: Any, kind: str
) -> None:
    install(site, 1, [owners.ot_key, owners.it_key])
    assert (await started(start_broker, site)).stop() == 0
    state = site / STATE_FILES[0]
    real = state.read_bytes()
    state.unlink()
    if kind == "fifo":
        os.mkfifo(state)
    elif kind == "zero":
        state.symlink_to("/dev/zero")
    else:
        (site / "elsewhere.json").write_bytes(real)
        state.symlink_to(site / "elsewhere.json")
    result = dmzbroker(*plant_args(site), check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert f"{state}: unreadable record of what this half accepted" in error
    reason = "not a regular file" if kind == "fifo" else "symbolic links"
    assert reason in error


async def test_a_fifo_as_the_newest_plant_audit_segment_neither_hangs_nor_hides_the_records(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    """Review r1 #7: `run` (as root) reads the plant user's audit log for its floor; a FIFO
    there once blocked it forever before either half started."""
    install(site, 2, [owners.ot_key, owners.it_key])
    assert (await started(start_broker, site, reset_state=True)).stop() == 0
    plant_audit = site / "audit" / "plant"
    os.mkfifo(segment_path(plant_audit, segment_numbers(plant_audit)[-1] + 50))
    for state in STATE_FILES:
        (site / state).unlink()  # the floor must now come from the audit log alone
    install(site, 1, [owners.ot_key, owners.it_key])

    result = dmzbroker("validate", "--config", str(site / "broker.yaml"), check=False, timeout=60)

    assert result.returncode == 2, result.stderr
    assert "version 1 is lower than version 2, already accepted here" in result.stderr


async def test_a_symlink_planted_as_the_state_tmp_file_is_not_followed(
    site: Path, owners: Owners, start_broker: Any
) -> None:
    install(site, 1, [owners.ot_key, owners.it_key])
    target = site / "victim.txt"
    target.write_text("untouched")
    (site / "plant-state").mkdir(exist_ok=True)
    (site / "plant-state" / "policy-accepted.json.tmp").symlink_to(target)
    plant = await started(start_broker, site, reset_state=True)
    assert plant.stop() == 0
    assert target.read_text() == "untouched"
    assert json.loads((site / STATE_FILES[0]).read_text())["version"] == 1

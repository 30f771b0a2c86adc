"""The broker itself refuses every policy it must not run on: real CLI, real processes.

Each refusal: exit code 2 with one clear line, a `policy_refused` event naming the reason,
and no data crossing (the spool is never written).
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.harness import (
    BrokerProcess,
    Owners,
    Pki,
    demo_policy,
    dmzbroker,
    free_port,
    sign_policy,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def site(tmp_path: Path, pki: Pki, owners: Owners) -> Path:
    """A directory with a broker.yaml whose policy file is written by each test."""
    write_config(tmp_path, tmp_path / "policy.dsse.json", pki, free_port(), owners)
    return tmp_path


def spool_files(site: Path) -> list[str]:
    spool = site / "spool"
    return sorted(p.name for p in spool.iterdir()) if spool.exists() else []


def refused(site: Path, reason: str, *message: str) -> None:
    before = spool_files(site)
    # --reset-state lowers no floor: a refusal here is the policy's, not a missing record's
    result = dmzbroker("plant", "--config", str(site / "broker.yaml"), "--reset-state", check=False)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("dmzbroker: error: ")
    for fragment in message:
        assert fragment in error
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [e["reason"] for e in events if e["event"] == "policy_refused"] == [reason]
    assert spool_files(site) == before  # nothing crossed: not even a new segment


def signed(
    site: Path, owners: Owners, keys: list[Path], name: str = "policy", **changes: object
) -> Path:
    return sign_policy(site, demo_policy(free_port(), **changes), keys, name=name)


def test_unsigned_is_refused(site: Path, owners: Owners) -> None:
    signed(site, owners, [])
    refused(site, "unsigned", "the policy is not signed")


def test_ot_only_is_refused(site: Path, owners: Owners) -> None:
    signed(site, owners, [owners.ot_key])
    refused(site, "threshold_not_met", "needs 1 more IT owner signature(s)")


def test_it_only_is_refused(site: Path, owners: Owners) -> None:
    signed(site, owners, [owners.it_key])
    refused(site, "threshold_not_met", "needs 1 more OT owner signature(s)")


def test_the_same_key_twice_counts_once(site: Path, owners: Owners) -> None:
    path = signed(site, owners, [owners.ot_key])
    document = json.loads(path.read_text())
    document["signatures"] *= 2  # the OT signature, pasted in twice
    path.write_text(json.dumps(document))
    refused(site, "threshold_not_met", "needs 1 more IT owner signature(s)")


def test_a_key_not_in_the_trust_root_does_not_count(site: Path, owners: Owners) -> None:
    signed(site, owners, [owners.stranger_key, owners.it_key])
    refused(site, "threshold_not_met", "signatures by keys not in the trust root")


def test_one_changed_byte_of_the_payload_is_refused(site: Path, owners: Owners) -> None:
    path = signed(site, owners, [owners.ot_key, owners.it_key])
    document = json.loads(path.read_text())
    payload = bytearray(base64.b64decode(document["payload"]))
    payload[payload.index(b'"port":') + 7] ^= 0x01  # one digit of the device port
    document["payload"] = base64.b64encode(bytes(payload)).decode()
    path.write_text(json.dumps(document))
    refused(site, "threshold_not_met", "signatures that do not match the payload")


def test_a_wrong_payload_type_is_refused(site: Path, owners: Owners) -> None:
    path = signed(site, owners, [owners.ot_key, owners.it_key])
    document = json.loads(path.read_text())
    document["payloadType"] = "application/json"
    path.write_text(json.dumps(document))
    refused(site, "wrong_payload_type", "payloadType 'application/json'")


def test_an_expired_policy_is_refused(site: Path, owners: Owners) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    signed(site, owners, [owners.ot_key, owners.it_key], expires=past)
    refused(site, "expired", "expired at")


def test_a_policy_for_another_appliance_is_refused(site: Path, owners: Owners) -> None:
    signed(site, owners, [owners.ot_key, owners.it_key], deployment_id="other-site")
    refused(site, "wrong_deployment", "deployment_id 'other-site' is not this appliance's")


def accept(site: Path, start_broker) -> None:
    plant: BrokerProcess = start_broker("plant", site / "broker.yaml")
    try:
        for _ in range(200):  # bounded: 10 s
            if any('"plant_started"' in line for line in plant.events()):
                break
            assert plant.process.poll() is None, plant.events()

            time.sleep(0.05)
        else:
            raise AssertionError("the plant half did not start")
    finally:
        assert plant.stop() == 0


def test_rollback_to_a_lower_version_is_refused(site: Path, owners: Owners, start_broker) -> None:
    signed(site, owners, [owners.ot_key, owners.it_key], version=2)
    accept(site, start_broker)
    signed(site, owners, [owners.ot_key, owners.it_key], version=1)
    refused(site, "rollback", "version 1 is lower than version 2")


def test_the_same_version_with_other_content_is_equivocation(
    site: Path, owners: Owners, start_broker
) -> None:
    signed(site, owners, [owners.ot_key, owners.it_key], version=2)
    accept(site, start_broker)
    signed(site, owners, [owners.ot_key, owners.it_key], version=2, expires="2035-01-01T00:00:00Z")
    refused(site, "equivocation", "equivocation refused")


def test_the_same_version_and_content_again_is_accepted_as_a_no_op(
    site: Path, owners: Owners, start_broker
) -> None:
    signed(site, owners, [owners.ot_key, owners.it_key], version=3)
    accept(site, start_broker)
    accept(site, start_broker)
    state = json.loads((site / "plant-state" / "policy-accepted.json").read_text())
    assert state["version"] == 3

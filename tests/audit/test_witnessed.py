"""The plant half's audit checkpoints cross the spool and the enterprise half witnesses them.

Real halves (`dmzbroker run` / `dmzbroker enterprise`), a real spool, the real CLI's
`audit verify`: cutting the plant's log after the fact is seen from the enterprise side.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.audit.crossing import witness_details
from broker.audit.entry import CHECKPOINT, canonical, entry_hash
from broker.audit.segments import read_entries, read_lines, segment_numbers, segment_path
from broker.channel.spool import CHECKPOINT_MAGIC, SpoolSender, parse_frames
from broker.channel.spool import segment_numbers as spool_segments
from broker.channel.spool import segment_path as spool_segment
from broker.records import Context, Record
from tests.harness import (
    BrokerProcess,
    Deployment,
    Owners,
    Pki,
    consumer_ssl,
    dmzbroker,
    eventually,
    get_json,
)

pytestmark = pytest.mark.timeout(240)

WITNESSED = "audit_checkpoint_witnessed"
COPIED = ("covers_seq", "head", "epoch", "keyid", "reason", "signature", "appliance")
Start = Callable[[str, Path], BrokerProcess]


def entries(audit_dir: Path, writer: str) -> list[dict[str, Any]]:
    folder = audit_dir / writer
    return [e for n in segment_numbers(folder) for e in read_entries(segment_path(folder, n))[0]]


def plant_checkpoints(audit_dir: Path) -> dict[int, dict[str, Any]]:
    return {e["seq"]: e for e in entries(audit_dir, "plant") if e["event"] == CHECKPOINT}


def witnessed(audit_dir: Path) -> list[dict[str, Any]]:
    return [e for e in entries(audit_dir, "enterprise") if e["event"] == WITNESSED]


def verify(deployment: Deployment, owners: Owners) -> tuple[int, str]:
    done = dmzbroker(
        "audit", "verify", str(deployment.directory / "audit"),
        "--pubkey", str(owners.audit_key.with_suffix(".pub")), check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


async def run_until_witnessed(deployment: Deployment, start_broker: Start, more: int) -> None:
    """`dmzbroker run` until the enterprise has witnessed `more` new plant checkpoints, this
    run's start checkpoint among them, then a clean stop. (The last run's closing checkpoint,
    still in the spool, can be witnessed before this run's plant half has even started.)"""
    audit_dir = deployment.directory / "audit"
    before = len(witnessed(audit_dir))
    last_seq = max(plant_checkpoints(audit_dir), default=0)

    def done() -> bool:
        new = witnessed(audit_dir)[before:]
        return len(new) >= more and any(
            e["details"]["reason"] == "start" and e["details"]["seq"] > last_seq for e in new
        )

    broker = start_broker("run", deployment.config)
    await eventually(done, timeout=60)
    assert broker.stop() == 0


async def test_plant_checkpoints_are_witnessed_with_their_seq_and_hash_and_never_served(
    deployment: Deployment, pki: Pki, start_broker: Start
) -> None:
    audit_dir = deployment.directory / "audit"
    broker = start_broker("run", deployment.config)
    await eventually(lambda: witnessed(audit_dir), timeout=60)
    # The plant's start checkpoint can cross before its first records: wait for both.
    answers: list[tuple[int, Any]] = []

    async def served() -> bool:
        answers.append(await get_json(deployment.base_url + "/v1/snapshot", consumer_ssl(pki)))
        return bool(answers[-1][1]["records"])

    await eventually(served, timeout=30, interval=0.25)
    status, snapshot = answers[-1]
    assert broker.stop() == 0

    plant = plant_checkpoints(audit_dir)
    found = witnessed(audit_dir)
    for entry in found:
        details = entry["details"]
        original = plant[details["seq"]]  # the plant's log holds the witnessed checkpoint
        assert details["hash"] == original["hash"] == entry_hash(original)
        assert {k: details[k] for k in COPIED} == {k: original["details"][k] for k in COPIED}
        assert (entry["actor"], details["witnessed_writer"]) == ("plant", "plant")
        assert (entry["category"], entry["outcome"]) == ("audit", "success")
    # They crossed in the spool, as frames of their own; no consumer saw one as a record.
    frames = [
        f
        for n in spool_segments(deployment.spool)
        for f in parse_frames(spool_segment(deployment.spool, n).read_bytes())[0]
    ]
    assert any(f.kind == CHECKPOINT_MAGIC for f in frames)
    assert status == 200 and snapshot["records"]
    assert b"audit_checkpoint" not in msgspec.json.encode(snapshot)
    assert {r["signal"] for r in snapshot["records"]} <= {
        s["path"] for s in deployment.document["signals"]
    }


async def test_each_checkpoint_is_witnessed_once_across_restarts_up_to_the_spools_close(
    deployment: Deployment, start_broker: Start
) -> None:
    audit_dir = deployment.directory / "audit"
    await run_until_witnessed(deployment, start_broker, 1)
    await run_until_witnessed(deployment, start_broker, 1)  # the position decides: no repeat

    seqs = [e["details"]["seq"] for e in witnessed(audit_dir)]
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    assert set(seqs) <= set(plant_checkpoints(audit_dir))
    # The first run's last checkpoint made while the spool was open (right before it
    # closed) crossed: only the closing entries after it wait for the next start.
    plant = entries(audit_dir, "plant")
    stopped = next(i for i, e in enumerate(plant) if e["event"] == "process_stopped")
    sealed = [e for e in plant[:stopped] if e["event"] == CHECKPOINT][-1]
    assert sealed["details"]["reason"] == "time"
    assert sealed["seq"] in seqs


async def test_cutting_the_plants_log_after_a_checkpoint_is_broken_by_the_enterprises_witnesses(
    deployment: Deployment, owners: Owners, start_broker: Start
) -> None:
    audit_dir = deployment.directory / "audit"
    await run_until_witnessed(deployment, start_broker, 1)
    await run_until_witnessed(deployment, start_broker, 1)  # now with the first run's last
    code, out = verify(deployment, owners)
    assert code == 0, out  # a cleanly stopped broker: everything sealed and witnessed

    # On the stopped broker, cut the plant's log right after its first witnessed checkpoint:
    # what is left ends with a valid checkpoint, so the plant's own log cannot tell.
    cut_at = witnessed(audit_dir)[0]["details"]["seq"]
    folder = audit_dir / "plant"
    for number in segment_numbers(folder):
        path = segment_path(folder, number)
        lines, _ = read_lines(path)
        seqs = [msgspec.json.decode(line)["seq"] for line in lines]
        if seqs and seqs[0] > cut_at:
            path.unlink()
        elif cut_at in seqs:
            path.write_bytes(b"".join(line + b"\n" for line in lines[: seqs.index(cut_at) + 1]))

    code, out = verify(deployment, owners)
    assert code == 1, out
    assert "BROKEN" in out and "truncated" in out
    assert f"ends at seq {cut_at}" in out and "enterprise log seq" in out


async def test_deleting_the_plants_newest_segment_is_broken_by_the_enterprises_witnesses(
    deployment: Deployment, owners: Owners, start_broker: Start
) -> None:
    audit_dir = deployment.directory / "audit"
    await run_until_witnessed(deployment, start_broker, 1)
    await run_until_witnessed(deployment, start_broker, 1)
    folder = audit_dir / "plant"
    newest = segment_numbers(folder)[-1]
    assert newest > 1  # one segment per start

    segment_path(folder, newest).unlink()

    code, out = verify(deployment, owners)
    assert code == 1, out
    assert "BROKEN" in out and "truncated" in out


def checkpoint_entry(**changes: Any) -> dict[str, Any]:
    """A plant checkpoint entry as the writer makes one (its signature is not checked here)."""
    entry: dict[str, Any] = {
        "seq": 12,
        "time": "2026-12-05T00:00:00.000000Z",
        "boot_id": "b",
        "writer": "plant",
        "event": CHECKPOINT,
        "category": "audit",
        "outcome": "success",
        "actor": None,
        "object": None,
        "policy_version": None,
        "details": {
            "appliance": "coldstore-demo",
            "covers_seq": 11,
            "head": "a" * 64,
            "epoch": 1,
            "keyid": "k1",
            "reason": "time",
            "signature": base64.b64encode(bytes(64)).decode(),
        },
        "prev_hash": "a" * 64,
        **changes,
    }
    entry["hash"] = entry_hash(entry)
    return entry


def test_a_well_formed_checkpoint_becomes_the_witness_details() -> None:
    entry = checkpoint_entry()
    details = witness_details(canonical(entry))
    assert details == {
        "witnessed_writer": "plant",
        "seq": 12,
        "hash": entry["hash"],
        **{k: entry["details"][k] for k in COPIED},
    }


def _hash_claims_another_entry() -> bytes:
    entry = checkpoint_entry()
    entry["details"]["covers_seq"] = 10  # edited after hashing
    return canonical(entry)


MALFORMED = {
    "not JSON": (b"\x00\xff", "not a JSON entry"),
    "a list": (b"[1, 2]", "not a JSON object"),
    "another event": (canonical(checkpoint_entry(event="policy_accepted")), "is not"),
    "another writer": (canonical(checkpoint_entry(writer="enterprise")), "writer 'enterprise'"),
    "a seq of zero": (canonical(checkpoint_entry(seq=0)), "seq 0 is not a positive integer"),
    "a seq of true": (canonical(checkpoint_entry(seq=True)), "is not a positive integer"),
    "a hash of another entry": (_hash_claims_another_entry(), "is not the entry's hash"),
    "no signature": (
        canonical(checkpoint_entry(details={"covers_seq": 11, "head": "a" * 64})),
        "details lack epoch, keyid, reason, signature, appliance",
    ),
    "a head that is no hash": (
        canonical(checkpoint_entry(details={**checkpoint_entry()["details"], "head": "x"})),
        "is not a SHA-256",
    ),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_checkpoint_is_refused_naming_what_is_wrong(name: str) -> None:
    unverified, message = MALFORMED[name]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        witness_details(unverified)


def record(seq_value: float) -> Record:
    now = datetime.now(UTC)
    return Record(
        signal="coldstore/machine-room/compressor-1/suction_pressure", value=seq_value,
        unit="bar", quality="good", source_time=now, broker_time=now, policy_version=1,
        context=Context(),
    )  # fmt: skip


async def test_malformed_checkpoint_frames_are_refused_and_skipped_by_a_running_enterprise(
    deployment: Deployment, start_broker: Start
) -> None:
    sender = SpoolSender(deployment.spool, 1 << 20, 1 << 30)
    try:
        sender.send([record(1.0)], [b"not an entry", _hash_claims_another_entry()])
        sender.send([record(2.0)], [canonical(checkpoint_entry(writer="enterprise"))])
    finally:
        sender.close()
    audit_dir = deployment.directory / "audit"
    enterprise = start_broker("enterprise", deployment.config)

    def refused() -> list[dict[str, Any]]:
        return [
            e for e in entries(audit_dir, "enterprise") if e["event"] == "spool_checkpoint_refused"
        ]

    await eventually(lambda: len(refused()) == 3, timeout=30)
    position = deployment.directory / "enterprise-state" / "spool-position.json"
    await eventually(lambda: position.exists() and b'"seq":2' in position.read_bytes())
    assert enterprise.process.poll() is None  # still serving
    reasons = [e["details"]["reason"] for e in refused()]
    assert reasons[0].startswith("not a JSON entry")
    assert "is not the entry's hash" in reasons[1]
    assert "writer 'enterprise'" in reasons[2]
    assert all(e["category"] == "channel" and e["outcome"] == "failure" for e in refused())
    assert witnessed(audit_dir) == []
    assert enterprise.stop() == 0

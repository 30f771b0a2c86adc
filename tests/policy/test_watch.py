"""The policy watcher, in-process: a newer signed policy is taken at the next check, and a file
that cannot be read for a passing reason (here a real EMFILE) is tried again, never refused."""

from __future__ import annotations

import asyncio
import os
import resource
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from broker.errors import PolicyRefused
from broker.policy import envelope as envelopes
from broker.policy.activation import TrustedPolicy, load_trusted
from broker.policy.watch import CHECK_INTERVAL_S, PolicyWatcher
from tests.harness import Owners, accepted_first_policy, demo_policy, eventually, sign_policy

pytestmark = pytest.mark.timeout(60)


def lowest_free_fd() -> int:
    """The number the next open file would get: a soft limit of it makes that open fail
    (the limit bounds descriptor numbers, not how many are open)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


async def test_a_policy_unreadable_for_lack_of_descriptors_is_read_again_not_refused(
    tmp_path: Path, owners: Owners
) -> None:
    signers = [owners.ot_key, owners.it_key]
    envelope, state, current = accepted_first_policy(tmp_path, owners)
    watcher = PolicyWatcher(envelope, owners.trust_root, state, current)
    accepted: list[TrustedPolicy] = []

    async def follow() -> None:
        async for policy in watcher.updates():
            accepted.append(policy)

    newer = sign_policy(tmp_path, demo_policy(5020, version=2), signers, "v2")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with capture_logs() as logs:
        task = asyncio.create_task(follow())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
            try:
                os.replace(newer, envelope)
                await eventually(
                    lambda: any(e["event"] == "policy_read_failed" for e in logs),
                    timeout=5 * CHECK_INTERVAL_S,
                )
                await asyncio.sleep(2 * CHECK_INTERVAL_S)  # more checks fail: said once
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await eventually(lambda: accepted, timeout=5 * CHECK_INTERVAL_S)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert [p.policy.version for p in accepted] == [2]
    events = [e["event"] for e in logs]
    assert "policy_refused" not in events
    assert events.count("policy_read_failed") == 1
    (failed,) = [e for e in logs if e["event"] == "policy_read_failed"]
    assert "Too many open files" in failed["error"] and failed["kept_version"] == 1
    assert "policy_accepted" in events


async def test_a_policy_replaced_before_the_watcher_runs_is_taken_at_its_first_check(
    tmp_path: Path, owners: Owners
) -> None:
    """The half loads the policy, then starts its watcher: a file replaced in between (and a
    SIGHUP then, which the half still ignores) must not go unnoticed until the next change."""
    signers = [owners.ot_key, owners.it_key]
    envelope, state, current = accepted_first_policy(tmp_path, owners)
    os.replace(sign_policy(tmp_path, demo_policy(5020, version=2), signers, "v2"), envelope)
    watcher = PolicyWatcher(envelope, owners.trust_root, state, current)
    updates = watcher.updates()
    try:
        newer = await asyncio.wait_for(anext(updates), timeout=5 * CHECK_INTERVAL_S)
    finally:
        await updates.aclose()
    assert newer.policy.version == 2


def test_the_running_policys_own_bytes_are_verified_not_parsed_again(
    tmp_path: Path, owners: Owners
) -> None:
    envelope, state, current = accepted_first_policy(tmp_path, owners)
    again = load_trusted(
        envelope, current.root, state, datetime.now(UTC), floor=current.record, running=current
    )
    assert again.policy is current.policy and not again.new
    # The same payload with one owner's signature gone: refused although the bytes are known.
    signed = envelopes.read(envelope)
    envelopes.write(msgspec.structs.replace(signed, signatures=signed.signatures[:1]), envelope)
    with pytest.raises(PolicyRefused, match="needs 1 more"):
        load_trusted(
            envelope, current.root, state, datetime.now(UTC), floor=current.record, running=current
        )
    envelopes.write(signed, envelope)
    later = current.policy.expires + timedelta(seconds=1)
    with pytest.raises(PolicyRefused, match="expired"):
        load_trusted(envelope, current.root, state, later, floor=current.record, running=current)

"""`kill -9` of a half mid-run leaves an audit log whose newest entries are unsealed; the
restart does not adopt them (ADR 0016): it records an `audit_chain_break` naming them, which
`audit verify` reports from then on."""

from __future__ import annotations

import json

import pytest

from broker.sim.refrigeration import RefrigerationPlant
from tests.audit.support import segments
from tests.harness import BrokerProcess, Deployment, Owners, dmzbroker, eventually

pytestmark = pytest.mark.timeout(120)


def verify(deployment: Deployment, owners: Owners) -> list[str]:
    result = dmzbroker(
        "audit", "verify", str(deployment.directory / "audit"),
        "--pubkey", str(owners.audit_key.with_suffix(".pub")), check=False,
    )  # fmt: skip
    return result.stdout.splitlines()


async def test_a_killed_plant_half_leaves_an_unsealed_tail_that_the_restart_does_not_adopt(
    deployment: Deployment, plant_sim: RefrigerationPlant, owners: Owners, start_broker
) -> None:
    plant: BrokerProcess = start_broker("plant", deployment.config)
    await eventually(lambda: '"device_session_up"' in "".join(plant.events()), timeout=20)
    plant.kill9()

    lines = verify(deployment, owners)
    print("\n".join(lines))
    assert any("not yet under a checkpoint" in line for line in lines), lines  # unsealed

    # A power loss would also leave half a line: the writer starts a new segment anyway.
    segment = segments(deployment.directory / "audit" / "plant")[-1]
    with open(segment, "ab") as f:
        f.write(b'{"actor":null,"boot_id":"cut-off')

    restarted: BrokerProcess = start_broker("plant", deployment.config)
    await eventually(lambda: '"device_session_up"' in "".join(restarted.events()), timeout=20)
    assert restarted.stop() == 0

    lines = verify(deployment, owners)
    print("\n".join(lines))
    assert lines[-1] != "INTACT", lines
    assert any("UNPROVEN: chain break at seq" in line for line in lines), lines
    shown = dmzbroker("audit", "show", str(deployment.directory / "audit"), "--writer", "plant",
                      "--event", "process_started", "--format", "json").stdout  # fmt: skip
    boots = {json.loads(line)["boot_id"] for line in shown.splitlines()}
    assert len(boots) == 2  # both runs, one chain

"""Shared fixtures: a PKI made by our own CLI, the simulated plant, broker processes.

Everything listens on 127.0.0.1 on free ports; every process a test starts is stopped by
the fixture that started it; every wait is bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import (
    CONSUMER_URI,
    ENERGY_URI,
    MONITORING_URI,
    STRANGER_URI,
    BrokerProcess,
    Deployment,
    Owners,
    Pki,
    demo_policy,
    dmzbroker,
    free_port,
    sign_policy,
    write_config,
)

# `make test` runs the suite on two workers (pytest-xdist), then these tests alone. They
# change what the whole machine shares (system users, network namespaces, nftables, systemd
# units: another worker's test would see them), or check that a device keeps its rate while
# another one misbehaves, a measurement a busy second worker would distort.
SERIAL_FOLDERS = ("deployment/",)
SERIAL_FILES = (
    "audit/test_flood.py",
    "enterprise/test_flood.py",
    "plant/connectors/test_bacnet_hostile.py",
    "plant/connectors/test_dnp3_hostile.py",
    "plant/connectors/test_modbus_budget.py",
    "plant/connectors/test_modbus_hostile.py",
)
SERIAL_TESTS = (  # asserts that the halves' users do not exist, which tests/deployment creates
    "test_supervisor.py::test_run_as_root_without_the_halves_users_is_refused_before_starting_anything",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        where = item.path.relative_to(tests).as_posix()
        test = f"{where}::{item.name}"
        if where.startswith(SERIAL_FOLDERS) or where in SERIAL_FILES or test in SERIAL_TESTS:
            item.add_marker(pytest.mark.serial)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    good, other = root / "ca", root / "other"
    dmzbroker("certs", "init-ca", "--out", str(good), "--name", "test CA")
    dmzbroker("certs", "issue", "server", "--ca", str(good), "--out", str(good),
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    for uri in (CONSUMER_URI, ENERGY_URI, STRANGER_URI, MONITORING_URI):
        dmzbroker("certs", "issue", "client", "--ca", str(good), "--out", str(good), "--uri", uri)
    dmzbroker("certs", "init-ca", "--out", str(other), "--name", "someone else's CA")
    dmzbroker("certs", "issue", "client", "--ca", str(other), "--out", str(other),
              "--uri", "spiffe://test/consumer/intruder")  # fmt: skip
    return Pki(
        ca=good / "ca.crt",
        server_cert=good / "server.crt",
        server_key=good / "server.key",
        client_cert=good / "historian.crt",
        client_key=good / "historian.key",
        energy_cert=good / "energy-dashboard.crt",
        energy_key=good / "energy-dashboard.key",
        stranger_cert=good / "stranger.crt",
        stranger_key=good / "stranger.key",
        monitoring_cert=good / "prometheus.crt",
        monitoring_key=good / "prometheus.key",
        other_ca=other / "ca.crt",
        other_client_cert=other / "intruder.crt",
        other_client_key=other / "intruder.key",
    )


@pytest.fixture(scope="session")
def owners(tmp_path_factory: pytest.TempPathFactory) -> Owners:
    root = tmp_path_factory.mktemp("owners")
    made = {}
    for role, name in (("ot", "Olga OT"), ("it", "Ivan IT"), ("ot", "Otto OT"), ("ot", "Mallory")):
        dmzbroker("keys", "generate", "--role", role, "--name", name, "--out", str(root))
        made[name] = root / f"{role}-{name.lower().replace(' ', '-')}"
    dmzbroker("audit", "keygen", "--out", str(root / "audit.key"))
    trust_root = root / "trust-root.yaml"
    listed = [("Olga OT", "ot"), ("Ivan IT", "it"), ("Otto OT", "ot")]
    owner_args = [
        f"--owner={role}:{name}:{made[name].with_suffix('.pub')}" for name, role in listed
    ]
    dmzbroker("trust", "init", "--deployment-id", "coldstore-demo", *owner_args,
              "--out", str(trust_root))  # fmt: skip
    for name in ("Olga OT", "Ivan IT"):
        dmzbroker("trust", "sign", str(trust_root), "--key", str(made[name].with_suffix(".key")))
    return Owners(
        ot_key=made["Olga OT"].with_suffix(".key"),
        it_key=made["Ivan IT"].with_suffix(".key"),
        second_ot_key=made["Otto OT"].with_suffix(".key"),
        stranger_key=made["Mallory"].with_suffix(".key"),
        trust_root=trust_root,
        audit_key=root / "audit.key",
    )


@pytest.fixture
async def plant_sim() -> AsyncIterator[RefrigerationPlant]:
    sim = RefrigerationPlant("127.0.0.1", free_port(), tick_s=0.1)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
def deployment(
    tmp_path: Path, plant_sim: RefrigerationPlant, pki: Pki, owners: Owners
) -> Deployment:
    """The demo policy, co-signed by an OT and an IT owner, for the running simulator."""
    document = demo_policy(plant_sim.address[1])
    envelope = sign_policy(tmp_path, document, [owners.ot_key, owners.it_key])
    api_port = free_port()
    config = write_config(tmp_path, envelope, pki, api_port, owners)
    return Deployment(tmp_path, config, envelope, document, api_port)


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """start(command, config, reset_state=None): None adds --reset-state to a fresh install."""
    started: list[BrokerProcess] = []

    def start(command: str, config: Path, reset_state: bool | None = None) -> BrokerProcess:
        log = tmp_path / f"{command}-{len(started)}.log"
        process = BrokerProcess(command, config, log, reset_state)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()

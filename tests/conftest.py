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
    BrokerProcess,
    Deployment,
    Pki,
    dmzbroker,
    free_port,
    write_config,
    write_policy,
)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    good, other = root / "ca", root / "other"
    dmzbroker("certs", "init-ca", "--out", str(good), "--name", "test CA")
    dmzbroker("certs", "issue", "server", "--ca", str(good), "--out", str(good),
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    dmzbroker(
        "certs", "issue", "client", "--ca", str(good), "--out", str(good), "--uri", CONSUMER_URI
    )
    dmzbroker("certs", "init-ca", "--out", str(other), "--name", "someone else's CA")
    dmzbroker("certs", "issue", "client", "--ca", str(other), "--out", str(other),
              "--uri", "spiffe://test/consumer/intruder")  # fmt: skip
    return Pki(
        ca=good / "ca.crt",
        server_cert=good / "server.crt",
        server_key=good / "server.key",
        client_cert=good / "historian.crt",
        client_key=good / "historian.key",
        other_ca=other / "ca.crt",
        other_client_cert=other / "intruder.crt",
        other_client_key=other / "intruder.key",
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
def deployment(tmp_path: Path, plant_sim: RefrigerationPlant, pki: Pki) -> Deployment:
    policy = write_policy(tmp_path, plant_sim.address[1])
    api_port = free_port()
    return Deployment(tmp_path, write_config(tmp_path, policy, pki, api_port), policy, api_port)


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[[str, Path], BrokerProcess]]:
    started: list[BrokerProcess] = []

    def start(command: str, config: Path) -> BrokerProcess:
        process = BrokerProcess(command, config, tmp_path / f"{command}-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()

"""Fixtures of the connector tests: a PKI per module for the OPC UA servers and the broker
(it stands in for the suite's `pki` here), the structlog events a test logged, and a DNP3
outstation per module behind a counting proxy per test (dnp3_outstation.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog

from tests.plant.connectors.dnp3_outstation import CountingProxy, Dnp3Outstation
from tests.plant.connectors.opcua_server import OpcUaPki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> OpcUaPki:
    return make_pki(tmp_path_factory.mktemp("opcua-pki"))


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture(scope="module")
def dnp3_outstation() -> Iterator[Dnp3Outstation]:
    """opendnp3's outstation (8 points of each kind, unsolicited off), one per module."""
    with Dnp3Outstation() as station:
        yield station


@pytest.fixture
async def dnp3_proxy(dnp3_outstation: Dnp3Outstation) -> AsyncIterator[CountingProxy]:
    """The counting proxy in front of `dnp3_outstation`; whatever the test, the master must
    have sent READ and CONFIRM only (checked when the test ends)."""
    async with CountingProxy(dnp3_outstation.port) as proxy:
        yield proxy
    proxy.assert_read_only()

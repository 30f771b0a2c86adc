"""Fixtures of the OPC UA connector tests: a PKI per module for the servers and the broker
(it stands in for the suite's `pki` here), and the structlog events a test logged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from tests.plant.connectors.opcua_server import OpcUaPki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> OpcUaPki:
    return make_pki(tmp_path_factory.mktemp("opcua-pki"))


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured

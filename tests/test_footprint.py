"""What each process loads (issue 19, ADR 0029): a process holds in memory what it imports,
so the supervisor imports no protocol, HTTP or database library, and each half only what its
policy and config use. Each process runs as deployed (`python -I -m broker COMMAND`, through
a small runner that lists `sys.modules` when it exits) against the simulated plant, until it
has done its work: the plant half has written records, the enterprise half served them, the
supervisor started both halves. Lists, never RSS figures (those are in bench/footprint.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.commands import COMMAND_GROUPS, groups_for
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import (
    CONSUMER_URI,
    REPO,
    Owners,
    Pki,
    consumer_ssl,
    eventually,
    free_port,
    get_json,
    sign_policy,
    stop_process,
    write_config,
)

pytestmark = pytest.mark.timeout(90)

# Runs `python -m broker ARGS…` in this interpreter, then writes the names in sys.modules.
LISTING_RUNNER = """
import runpy, sys
listing, sys.argv = sys.argv[1], ["broker", *sys.argv[2:]]
try:
    runpy.run_module("broker", run_name="__main__", alter_sys=True)
finally:
    with open(listing, "w") as out:
        out.write("\\n".join(sorted(n for n, m in sys.modules.items() if m is not None)))
"""
PROTOCOLS = {"pymodbus", "asyncua", "bacpypes3"}  # the plant's device libraries
SERVING = {"aiohttp", "aiomqtt", "paho", "psycopg", "psycopg_binary"}  # the IT side's
TOOLING = {"scapy", "rich", "pygments", "psutil"}  # discovery, a renderer, posture


def modbus_only(port: int) -> dict[str, Any]:
    """Two input registers of the simulated PLC, one consumer seeing them."""
    return {
        "deployment_id": "coldstore-demo",
        "version": 1,
        "expires": datetime.now(UTC) + timedelta(days=30),
        "devices": [
            {
                "name": "plc",
                "protocol": "modbus",
                "host": "127.0.0.1",
                "port": port,
                "unit_id": 1,
                "poll_interval_s": 0.2,
            }
        ],
        "signals": [
            {
                "path": f"coldstore/plc/register_{address}",
                "device": "plc",
                "source": {"table": "input_register", "address": address, "type": "int16"},
            }
            for address in (0, 1)
        ],
        "roles": [{"name": "all", "signals": ["**"]}],
        "consumers": [{"identity": CONSUMER_URI, "roles": ["all"]}],
    }


@pytest.fixture
def api_port() -> int:
    return free_port()


@pytest.fixture
def config(
    tmp_path: Path, plant_sim: RefrigerationPlant, pki: Pki, owners: Owners, api_port: int
) -> Path:
    """An appliance with a Modbus-only policy and the HTTPS API as its only output."""
    document = modbus_only(plant_sim.address[1])
    envelope = sign_policy(tmp_path, document, [owners.ot_key, owners.it_key])
    return write_config(tmp_path, envelope, pki, api_port, owners)


class Listed:
    """`python -I -m broker ARGS…` whose modules are listed in a file when it exits."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.listing = tmp_path / f"{args[0]}.modules"
        self.log = tmp_path / f"{args[0]}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", LISTING_RUNNER, str(self.listing), *args],
                stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, start_new_session=True,
            )  # fmt: skip

    def logged(self, event: str) -> int:
        return self.log.read_text(errors="replace").count(f'"event": "{event}"')

    def stop(self) -> set[str]:
        """SIGTERM; the top-level packages it had imported."""
        assert stop_process(self.process, timeout=20) == 0, self.log.read_text()
        return {name.partition(".")[0] for name in self.listing.read_text().split()}


async def test_the_halves_load_only_their_side_and_what_their_policy_uses(
    tmp_path: Path, config: Path, pki: Pki, api_port: int
) -> None:
    common = ("--config", str(config), "--reset-state", "--log-format", "json")
    plant = Listed(tmp_path, "plant", *common)
    enterprise = Listed(tmp_path, "enterprise", *common)
    try:
        url = f"https://localhost:{api_port}/v1/snapshot"

        async def served() -> bool:
            try:
                status, body = await get_json(url, consumer_ssl(pki))
            except OSError:
                return False
            return status == 200 and len(body["records"]) == 2

        await eventually(served, timeout=60, interval=0.2)
    finally:
        plant_modules, enterprise_modules = plant.stop(), enterprise.stop()
    assert "pymodbus" in plant_modules  # the listing is of the process that read the PLC
    assert not plant_modules & (PROTOCOLS - {"pymodbus"} | SERVING | TOOLING)
    assert "aiohttp" in enterprise_modules  # the one that served the snapshot
    assert not enterprise_modules & (PROTOCOLS | SERVING - {"aiohttp"} | TOOLING)


async def test_the_supervisor_loads_no_protocol_serving_or_tooling_library(
    tmp_path: Path, config: Path
) -> None:
    run = Listed(
        tmp_path, "run", "--config", str(config), "--reset-state", "--same-user",
        "--log-format", "json",
    )  # fmt: skip
    try:
        await eventually(lambda: run.logged("half_started") == 2, timeout=60, interval=0.2)
    finally:
        modules = run.stop()
    assert "structlog" in modules  # the listing is of the process that logged half_started
    assert not modules & (PROTOCOLS | SERVING | TOOLING)


def test_each_command_group_adds_exactly_the_commands_it_is_listed_for() -> None:
    """The table `main` picks a command's group by: a wrong line would leave it unparsed."""
    for module, listed in COMMAND_GROUPS.items():
        commands = argparse.ArgumentParser().add_subparsers()
        (group,) = [g for g in groups_for(None) if g.__name__.endswith(f".{module}")]
        group.add_to(commands)
        assert tuple(commands.choices) == listed, module
        assert [g.__name__ for g in groups_for(listed[0])] == [group.__name__]

"""The shipped example files are valid: an integrator can start from them."""

from __future__ import annotations

import configparser

from broker import config
from broker.enterprise.listener import RESERVED_FILES
from tests.harness import REPO

DEPLOY = REPO / "deploy"


def test_the_example_appliance_config_parses() -> None:
    loaded = config.load(DEPLOY / "broker.yaml")
    assert loaded.enterprise.listen.port == 8443
    assert loaded.log.format == "json"


def test_each_half_runs_as_its_own_user_with_its_own_address_allowlist() -> None:
    units = {}
    for half in ("plant", "enterprise"):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(DEPLOY / "systemd" / f"dmzbroker-{half}.service")
        units[half] = unit["Service"]
        assert f"dmzbroker {half} --config" in units[half]["ExecStart"]
        assert units[half]["IPAddressDeny"] == "any"
    assert units["plant"]["User"] != units["enterprise"]["User"]
    assert units["plant"]["IPAddressAllow"] != units["enterprise"]["IPAddressAllow"]


def test_each_half_has_resource_ceilings_and_the_connection_limit_fits_its_file_limit() -> None:
    loaded = config.load(DEPLOY / "broker.yaml")
    for half in ("plant", "enterprise"):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(DEPLOY / "systemd" / f"dmzbroker-{half}.service")
        service = unit["Service"]
        assert int(service["LimitNOFILE"]) >= 1024
        assert int(service["TasksMax"]) >= 16
        assert service["MemoryMax"].endswith("G")
        if half == "enterprise":
            room = int(service["LimitNOFILE"]) - RESERVED_FILES
            assert loaded.enterprise.listen.max_connections <= room

"""The table of users and written folders that install.sh, the units and `run` follow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker import config
from broker.deployment.layout import (
    DIODE_USER,
    ENTERPRISE_USER,
    PLANT_USER,
    user_of,
    written_paths,
)
from tests.harness import REPO

SHIPPED = REPO / "deploy" / "broker.yaml"
STATE = Path("/var/lib/dmzbroker")


def with_diode(tmp_path: Path) -> config.BrokerConfig:
    document = yaml.safe_load(SHIPPED.read_text())
    document["diode"] = {"host": "198.51.100.7", "state_dir": "/var/lib/dmzbroker/diode"}
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(document))
    return config.load(path)


def test_the_shipped_config_writes_the_folders_install_sh_creates() -> None:
    assert written_paths(config.load(SHIPPED)) == {
        "plant": (STATE / "spool", STATE / "plant", STATE / "audit" / "plant"),
        "enterprise": (STATE / "enterprise", STATE / "audit" / "enterprise"),
        "supervisor": (STATE / "audit" / "supervisor",),
    }


def test_the_diode_processes_appear_only_with_a_diode_section(tmp_path: Path) -> None:
    paths = written_paths(with_diode(tmp_path))
    assert paths["diode-send"] == (STATE / "diode", STATE / "audit" / "diode-send")
    # on the IT host the receiver writes the spool the enterprise half reads
    assert paths["diode-receive"] == (
        STATE / "spool",
        STATE / "diode",
        STATE / "audit" / "diode-receive",
    )


def test_each_process_has_its_user() -> None:
    assert [user_of(p) for p in ("plant", "enterprise", "diode-send", "diode-receive")] == [
        PLANT_USER,
        ENTERPRISE_USER,
        DIODE_USER,
        PLANT_USER,
    ]
    assert user_of("supervisor") == "root"
    with pytest.raises(KeyError):
        user_of("validate")


def test_no_folder_is_written_by_two_users(tmp_path: Path) -> None:
    """The enterprise user writes nothing a plant-side process writes, and the reverse."""
    writers: dict[Path, set[str]] = {}
    for process, folders in written_paths(with_diode(tmp_path)).items():
        for folder in folders:
            writers.setdefault(folder, set()).add(user_of(process))
    shared = {folder: users for folder, users in writers.items() if len(users) > 1}
    # diode.state_dir is one path in one file, but the sender and the receiver run on two
    # different hosts: each host has only one of them.
    assert shared == {STATE / "diode": {DIODE_USER, PLANT_USER}}
    assert not any(ENTERPRISE_USER in users for users in shared.values())

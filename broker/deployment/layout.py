"""Who runs each process of the appliance, and which folders each one writes.

The users and folders `deploy/install.sh` creates, the units' sandboxes and `dmzbroker run`
(started as root) all follow this one table, so that a folder a process writes is writable
by that process's user and by no other. This module only names; it never creates a user or
a folder, and never imports either half.
"""

from __future__ import annotations

from pathlib import Path

from broker.config import BrokerConfig

PLANT_USER = "dmzbroker-plant"
ENTERPRISE_USER = "dmzbroker-enterprise"
DIODE_USER = "dmzbroker-diode"  # the diode sender on an OT host (reads the spool)

_USERS = {
    "plant": PLANT_USER,
    "enterprise": ENTERPRISE_USER,
    "diode-send": DIODE_USER,
    # On the IT host the receiver is the spool's only writer, as the plant half is on the OT
    # host: the enterprise half reads either spool the same way.
    "diode-receive": PLANT_USER,
    "supervisor": "root",  # `run` drops to each half's user; it keeps root to do so
}


def written_paths(cfg: BrokerConfig) -> dict[str, tuple[Path, ...]]:
    """Process name → every folder that process writes (the diode's only with `diode:`)."""
    audit = cfg.audit.dir
    paths: dict[str, tuple[Path, ...]] = {
        "plant": (cfg.spool.dir, cfg.plant.state_dir, audit / "plant"),
        "enterprise": (cfg.enterprise.state_dir, audit / "enterprise"),
        "supervisor": (audit / "supervisor",),
    }
    if cfg.diode is not None:
        paths["diode-send"] = (cfg.diode.state_dir, audit / "diode-send")
        paths["diode-receive"] = (cfg.spool.dir, cfg.diode.state_dir, audit / "diode-receive")
    return paths


def user_of(process: str) -> str:
    """The user `process` (a key of `written_paths`) runs as; KeyError for an unknown one."""
    return _USERS[process]

"""Command groups of the CLI; a new group is one module here and one line in this table.

A group's module is imported only when one of its commands runs (all of them for the
top-level help or a command no group adds): `run` and each half then hold no other
command's code and libraries in memory (ADR 0029).
"""

import importlib
from types import ModuleType

# Module of broker.commands → the commands it adds; `--help` lists them in this order.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "processes": ("run", "plant", "enterprise", "demo"),
    "certs": ("certs",),
    "keys": ("keys",),
    "trust": ("trust",),
    "policy": ("policy",),
    "island": ("island",),
    "audit": ("audit",),
    "plan": ("plan",),
    "discover": ("discover",),
    "validate": ("validate",),
    "deploy": ("deploy",),
    "posture": ("posture",),
    "diode": ("diode",),
    "sim": ("sim",),
}


def groups_for(command: str | None) -> list[ModuleType]:
    """The modules that add `command`; every group's for None or a command none adds."""
    named = [module for module, commands in COMMAND_GROUPS.items() if command in commands]
    return [importlib.import_module(f"{__name__}.{m}") for m in named or COMMAND_GROUPS]

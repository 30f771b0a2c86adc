"""The starter policy `discover dnp3` and `discover bacnet` print; every discover's quiet logs.

Used by the discover commands only (the CLI, never a running half). It renders what a
command found as YAML that `policy compile` accepts as printed: placeholders for the
deployment id, version and expiry, the one device, and each signal after a comment line
with what the device answered for it. It decides nothing about what crosses: the OT owner
edits the paths, units and scale, deletes what must not cross, and co-signs it. A signal's
source carries no `protocol` key: the device says it (docs/policy.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from broker import logs

EXPIRES_IN = timedelta(days=90)  # a placeholder the owner sets; a starter must still compile
EDIT = (  # the end of each starter's header
    "# Set deployment_id, version and expires; edit each path (site/area/asset/measure),",
    "# unit and scale, delete what must not cross; then compile and co-sign it.",
)


def quiet_logs() -> None:
    """stdout is the YAML and an error is one line (`dmzbroker: error: …`): no log lines."""
    logs.configure("console", "cli")
    logging.getLogger().setLevel(logging.ERROR)


@dataclass(frozen=True)
class Listed:
    """One signal of the starter, and the comment line printed above it."""

    comment: str  # what the device answered for it, for the owner who edits the starter
    signal: dict[str, Any]  # path, device, source (without `protocol`), unit, description


def starter_policy(
    header: Sequence[str],
    device: Mapping[str, Any],
    listed: Sequence[Listed],
    *,
    more_devices: Sequence[Mapping[str, Any]] = (),
) -> str:
    """`header` (comment lines, `EDIT` among them), the policy's top keys and `device` (and
    `more_devices`: `discover pcap` drafts several), then each listed signal after its comment."""
    document = {
        "deployment_id": "change-me",
        "version": 1,
        "expires": (datetime.now(UTC) + EXPIRES_IN).strftime("%Y-%m-%dT00:00:00Z"),
        "devices": [dict(device), *map(dict, more_devices)],
    }
    lines = list(header)
    lines.append(yaml.safe_dump(document, sort_keys=False, allow_unicode=True).rstrip("\n"))
    lines.append("signals:")
    for entry in listed:
        lines.append(f"  # {entry.comment}")
        dumped = yaml.safe_dump([entry.signal], sort_keys=False, allow_unicode=True)
        lines += ["  " + line for line in dumped.splitlines()]
    return "\n".join(lines) + "\n"

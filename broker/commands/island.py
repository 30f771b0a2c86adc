"""`island on|off`: stop (or resume) all data crossing, from the plant side."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

import structlog

from broker import config, island, logs
from broker.audit.log import AuditLog
from broker.commands.processes import add_config_argument
from broker.policy import trustroot


def add_to(commands: Any) -> None:
    command = commands.add_parser(
        "island", help="stop all data crossing (on) or let it resume (off); survives restarts"
    )
    command.add_argument("state", choices=("on", "off"))
    command.add_argument("--reason", default="", help="recorded with the event")
    add_config_argument(command)
    command.set_defaults(handler=_island)


def _island(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    audit = AuditLog.open(cfg.audit, trustroot.load(cfg.trust_root).deployment_id, "cli")
    logs.configure(cfg.log.format, "cli", audit)
    try:
        state_dir = cfg.plant.state_dir
        if args.state == "on":
            changed = island.turn_on(state_dir, args.reason)
        else:
            changed = island.turn_off(state_dir)
        event = "island_mode_on" if args.state == "on" else "island_mode_off"
        structlog.get_logger("island").warning(
            event, changed=changed, reason=args.reason, actor=getpass.getuser()
        )
    finally:
        audit.close()
    print(f"island mode {args.state}" + ("" if changed else " (it already was)"))
    return 0

"""`deploy nftables`: the appliance's firewall, written from its config and verified policy.

The policy is verified against the trust root exactly as the plant half checks it (the
plant's records are the floor), so the ruleset never names a device the signed policy does
not; nothing is admitted, audited or recorded, and no half needs to run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from broker import safe_files
from broker.commands.processes import add_config_argument, opened_half
from broker.config import BrokerConfig
from broker.deployment import nftables
from broker.deployment.layout import PLANT_USER
from broker.errors import ConfigError

T = TypeVar("T")
RULESET_MODE = 0o644  # read by the nftables service; it holds no secret


def add_to(commands: Any) -> None:
    deploy = commands.add_parser(
        "deploy", help="write what the operating system enforces around the broker"
    )
    targets = deploy.add_subparsers(required=True, metavar="TARGET")
    help_text = "the two-NIC nftables ruleset, from the config and the verified policy"
    command = targets.add_parser(
        "nftables",
        help=help_text,
        description=f"Write {help_text} (deploy/nftables/README.md). Host names are resolved "
        "now. Exit 2: configuration, policy, trust or argument error.",
    )
    add_config_argument(command)
    command.add_argument("--ot-interface", default="ot0", help="the NIC towards the plant")
    command.add_argument("--it-interface", default="it0", help="the NIC towards IT")
    command.add_argument(
        "--it-allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="a consumer source network (repeatable; default: any source)",
    )
    command.add_argument(
        "--ot-user",
        action="append",
        default=[],
        metavar="USER",
        help="a user (name or uid) that may open connections to the devices (repeatable; "
        f"default: {PLANT_USER}); a name must exist where the ruleset is loaded",
    )
    command.add_argument("--out", type=Path, help="write the ruleset here (default: stdout)")
    command.set_defaults(handler=_nftables, log_format=None)


def _plant_state(cfg: BrokerConfig) -> Path:
    return cfg.plant.state_dir


def _nftables(args: argparse.Namespace) -> int:
    ot = _parsed("--ot-interface", nftables.interface_name, args.ot_interface)
    it = _parsed("--it-interface", nftables.interface_name, args.it_interface)
    it_allow = [_parsed("--it-allow", nftables.source_network, value) for value in args.it_allow]
    ot_users = [_parsed("--ot-user", nftables.user, value) for value in args.ot_user]
    if ot == it:
        raise ConfigError(f"--ot-interface and --it-interface are both {ot!r}: name two NICs")
    # Logs go to stderr; the ruleset is the only thing on stdout.
    with opened_half(args, "deploy", _plant_state, admit=False, audited=False) as (
        cfg,
        trusted,
        _,
    ):
        written = nftables.write(
            cfg,
            trusted.policy,
            ot_interface=ot,
            it_interface=it,
            it_allow=it_allow,
            ot_users=ot_users or [PLANT_USER],
        )
    for peer in written.devices_by_name:
        addresses = ", ".join(str(address) for address in peer.addresses)
        print(
            f"dmzbroker: warning: {peer.key}: {peer.host!r} resolved to {addresses} now; the "
            "ruleset allows no DNS, so the plant half cannot resolve it while the ruleset is "
            "loaded: name the device by address (or pin the name to these addresses in "
            "/etc/hosts)",
            file=sys.stderr,
        )
    text = written.text
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        safe_files.replace_durably(args.out, text.encode(), mode=RULESET_MODE)
        os.chmod(args.out, RULESET_MODE)  # whatever the umask took away
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write: {e.strerror or e}") from e
    return 0


def _parsed(flag: str, parse: Callable[[str], T], value: str) -> T:
    try:
        return parse(value)
    except ValueError as e:
        raise ConfigError(f"{flag} {e}") from e

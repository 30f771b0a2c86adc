"""`discover opcua URL`: browse an OPC UA server and print a starter signal list for a policy.

It sends Browse and Read only, over a session secured exactly like the connector's (the
server certificate pinned with `--pin` or found in `--trust`; `--security None` only when
asked for). A server that refuses the broker's certificate is named as such, in one line
with what to give its administrator to trust (exit 2). The output is YAML an OT owner
edits (paths, units, what to share) before it goes into a policy: discovery never decides
what crosses.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from broker.policy.device_schema import OPCUA_SECURITY_POLICIES


def add_to(commands: Any) -> None:
    group = commands.add_parser("discover", help="browse a device and print a starter policy")
    sub = group.add_subparsers(required=True, metavar="PROTOCOL")
    opcua = sub.add_parser("opcua", help="browse an OPC UA server (Browse and Read only)")
    opcua.add_argument("url", help="opc.tcp://host:port[/path]")
    opcua.add_argument("--security", choices=[*OPCUA_SECURITY_POLICIES, "None"],
                       default="Basic256Sha256", help="security policy (None only if you say so)")  # fmt: skip
    opcua.add_argument("--mode", choices=["SignAndEncrypt", "Sign"], default="SignAndEncrypt")
    opcua.add_argument("--certificate", type=Path, help="the plant's OPC UA certificate (.pem)")
    opcua.add_argument("--key", type=Path, help="its private key (.pem)")
    opcua.add_argument("--trust", type=Path, action="append", default=[],
                       help="a trusted server certificate, CA or folder of them (repeatable)")  # fmt: skip
    opcua.add_argument("--pin", help="the server certificate's SHA-256 (hex), instead of --trust")
    opcua.add_argument("--username", help="user identity (default: anonymous)")
    opcua.add_argument("--password-file", type=Path, help="the password, on its first line")
    opcua.add_argument("--device-name", default="opcua-plc", help="the device's name in the policy")
    opcua.add_argument("--max-nodes", type=int, default=5000, help="stop browsing after this many")
    opcua.set_defaults(handler=_discover_opcua)


def _discover_opcua(args: argparse.Namespace) -> int:
    # Imported here, not at the top: every CLI process (the halves' too) imports the command
    # modules, and only this command needs asyncua (0.2 s to import).
    from broker.plant.discovery import discover_opcua

    return discover_opcua(args)

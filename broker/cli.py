"""The one command line: `dmzbroker COMMAND …`. Each command group is a module in
`broker.commands`, registered there in a plain list.

Every user-facing failure is one line on stderr (`dmzbroker: error: …`) and an exit code:
2 for configuration, policy and trust problems, 1 for others. Never a traceback for a user's
mistake.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from broker import __version__
from broker.commands import COMMAND_GROUPS
from broker.errors import DmzBrokerError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DmzBrokerError as e:
        print(f"dmzbroker: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dmzbroker audit show … | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmzbroker", description="One-way, deny-by-default OT/IT boundary broker."
    )
    parser.add_argument("--version", action="version", version=f"dmzbroker {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_to(commands)
    return parser

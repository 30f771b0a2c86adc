"""The one command line: `dmzbroker COMMAND …`. Each command group is a module in
`broker.commands`, registered there in a plain list.

Every user-facing failure is one line on stderr (`dmzbroker: error: …`) and an exit code:
2 for configuration, policy and trust problems, 1 for others. Never a traceback for a user's
mistake.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from typing import Any

from broker import __version__
from broker.commands import groups_for
from broker.errors import DmzBrokerError


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    args = _parser(command).parse_args(argv)
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


class _DefaultsShown(argparse.HelpFormatter):
    """`--help` that gives every option's default, so that no one reads the code to learn
    what `--days` is when not given. Options without one (None, False, empty) and those
    whose help already words it are shown as written."""

    def _format_action(self, action: argparse.Action) -> str:
        default, written = action.default, action.help or ""
        nothing = default is None or isinstance(default, bool) or default in ("", [])
        if (
            action.option_strings
            and not nothing
            and default is not argparse.SUPPRESS
            and written is not argparse.SUPPRESS
            and "default" not in written.lower()
        ):
            action = copy.copy(action)  # the parser's own action stays as written
            action.help = f"{written} (default: %(default)s)".lstrip()
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """Every command's parser (subparsers are made of the parent's class) shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsShown)
        super().__init__(*args, **kwargs)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line with `command`'s group only (None: every group, as `--help` needs)."""
    parser = _Parser(
        prog="dmzbroker", description="One-way, deny-by-default OT/IT boundary broker."
    )
    parser.add_argument("--version", action="version", version=f"dmzbroker {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in groups_for(command):
        group.add_to(commands)
    return parser

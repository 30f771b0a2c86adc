"""`validate`: read the real devices for a while without publishing, and say which proposed
signals are fit to approve (docs/model.md, "Validating proposed signals").

Runs on the verified, co-signed policy the config names, checked exactly as the plant half
checks it, but never recorded as accepted; it never opens the spool.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import msgspec

from broker.commands.processes import add_config_argument, add_log_format_argument, opened_half
from broker.config import BrokerConfig
from broker.errors import ConfigError
from broker.lifecycle import run_until_signalled
from broker.policy.schema import duration_s

NOT_FIT = 3  # the run completed and a proposed signal is not fit
INTERRUPTED = 130  # stopped early: the report covers less than was asked for


def add_to(commands: Any) -> None:
    help_text = "read the devices without publishing; report which proposed signals are fit"
    command = commands.add_parser(
        "validate",
        help=help_text,
        description=f"{help_text}. Exit 0: every proposed signal is fit; {NOT_FIT}: one is "
        f"not; {INTERRUPTED}: stopped early; 2: configuration, policy or trust error.",
    )
    add_config_argument(command)
    command.add_argument("--duration", default="10m", help="how long to read: 90s, 10m, 1h")
    command.add_argument("--json", action="store_true", help="the report as JSON")
    add_log_format_argument(command)
    command.set_defaults(handler=_validate)


def _plant_state(cfg: BrokerConfig) -> Path:
    return cfg.plant.state_dir


def _validate(args: argparse.Namespace) -> int:
    # only this command loads plant code: the enterprise half's process never does
    from broker.plant.validate import Validation, render  # noqa: PLC0415

    try:
        duration = duration_s(args.duration)
    except ValueError as e:
        raise ConfigError(f"--duration: {e}") from e
    # Same trust path as the plant half (its state dir guards against rollback), but a
    # validation admits nothing: the accepted version stays the plant half's to record.
    with opened_half(args, "validate", _plant_state, admit=False) as (cfg, trusted, _):
        validation = Validation(trusted.policy, cfg.plant)

        async def main() -> int:
            try:
                await validation.observe(duration)
            except asyncio.CancelledError:
                # Ctrl-C or SIGTERM: the one stop request this process gets; report what
                # was gathered instead of ending without a word.
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()
            report = validation.report(duration)
            if args.json:
                sys.stdout.buffer.write(msgspec.json.encode(report) + b"\n")
            else:
                print(render(report))
            sys.stdout.flush()
            if not report.complete:
                return INTERRUPTED
            proposed = [s for s in report.signals if s.lifecycle == "proposed"]
            return NOT_FIT if len(report.promotable) < len(proposed) else 0

        return run_until_signalled(main())

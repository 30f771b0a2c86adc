"""`diode send` and `diode receive`: the two ends of the diode channel (ADR 0019).

`send` runs on the OT host beside the plant half and reads its spool; `receive` runs on the
IT host and writes the spool the enterprise half reads there. Neither admits the policy:
the sender forwards only what the plant half already gated under the verified policy, and
the receiver only what crossed; each keeps its own audit log ("diode-send",
"diode-receive"), opened under the deployment of the trust root, which is verified alone.
"""

from __future__ import annotations

import argparse
from typing import Any

from broker.channel.udp import DiodeSender
from broker.channel.udp_receiver import DiodeReceiver
from broker.commands.processes import (
    add_config_argument,
    add_log_format_argument,
    opened_channel,
)
from broker.lifecycle import run_until_signalled


def add_to(commands: Any) -> None:
    diode = commands.add_parser(
        "diode",
        help="carry the spool across a hardware data diode (UDP, one way)",
        description="Two hosts with a hardware data diode between them: `send` on the OT host "
        "reads the spool and sends datagrams; `receive` on the IT host writes its own spool, "
        "which the enterprise half reads.",
    )
    ends = diode.add_subparsers(dest="end", required=True, metavar="{send,receive}")
    for name, handler, help_text in (
        ("send", _send, "read the spool and send it to the receiver (OT host)"),
        ("receive", _receive, "receive datagrams and write the spool (IT host)"),
    ):
        end = ends.add_parser(name, help=help_text, description=help_text)
        add_config_argument(end)
        add_log_format_argument(end)
        end.set_defaults(handler=handler)


def _send(args: argparse.Namespace) -> int:
    with opened_channel(args, "diode-send") as (cfg, _):
        assert cfg.diode is not None  # opened_channel refuses a config without it
        return run_until_signalled(DiodeSender(cfg.spool, cfg.diode).run())


def _receive(args: argparse.Namespace) -> int:
    with opened_channel(args, "diode-receive") as (cfg, _):
        assert cfg.diode is not None
        return run_until_signalled(DiodeReceiver(cfg.spool, cfg.diode).run())

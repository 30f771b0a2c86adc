"""`run`, `plant`, `enterprise`, `demo`: the long-running commands.

Each command imports only what it runs: the plant process never loads the enterprise half's
code and the reverse, so the boundary holds inside each process as well as between them.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker import config, logs
from broker.errors import PolicyRefused
from broker.lifecycle import run_until_signalled
from broker.policy import activation, trustroot

DEFAULT_CONFIG = Path("/etc/dmzbroker/broker.yaml")


def add_to(commands: Any) -> None:
    for name, handler, help_text in (
        ("run", _run, "start the plant half and the enterprise half as two processes"),
        ("plant", _plant, "start the plant half only (reads devices, writes the spool)"),
        ("enterprise", _enterprise, "start the enterprise half only (serves consumers)"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        add_config_argument(command)
        command.add_argument(
            "--log-format", choices=("auto", "json", "console"), help="overrides log.format"
        )
        command.set_defaults(handler=handler)

    demo = commands.add_parser(
        "demo", help="run a simulated refrigeration plant through the broker",
        description="Generate a throwaway PKI and owner keys, sign the example policy, start a "
        "simulated plant and the broker on it.",
    )  # fmt: skip
    demo.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"), help="demo files (recreated)")
    demo.add_argument("--policy", type=Path, default=Path("policies/refrigeration.yaml"))
    demo.add_argument("--port", type=int, default=8443, help="HTTPS port of the consumer API")
    demo.set_defaults(handler=_demo)


def add_config_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="broker.yaml")


def load_half(
    args: argparse.Namespace, process: str, state_dir_of: Any, *, persist: bool = True
) -> tuple[config.BrokerConfig, activation.TrustedPolicy]:
    """Config, logging, and the verified policy admitted into this half's state dir."""
    cfg = config.load(args.config)
    logs.configure(args.log_format or cfg.log.format, process)
    trust = trustroot.load(cfg.trust_root)
    try:
        trusted = activation.load_trusted(
            cfg.policy, trust, state_dir_of(cfg), datetime.now(UTC), persist=persist
        )
    except PolicyRefused as e:
        activation.log_refusal(e)
        raise
    activation.log_acceptance(trusted)
    return cfg, trusted


def _plant_state(cfg: config.BrokerConfig) -> Path:
    return cfg.plant.state_dir


def _enterprise_state(cfg: config.BrokerConfig) -> Path:
    return cfg.enterprise.state_dir


def _run(args: argparse.Namespace) -> int:
    from broker.supervisor import Supervisor

    # Refuse a bad config or policy before starting anything; the halves admit it themselves.
    cfg, _ = load_half(args, "supervisor", _plant_state, persist=False)
    return run_until_signalled(Supervisor(args.config, args.log_format or cfg.log.format).run())


def _plant(args: argparse.Namespace) -> int:
    from broker.plant.run import run_plant

    cfg, trusted = load_half(args, "plant", _plant_state)
    return run_until_signalled(run_plant(cfg, trusted))


def _enterprise(args: argparse.Namespace) -> int:
    from broker.enterprise.run import run_enterprise

    cfg, trusted = load_half(args, "enterprise", _enterprise_state)
    return run_until_signalled(run_enterprise(cfg, trusted))


def _demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    logs.configure("auto", "demo")
    return run_until_signalled(
        run_demo(args.workdir, args.policy.resolve(), args.seconds, args.port)
    )

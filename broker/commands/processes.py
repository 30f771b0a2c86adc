"""`run`, `plant`, `enterprise`, `demo`: the long-running commands.

Each command imports only what it runs: the plant process never loads the enterprise half's
code and the reverse, so the boundary holds inside each process as well as between them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from broker import __version__, config, logs
from broker.audit.log import AuditLog
from broker.errors import PolicyRefused
from broker.folder_lock import FolderLock
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


@contextlib.contextmanager
def opened_half(
    args: argparse.Namespace,
    process: str,
    state_dir_of: Callable[[config.BrokerConfig], Path],
    *,
    audited: bool = True,
    admit: bool = True,
) -> Iterator[tuple[config.BrokerConfig, activation.TrustedPolicy, AuditLog | None]]:
    """Config, the audit log, logging, and the verified policy admitted into this half's
    state dir (with `admit=False`, checked against it and left unrecorded); the audit log
    gets a final checkpoint when the half stops. A half that admits holds its state dir's
    lock meanwhile (one instance per folder, ADR 0013)."""
    cfg = config.load(args.config)
    trust = trustroot.load(cfg.trust_root)
    with FolderLock(state_dir_of(cfg)) if admit else contextlib.nullcontext():
        audit = AuditLog.open(cfg.audit, trust.deployment_id, process) if audited else None
        logs.configure(args.log_format or cfg.log.format, process, audit)
        log = structlog.get_logger(process)
        if audit is not None:
            log.info("process_started", pid=os.getpid(), version=__version__, boot_id=audit.boot_id)
            log.info(
                "config_loaded",
                path=str(args.config.resolve()),
                sha256=hashlib.sha256(args.config.read_bytes()).hexdigest(),
                trust_root_version=trust.version,
            )
        try:
            try:
                trusted = activation.load_trusted(
                    cfg.policy, trust, state_dir_of(cfg), datetime.now(UTC), persist=admit
                )
            except PolicyRefused as e:
                activation.log_refusal(e)
                raise
            activation.log_acceptance(trusted)
            yield cfg, trusted, audit
        finally:
            if audit is not None:
                log.info("process_stopped", pid=os.getpid())
                audit.close()


def _plant_state(cfg: config.BrokerConfig) -> Path:
    return cfg.plant.state_dir


def _enterprise_state(cfg: config.BrokerConfig) -> Path:
    return cfg.enterprise.state_dir


def _run(args: argparse.Namespace) -> int:
    from broker.supervisor import Supervisor, refuse_if_running

    # Refuse a bad config or policy, or folders another instance writes, before starting
    # anything; the halves admit (and audit) the policy themselves. The supervisor's own
    # audit writer holds its folder: a second `run` is refused right there.
    with opened_half(args, "supervisor", _plant_state, admit=False) as (cfg, _, audit):
        assert audit is not None
        refuse_if_running(cfg)
        fmt = args.log_format or cfg.log.format
        return run_until_signalled(Supervisor(args.config, fmt, cfg.supervisor, audit).run())


def _plant(args: argparse.Namespace) -> int:
    from broker.plant.run import run_plant

    with opened_half(args, "plant", _plant_state) as (cfg, trusted, audit):
        assert audit is not None
        return run_until_signalled(run_plant(cfg, trusted, audit))


def _enterprise(args: argparse.Namespace) -> int:
    from broker.enterprise.run import run_enterprise

    with opened_half(args, "enterprise", _enterprise_state) as (cfg, trusted, audit):
        assert audit is not None
        return run_until_signalled(run_enterprise(cfg, trusted, audit))


def _demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    logs.configure("auto", "demo")
    return run_until_signalled(
        run_demo(args.workdir, args.policy.resolve(), args.seconds, args.port)
    )

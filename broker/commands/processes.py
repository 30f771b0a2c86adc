"""`run`, `plant`, `enterprise`, `demo`: the long-running commands.

Each command imports only what it runs: the plant process never loads the enterprise half's
code and the reverse, so the boundary holds inside each process as well as between them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from broker import __version__, config, logs, preflight
from broker.audit.log import AuditLog
from broker.errors import ConfigError, PolicyRefused, TrustRootRefused
from broker.folder_lock import FolderLock
from broker.lifecycle import run_until_signalled
from broker.policy import accepted as records
from broker.policy import activation, collection, trustroot
from broker.policy import envelope as envelopes

if TYPE_CHECKING:
    from broker import run_checks

DEFAULT_CONFIG = Path("/etc/dmzbroker/broker.yaml")
# Whose files each process checks before it starts (broker.preflight): `run`'s supervisor
# both halves', before starting either; a half, or `validate`, its own. Others (`deploy
# nftables`) read the policy and trust root only, which opened_half checks anyway.
CHECKED_HALVES = {
    "supervisor": ("plant", "enterprise"),
    "plant": ("plant",),
    "enterprise": ("enterprise",),
    "validate": ("plant",),
}
_PR_SET_NO_NEW_PRIVS = 38  # linux/prctl.h


def add_to(commands: Any) -> None:
    for name, handler, help_text in (
        ("run", _run, "start the plant half and the enterprise half as two processes"),
        ("plant", _plant, "start the plant half only (reads devices, writes the spool)"),
        ("enterprise", _enterprise, "start the enterprise half only (serves consumers)"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        add_config_argument(command)
        add_log_format_argument(command)
        command.add_argument(
            "--reset-state",
            action="store_true",
            help="a new installation: start although neither the state dir nor the audit log "
            "records an accepted policy and trust root (audited as state_reset)",
        )
        command.set_defaults(handler=handler)
        if name == "run":
            # Internal: the short-lived child in which `run` checks everything (ADR 0031).
            command.add_argument("--checks-only", action="store_true", help=argparse.SUPPRESS)
            command.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)  # its pipe
            command.add_argument(
                "--same-user",
                action="store_true",
                help="started as root, run both halves as root instead of as dmzbroker-plant "
                "and dmzbroker-enterprise (audited as halves_share_user: the enterprise half "
                "could then write the plant half's spool, state and audit log)",
            )

    demo = commands.add_parser(
        "demo", help="run a simulated refrigeration plant through the broker",
        description="Generate a throwaway PKI and owner keys, sign the example policy, start a "
        "simulated plant and the broker on it.",
    )  # fmt: skip
    demo.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"), help="demo files (recreated)")
    demo.add_argument("--policy", type=Path, default=Path("policies/refrigeration.yaml"))
    demo.add_argument("--port", type=int, default=8443, help="HTTPS port of the consumer API")
    demo.add_argument(
        "--opcua-port",
        type=int,
        default=4840,
        help="port of the read-only OPC UA server (0: none, which starts about a second sooner)",
    )
    demo.set_defaults(handler=_demo)


def add_config_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="broker.yaml")


def add_log_format_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--log-format", choices=("auto", "json", "console"), help="overrides log.format"
    )


@contextlib.contextmanager
def opened_half(
    args: argparse.Namespace,
    process: str,
    state_dir_of: Callable[[config.BrokerConfig], Path],
    *,
    audited: bool = True,
    admit: bool = True,
    reset_state: bool | None = None,
    stopped_entry: bool = True,
) -> Iterator[tuple[config.BrokerConfig, activation.TrustedPolicy, AuditLog | None]]:
    """Config, the trust root in force, the audit log, logging, and the verified policy
    admitted into this half's state dir (with `admit=False`, checked against it and left
    unrecorded); the audit log gets a final checkpoint when the half stops. A half that
    admits holds its state dir's lock meanwhile (one instance per folder, ADR 0013).

    What was accepted before is the floor: the state dir's records and this half's own audit
    log (broker.policy.accepted). With neither, the start is refused unless `reset_state`
    (`--reset-state`, audited as `state_reset`); None: a check that admits nothing and needs
    no record (`validate`). `stopped_entry=False`: no `process_stopped`, for `run`'s checks,
    after which the supervisor goes on."""
    halves = CHECKED_HALVES.get(process)
    cfg = config.load(args.config, preflight.problems(halves) if halves is not None else None)
    state_dir = state_dir_of(cfg)
    # A check that is no half (run's, validate's) reads the plant half's records, whose
    # state dir it checks against.
    own = process in ("plant", "enterprise")
    writer = process if own else "plant"
    writer_dir = cfg.audit.dir / writer
    with FolderLock(state_dir) if admit else contextlib.nullcontext():
        # The root in force is always the file's own, verified alone; what this half
        # recorded only limits it (broker.policy.activation.root_at_start).
        try:
            candidate = trustroot.load(cfg.trust_root)
        except ConfigError as e:
            if audited:
                _audit_refused_root(args, cfg, process, e)
            raise
        audit = AuditLog.open(cfg.audit, candidate.deployment_id, process) if audited else None
        log = structlog.get_logger(process)
        try:
            logs.configure(args.log_format or cfg.log.format, process, audit)
            if audit is not None:
                _log_start(args, process, audit, candidate.version)
            if halves is not None:
                preflight.warn(cfg, halves)
            # Only the chain the writer adopted counts: from this writer's head, in memory,
            # or, for another writer's log, from its last checkpoint that verifies.
            head = (
                audit.head[1]
                if own and audit is not None
                else records.adopted_head(
                    writer_dir, cfg.audit.key, candidate.deployment_id, writer
                )
            )
            floor = records.floor(state_dir, writer_dir, head)
            missing = floor.missing(state_dir, writer_dir)
            if missing and reset_state is False:
                raise ConfigError(
                    "; ".join(missing) + "; if this is a new installation, start once with "
                    "--reset-state"
                )
            floor_version = floor.policy.version if floor.policy is not None else None
            try:
                in_force = activation.root_at_start(
                    candidate, cfg.trust_root, floor, cfg.policy, state_dir, persist=admit
                )
            except TrustRootRefused as e:
                activation.log_root_refusal(e, None, policy_version=floor_version)
                raise
            trust = in_force.root
            if admit:
                if missing and reset_state:
                    log.warning(
                        "state_reset",
                        missing=missing,
                        action="started with --reset-state: what this start accepts is the floor",
                    )
                # At every start, as `policy_accepted` is: the newest record of both is then
                # near the head, and the next start's walk back to it is short.
                activation.log_root_acceptance(
                    trust,
                    new=in_force.new,
                    previous_version=floor.root.version if floor.root else None,
                    policy_version=floor_version,
                )
            try:
                trusted = activation.load_trusted(
                    cfg.policy,
                    trust,
                    state_dir,
                    datetime.now(UTC),
                    floor=floor.policy,
                    persist=admit,
                )
            except PolicyRefused as e:
                activation.log_refusal(e)
                raise
            _accepted(trusted, admitted=admit)
            yield cfg, trusted, audit
        finally:
            if audit is not None:
                _close(audit, log if stopped_entry else None)


def _accepted(trusted: activation.TrustedPolicy, *, admitted: bool) -> None:
    """`policy_accepted`; a half's policy, and all it loaded so far, then leave the cyclic
    collector's view: they live as long as the half, and each collection while it builds its
    pipeline walked them all again (a 100,000-signal policy is millions of objects)."""
    activation.log_acceptance(trusted)
    if admitted:
        collection.settle()


def _close(audit: AuditLog, log: Any) -> None:
    """Close the audit log (its final checkpoint), after `process_stopped` unless no `log`."""
    if log is not None:
        log.info("process_stopped", pid=os.getpid())
    audit.close()


@contextlib.contextmanager
def opened_channel(
    args: argparse.Namespace, process: str
) -> Iterator[tuple[config.BrokerConfig, AuditLog]]:
    """Config (with a `diode:` section), logging and the audit log of a process that carries
    the channel and admits no policy (`diode send`, `diode receive`): the trust root is verified alone, for the
    deployment id its audit log is kept under; the log gets a final checkpoint at the end."""
    # The section first: without one, what its files say is beside the point.
    for check in (None, preflight.problems(())):
        cfg = config.load(args.config, check)
        if cfg.diode is None:
            raise ConfigError(f"{args.config}: no `diode:` section, which {process} needs")
    try:
        root = trustroot.load(cfg.trust_root)
    except ConfigError as e:
        _audit_refused_root(args, cfg, process, e)
        raise
    with AuditLog.open(cfg.audit, root.deployment_id, process) as audit:
        logs.configure(args.log_format or cfg.log.format, process, audit)
        _log_start(args, process, audit, root.version)
        try:
            yield cfg, audit
        finally:
            structlog.get_logger(process).info("process_stopped", pid=os.getpid())


def _log_start(
    args: argparse.Namespace, process: str, audit: AuditLog, trust_root_version: int
) -> None:
    log = structlog.get_logger(process)
    log.info("process_started", pid=os.getpid(), version=__version__, boot_id=audit.boot_id)
    log.info(
        "config_loaded",
        path=str(args.config.resolve()),
        sha256=hashlib.sha256(args.config.read_bytes()).hexdigest(),
        trust_root_version=trust_root_version,
    )


def _audit_refused_root(
    args: argparse.Namespace, cfg: config.BrokerConfig, process: str, error: ConfigError
) -> None:
    """Audit a trust root file that does not verify alone (one role's signatures, unsigned,
    edited), before the start is refused. The log is opened under the deployment the file
    claims: nothing verified names it, and a false claim shows in `audit verify` as a
    checkpoint of another appliance. A file that is no trust root at all names none, and
    the error alone says what is wrong."""
    try:
        claimed = trustroot.examine(envelopes.read_bytes(cfg.trust_root), str(cfg.trust_root))
    except ConfigError:
        return
    with AuditLog.open(cfg.audit, claimed.root.deployment_id, process) as audit:
        logs.configure(args.log_format or cfg.log.format, process, audit)
        activation.log_root_refusal(error, None)


def _plant_state(cfg: config.BrokerConfig) -> Path:
    return cfg.plant.state_dir


def _enterprise_state(cfg: config.BrokerConfig) -> Path:
    return cfg.enterprise.state_dir


def _run(args: argparse.Namespace) -> int:
    """The supervisor: its checks in a short-lived child (`--checks-only`), which refuses
    what cannot start; then, holding none of what they parsed, it starts and keeps the
    halves (ADR 0031). Each half still verifies and admits the policy itself."""
    from broker.run_checks import checked_in_child
    from broker.supervisor import Supervisor, half_users, refuse_if_running

    if args.checks_only:
        return _run_checks(args)
    code, checked = checked_in_child(args.config, args.log_format, args.reset_state, args.same_user)
    if code != 0:
        return code  # the child said why, on the stderr it shares with this process
    cfg, root = read_as_checked(args.config, checked)
    users = half_users() if os.geteuid() == 0 and not args.same_user else None
    # This process's own writer: a second `run` is refused right there from now on.
    with AuditLog.open(cfg.audit, root.deployment_id, "supervisor") as audit:
        fmt = args.log_format or cfg.log.format
        logs.configure(fmt, "supervisor", audit)
        _log_start(args, "supervisor", audit, root.version)
        try:
            refuse_if_running(cfg, users)  # again: a half may have been started meanwhile
            supervisor = Supervisor(
                args.config, fmt, cfg.supervisor, audit, reset_state=args.reset_state, users=users
            )
            return run_until_signalled(supervisor.run())
        finally:
            structlog.get_logger("supervisor").info("process_stopped", pid=os.getpid())


def read_as_checked(
    path: Path, checked: run_checks.Checked | None
) -> tuple[config.BrokerConfig, trustroot.TrustRoot]:
    """The config at `path` and its trust root, verified alone, read again by the supervisor;
    ConfigError unless they are what its checks child verified (`checked`): a file changed
    since would otherwise be used unchecked, for its own audit log and to start the halves."""
    from broker.run_checks import Checked, config_digest, refuse_unless_checked

    cfg = config.load(path)
    root = trustroot.load(cfg.trust_root)
    refuse_unless_checked(checked, Checked(config_digest(cfg), root.sha256), path, cfg.trust_root)
    return cfg, root


def _run_checks(args: argparse.Namespace) -> int:
    """Everything `run` refuses before starting a half: a bad config, trust root or policy,
    missing users, folders another instance writes; as root, each half's first audit epoch
    enrolled. Audited under the supervisor's writer, whose folder this process holds."""
    from broker.run_checks import Checked, config_digest, report_checked
    from broker.supervisor import check_interpreter, enroll_halves, half_users, refuse_if_running

    with opened_half(
        args, "supervisor", _plant_state, admit=False, reset_state=args.reset_state,
        stopped_entry=False,
    ) as (cfg, trusted, audit):  # fmt: skip
        assert audit is not None
        # As root, each half as its own user (ADR 0018); else both as this one (audited).
        users = half_users() if os.geteuid() == 0 and not args.same_user else None
        refuse_if_running(cfg, users)
        if users is not None:
            check_interpreter(users)
            # Under the trust root's deployment id, as each half opens its log.
            enroll_halves(cfg, trusted.root.deployment_id)
        if args.report_fd is not None:  # what `run` may use: these, and nothing changed since
            report_checked(args.report_fd, Checked(config_digest(cfg), trusted.root.sha256))
    return 0


def no_new_privileges() -> None:
    """PR_SET_NO_NEW_PRIVS for this process and all it ever starts: no exec gains privileges
    (setuid, file capabilities) from here on, which is what the units' NoNewPrivileges= gives,
    and `run` as root cannot set in a child without code between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise ConfigError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")


def _plant(args: argparse.Namespace) -> int:
    from broker.plant.run import run_plant

    no_new_privileges()

    with opened_half(args, "plant", _plant_state, reset_state=args.reset_state) as (
        cfg,
        trusted,
        audit,
    ):
        assert audit is not None
        return run_until_signalled(run_plant(cfg, trusted, audit))


def _enterprise(args: argparse.Namespace) -> int:
    from broker.enterprise.run import run_enterprise

    no_new_privileges()

    with opened_half(args, "enterprise", _enterprise_state, reset_state=args.reset_state) as (
        cfg,
        trusted,
        audit,
    ):
        assert audit is not None
        return run_until_signalled(run_enterprise(cfg, trusted, audit))


def _demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    logs.configure("auto", "demo")
    return run_until_signalled(
        run_demo(args.workdir, args.policy.resolve(), args.seconds, args.port, args.opcua_port)
    )

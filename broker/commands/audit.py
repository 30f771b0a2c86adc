"""`audit keygen|enroll|verify|show|report`: the appliance's audit key, each writer's first
epoch key, and reviewing the audit log."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker import config
from broker.audit import report as html_report
from broker.audit import review as audit_review
from broker.audit import show, verify, witness
from broker.audit.epochs import RootKey
from broker.commands.outputs import out_file
from broker.deployment import enrollment
from broker.errors import ConfigError, TrustError
from broker.policy import trustroot
from broker.trust import keys

PROGRESS_AFTER_S = 2.0  # a run shorter than this prints no progress


def add_to(commands: Any) -> None:
    group = commands.add_parser("audit", help="the tamper-evident audit log")
    sub = group.add_subparsers(required=True, metavar="COMMAND")

    keygen = sub.add_parser(
        "keygen",
        help="the appliance's audit key (signs checkpoints)",
        description="Write a new Ed25519 audit key to FILE (mode 0600) and its public key "
        "beside it with .pub (audit.key → audit.pub), where `audit verify --pubkey` and the "
        "writers look for it. Never overwrites either file.",
    )
    keygen.add_argument(
        "--out",
        type=out_file("audit.key", suffix=".key"),
        required=True,
        metavar="FILE",
        help="the private key file, e.g. /etc/dmzbroker/audit.key (broker.yaml's audit.key)",
    )
    keygen.set_defaults(handler=_keygen)

    enroll = sub.add_parser(
        "enroll",
        help="as root, certify each writer's first epoch key for its user (ADR 0018)",
        description="Certify epoch 1 of each audit writer that has no key chain yet, with the "
        "root audit key, and give its epoch key to the user the writer runs as, so that no "
        "half needs to read audit.key. Writers that have a chain are left alone.",
    )
    enroll.add_argument("--config", type=Path, required=True, help="broker.yaml")
    enroll.add_argument(
        "--writer",
        action="append",
        default=[],
        metavar="NAME",
        help="only this writer (plant, enterprise, diode-send, diode-receive); repeatable; "
        "default: every writer of the configuration whose user exists here",
    )
    enroll.set_defaults(handler=_enroll)

    check = sub.add_parser("verify", help="prove the log intact, or name the first problem")
    check.add_argument("dir", type=Path, help="the audit directory (one folder per writer)")
    check.add_argument("--pubkey", type=Path, help="audit.pub, to check checkpoint signatures")
    check.add_argument(
        "--witness",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="checkpoints a collector received (JSON or syslog lines); repeatable",
    )
    check.add_argument(
        "--strict", action="store_true", help="exit 1 also for entries not yet under a checkpoint"
    )
    check.set_defaults(handler=_verify)

    review = sub.add_parser(
        "show", help="filter and print entries, every writer's merged in time order"
    )
    review.add_argument("dir", type=Path, help="the audit directory (one folder per writer)")
    for name, meaning in (
        ("since", "entries at or after this RFC 3339 time (no zone: UTC), e.g. 2026-11-25T08:00Z"),
        ("until", "entries at or before this RFC 3339 time (no zone: UTC)"),
        ("event", "only this event, e.g. policy_accepted (docs/audit.md lists them)"),
        ("category", "only this category, e.g. policy, access, device, audit"),
        ("outcome", "only this outcome: success, failure or unknown"),
        ("actor", "only entries of this actor (a consumer identity, an owner, a process)"),
        ("writer", "only this writer's folder, e.g. plant or enterprise"),
    ):
        review.add_argument(f"--{name}", help=meaning)
    review.add_argument(
        "--format",
        choices=("table", "json", "csv", "cef"),
        default="table",
        help="table for people (aligned columns), json lines, csv, or CEF for a SIEM",
    )
    review.set_defaults(handler=_show)

    page = sub.add_parser("report", help="one self-contained HTML page for a security review")
    page.add_argument("dir", type=Path, help="the audit directory (one folder per writer)")
    page.add_argument("--html", type=Path, required=True, metavar="OUT.html", help="the page")
    page.add_argument("--pubkey", type=Path, help="audit.pub, to check checkpoint signatures")
    page.set_defaults(handler=_report)


def _keygen(args: argparse.Namespace) -> int:
    generated = keys.generate_at(args.out, passphrase=None)
    print(f"private key: {generated.private} (mode 0600)\npublic key:  {generated.public}")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    known = enrollment.writers(cfg)
    unknown = [writer for writer in args.writer if writer not in known]
    if unknown:
        raise ConfigError(
            f"--writer {unknown[0]}: not a writer of {args.config} that runs as its own user "
            f"(one of: {', '.join(known)})"
        )
    appliance = trustroot.load(cfg.trust_root).deployment_id  # as each writer opens its log
    done = enrollment.enroll(
        cfg,
        appliance,
        RootKey.from_files(cfg.audit.key),
        args.writer or known,
        missing_user_ok=not args.writer,
    )
    for result in done:
        if result.skipped is None:
            print(f"{result.writer}: epoch 1 certified; its key belongs to {result.user}")
        else:
            print(f"{result.writer}: left alone: {result.skipped}")
    return 0


def _log_and_key(args: argparse.Namespace) -> tuple[list[Path], Ed25519PublicKey | None]:
    """The writer folders of the audit directory given, and the root key of --pubkey."""
    found = verify.writers(args.dir)
    if not found:
        raise ConfigError(f"{args.dir}: no audit log here (expected one folder per writer)")
    if args.pubkey is None:
        return found, None
    try:
        return found, keys.parse_public_pem(args.pubkey.read_text(), str(args.pubkey))
    except OSError as e:
        raise TrustError(f"{args.pubkey}: cannot read: {e.strerror}") from e


def _say(text: str) -> None:
    """Print a line that holds text from the log (writer names, a break's reason): inert,
    so no control character in it reaches the terminal (broker.audit.show)."""
    print(show.inert(text))


def _verify(args: argparse.Namespace) -> int:
    _, pubkey = _log_and_key(args)
    files = [witness.read_file(path) for path in args.witness]
    started = time.perf_counter()
    reports = verify.verify_dir(args.dir, pubkey, files)
    elapsed = time.perf_counter() - started
    for report in reports:
        _say(
            f"{report.writer}: {report.entries} entries, {report.checkpoints} checkpoints, "
            f"{report.witnesses} witnesses verified"
        )
        for line in report.torn + report.notes:
            _say(f"  note: {line}")
        _say(f"  {report.writer}: {report.verdict}")
        for more in report.unproven[1:] if report.problem is None else ():
            _say(f"    and UNPROVEN: {more}")
    for file in files:
        _say(
            f"witness {file.path}: {len(file.witnesses)} checkpoints, {file.skipped} lines "
            f"skipped (not audit entries), {file.corrupt} checkpoints not matching their hash"
        )
    if pubkey is None:
        print("checkpoint signatures and the epoch key chain NOT checked: give --pubkey audit.pub")
    total = sum(r.entries for r in reports)
    print(f"{total} entries in {elapsed:.2f} s ({total / max(elapsed, 1e-9):,.0f} entries/s)")
    if any(r.problem is not None for r in reports):
        print("BROKEN")
        return 1
    if not all(r.intact for r in reports):
        print("UNPROVEN")
        return 1
    waiting = sum(r.window[1] - r.window[0] + 1 for r in reports if r.window is not None)
    if waiting:
        print(
            f"INTACT, {waiting} newest entries not yet under a checkpoint (a running writer; "
            "--strict counts this as a failure)"
        )
        return 1 if args.strict else 0
    print("INTACT")
    return 0


def _show(args: argparse.Namespace) -> int:
    filters = show.Filters(
        since=show.parse_filter_time(args.since, "--since"),
        until=show.parse_filter_time(args.until, "--until"),
        event=args.event,
        category=args.category,
        outcome=args.outcome,
        actor=args.actor,
        writer=args.writer,
    )
    for line in show.render(show.entries(args.dir, filters), args.format):
        print(line)
    return 0


def _report(args: argparse.Namespace) -> int:
    found, pubkey = _log_and_key(args)
    started = time.monotonic()

    def progress(seen: int) -> None:  # only a run long enough to wonder about prints it
        if time.monotonic() - started >= PROGRESS_AFTER_S:
            print(f"audit report: {seen:,} entries read", file=sys.stderr, flush=True)

    gathered = audit_review.read(found, progress)
    if time.monotonic() - started >= PROGRESS_AFTER_S:
        print("audit report: verifying the chains", file=sys.stderr, flush=True)
    verdicts = [html_report.verdict_of(r) for r in verify.verify_dir(args.dir, pubkey)]
    page = html_report.render(
        str(args.dir), verdicts, gathered, signatures_checked=pubkey is not None
    )
    html_report.write(args.html, page)
    for verdict in verdicts:
        _say(f"{verdict.writer}: {verdict.text}")
    _say(f"report written to {args.html} ({gathered.entries.total:,} entries)")
    return 0

"""`posture`: the running security settings of the appliance, and whether the sockets its
halves listen on are the ones the configuration declares (broker.deployment.posture).

Exit 0: both halves run, each as its own user, and listen on exactly the manifest; 1:
something does not match (a half not running, an extra or missing socket, sockets that cannot
be read, a half as another user than the layout's or sharing one; `--same-user` accepts the
last two); 2: a bad configuration. It reads only; it never changes anything a half uses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import msgspec

from broker import config
from broker.audit.show import inert
from broker.commands.processes import add_config_argument
from broker.deployment import posture
from broker.deployment.audit_tail import WriterState
from broker.deployment.posture import Posture
from broker.deployment.sockets import Socket
from broker.deployment.unknown import Unknown

MISMATCH = 1


def add_to(commands: Any) -> None:
    help_text = "the running security settings; whether listening sockets match the manifest"
    command = commands.add_parser(
        "posture",
        help=help_text,
        description=f"{help_text}. Exit 0: both halves run, each as its own user, and listen on "
        f"exactly what the configuration declares; {MISMATCH}: something does not match; "
        "2: configuration error.",
    )
    add_config_argument(command)
    command.add_argument("--json", action="store_true", help="the posture as JSON")
    command.add_argument(
        "--same-user",
        action="store_true",
        help="halves started with `run --same-user` (a demo, tests): report that they are not "
        "separated, but do not fail for it",
    )
    command.set_defaults(handler=_posture)


def _posture(args: argparse.Namespace) -> int:
    found = posture.collect(config.load(args.config), same_user=args.same_user)
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(found) + b"\n")
    else:
        print("\n".join(render(found)))
    sys.stdout.flush()
    return 0 if not found.mismatches else MISMATCH


def render(found: Posture) -> Iterator[str]:
    """One line per item; names read from files are made inert (no terminal escapes)."""
    tls = found.tls
    crl = "no CRL configured" if tls.crl is None else _crl(tls.crl)
    yield f"tls: profile {tls.profile}; client CA {_cas(tls.client_ca)}; {crl}"
    policy = found.policy
    signers = ", ".join(f"{inert(s.name)} ({s.role.upper()})" for s in policy.signers)
    state = "verified" if policy.verified else f"NOT VERIFIED: {inert(policy.problem or '')}"
    yield (
        f"policy: version {policy.version}, expires {policy.expires}, signed by "
        f"{signers or 'nobody'}; {state}; accepted: {_accepted(policy.accepted)}"
    )
    yield from (f"policy: DIFFERS: {d}" for d in policy.differences)
    root = found.trust_root
    root_state = "" if root.problem is None else f"; NOT VERIFIED: {inert(root.problem)}"
    yield f"trust root: version {root.version}{root_state}; accepted: {_accepted(root.accepted)}"
    yield from (f"trust root: DIFFERS: {d}" for d in root.differences)
    for name, half in found.halves.items():
        yield f"{name}: {_half(half)}; manifest: {_sockets(found.manifest[name])}"
    yield f"island mode: {_flag(found.island_mode, 'on', 'off')}"
    audit = found.audit
    fs = audit.file_system
    space = _unknown(fs) if isinstance(fs, Unknown) else f"{fs.free_bytes // 2**20} MiB free "
    space += (
        ""
        if isinstance(fs, Unknown)
        else f"({fs.free_pct} %)" + (", READ-ONLY" if fs.read_only else "")
    )
    yield f"audit: {audit.dir}: {space}"
    for name, writer in audit.writers.items():
        yield f"audit {inert(name)}: {_writer(writer)}"
    yield from (f"separation: NOT SEPARATED: {inert(s)}" for s in found.separation)
    if not found.mismatches:
        yield "posture: matches the manifest"
    else:
        yield "posture: DOES NOT MATCH: " + "; ".join(found.mismatches)


def _crl(crl: posture.Crl | Unknown) -> str:
    if isinstance(crl, Unknown):
        return f"CRL {_unknown(crl)}"
    stale = " (STALE)" if crl.stale else ""
    return f"CRL number {crl.number}, next update {crl.next_update}{stale}"


def _cas(subjects: list[str] | Unknown) -> str:
    return _unknown(subjects) if isinstance(subjects, Unknown) else inert(" | ".join(subjects))


def _accepted(records: dict[str, posture.Accepted | Unknown | None]) -> str:
    parts = []
    for half, record in records.items():
        if record is None:
            parts.append(f"{half} no record")
        elif isinstance(record, Unknown):
            parts.append(f"{half} {_unknown(record)}")
        else:
            parts.append(f"{half} version {record.version}")
    return ", ".join(parts)


def _half(half: posture.Process | Unknown | None) -> str:
    if half is None:
        return "NOT RUNNING"
    if isinstance(half, Unknown):
        return _unknown(half)
    return (
        f"pid {half.pid}, user {inert(half.user)} (uid {half.uid}), listening on "
        f"{_sockets(half.listening)} (pids {', '.join(map(str, half.processes))})"
    )


def _sockets(sockets: list[Socket] | Unknown) -> str:
    if isinstance(sockets, Unknown):
        return _unknown(sockets)
    return ", ".join(inert(str(s)) for s in sockets) or "nothing"


def _writer(writer: WriterState | Unknown) -> str:
    if isinstance(writer, Unknown):
        return _unknown(writer)
    running = _flag(writer.running, "running", "not running")
    failing = "" if writer.failing is None else f", failing: {_flag(writer.failing, 'YES', 'no')}"
    age = writer.last_checkpoint_age_s
    ago = (
        ""
        if age is None
        else f" {_value(age)} s ago"
        if not isinstance(age, Unknown)
        else (f", its age {_unknown(age)}")
    )
    return (
        f"{running}, last seq {_value(writer.last_seq)}, last checkpoint covers seq "
        f"{_value(writer.last_checkpoint_seq)}{ago}{failing}"
    )  # fmt: skip


def _value(value: int | float | Unknown | None) -> str:
    return _unknown(value) if isinstance(value, Unknown) else str(value)


def _flag(value: bool | Unknown, on: str, off: str) -> str:
    if isinstance(value, Unknown):
        return _unknown(value)
    return on if value else off


def _unknown(value: Unknown) -> str:
    return f"unknown ({inert(value.unknown)})"

"""What a half has accepted — the highest policy version and the trust root in force — and
where that record is kept: its state dir, and its own audit log.

Each half's state dir holds `policy-accepted.json` (version, hash, deployment) and
`trust-root-accepted.json` (version, hash, and the root's signed document, so the root in
force can be restored when its file was replaced). Every acceptance is also an audit entry
(`policy_accepted`, `trust_root_accepted`, carried across retention by the expiry anchor), so
deleting the state files lowers nothing: at start the floor is the highest of both records.

This module never lowers a floor: a record it cannot read is an error, never "nothing
accepted yet", and a missing record is reported as missing for the caller to refuse.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from broker.audit.entry import EXPIRED
from broker.audit.retention import CARRIED_POLICY, CARRIED_TRUST_ROOT
from broker.audit.segments import read_entries, segment_numbers, segment_path
from broker.errors import ConfigError

POLICY_STATE = "policy-accepted.json"
ROOT_STATE = "trust-root-accepted.json"
POLICY_EVENT = "policy_accepted"
ROOT_EVENT = "trust_root_accepted"
# An audit detail string is kept up to 1 KiB (broker.audit.bound): the root's document is
# recorded as a list of base64 pieces below that, joined again when it is read back.
DOCUMENT_PIECE = 768


class AcceptedPolicy(msgspec.Struct, frozen=True):
    version: int
    sha256: str
    deployment_id: str


class AcceptedRoot(msgspec.Struct, frozen=True):
    version: int
    sha256: str
    document: str  # base64 of the trust root envelope as it was read

    @property
    def document_bytes(self) -> bytes:
        return base64.b64decode(self.document, validate=True)


Record = TypeVar("Record", AcceptedPolicy, AcceptedRoot)


@dataclass(frozen=True)
class Floor:
    """The highest records found; None where neither the state dir nor the log has one."""

    policy: AcceptedPolicy | None
    root: AcceptedRoot | None
    log_root: AcceptedRoot | None  # the audit log's own record, to restore from if needed

    def missing(self, state_dir: Path, writer_dir: Path) -> list[str]:
        """What is missing, as sentences naming both places looked at."""
        found = []
        if self.policy is None:
            found.append(
                f"no record of an accepted policy: neither {state_dir / POLICY_STATE} nor a "
                f"{POLICY_EVENT} entry in {writer_dir}"
            )
        if self.root is None:
            found.append(
                f"no record of an accepted trust root: neither {state_dir / ROOT_STATE} nor a "
                f"{ROOT_EVENT} entry in {writer_dir}"
            )
        return found


def floor(state_dir: Path, writer_dir: Path) -> Floor:
    """The highest accepted policy and trust root of the state dir and the audit log of
    this half (`<audit dir>/<writer>`); raises ConfigError for an unreadable state file."""
    policy_state = _read(state_dir / POLICY_STATE, AcceptedPolicy)
    root_state = _read(state_dir / ROOT_STATE, AcceptedRoot)
    policy_log, root_log = from_audit(writer_dir)
    return Floor(_higher(policy_state, policy_log), _higher(root_state, root_log), root_log)


def from_audit(writer_dir: Path) -> tuple[AcceptedPolicy | None, AcceptedRoot | None]:
    """The newest `policy_accepted` and `trust_root_accepted` records of one writer's log,
    entries or carried by an expiry anchor: newest segment first, each search stopping at
    the first found. Unreadable segments are skipped (the state files still count)."""
    policy: AcceptedPolicy | None = None
    root: AcceptedRoot | None = None
    for number in reversed(segment_numbers(writer_dir)):
        path = segment_path(writer_dir, number)
        try:
            data = path.read_bytes()
        except OSError:
            continue
        # Most segments hold neither: skip them without decoding every line.
        if b'"' + POLICY_EVENT.encode() not in data and b'"' + ROOT_EVENT.encode() not in data:
            continue
        try:
            entries, _ = read_entries(path)
        except OSError:
            continue
        for entry in reversed(entries):
            if policy is None:
                policy = _policy_record(entry)
            if root is None:
                root = _root_record(entry)
            if policy is not None and root is not None:
                return policy, root
    return policy, root


def write_policy(state_dir: Path, accepted: AcceptedPolicy) -> None:
    _write(state_dir / POLICY_STATE, msgspec.json.encode(accepted), "accepted policy version")


def write_root(state_dir: Path, accepted: AcceptedRoot) -> None:
    _write(state_dir / ROOT_STATE, msgspec.json.encode(accepted), "accepted trust root")


def root_record(version: int, sha256: str, document: bytes) -> AcceptedRoot:
    return AcceptedRoot(version, sha256, base64.b64encode(document).decode())


def document_pieces(document: bytes) -> list[str]:
    """The root's document as the audit entry keeps it (see DOCUMENT_PIECE)."""
    text = base64.b64encode(document).decode()
    return [text[i : i + DOCUMENT_PIECE] for i in range(0, len(text), DOCUMENT_PIECE)]


def _policy_record(entry: dict[str, Any]) -> AcceptedPolicy | None:
    record = _carried(entry, POLICY_EVENT, CARRIED_POLICY)
    if record is None:
        return None
    details = record.get("details")
    version = record.get("policy_version")
    if not isinstance(details, dict) or not isinstance(version, int):
        return None
    sha256, deployment = details.get("sha256"), details.get("deployment_id", "")
    if not isinstance(sha256, str) or not isinstance(deployment, str):
        return None
    return AcceptedPolicy(version, sha256, deployment)


def _root_record(entry: dict[str, Any]) -> AcceptedRoot | None:
    record = _carried(entry, ROOT_EVENT, CARRIED_TRUST_ROOT)
    details = record.get("details") if record is not None else None
    if not isinstance(details, dict):
        return None
    version, sha256, pieces = details.get("version"), details.get("sha256"), details.get("document")
    if not isinstance(version, int) or not isinstance(sha256, str) or not isinstance(pieces, list):
        return None
    document = "".join(p for p in pieces if isinstance(p, str))
    try:
        base64.b64decode(document, validate=True)
    except binascii.Error:
        document = ""  # cut short: the version and hash still raise the floor
    return AcceptedRoot(version, sha256, document)


def _carried(entry: dict[str, Any], event: str, anchor_key: str) -> dict[str, Any] | None:
    """`entry` itself if it is `event`, else what an expiry anchor carries of it."""
    if entry.get("event") == event:
        return entry
    details = entry.get("details")
    if entry.get("event") == EXPIRED and isinstance(details, dict):
        carried = details.get(anchor_key)
        if isinstance(carried, dict):
            return carried
    return None


def _higher(state: Record | None, log: Record | None) -> Record | None:
    if state is None or (log is not None and log.version > state.version):
        return log
    return state


def _read(path: Path, kind: type[Record]) -> Record | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=kind)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        # Never treat an unreadable record as "nothing accepted yet": that would allow rollback.
        raise ConfigError(f"{path}: unreadable record of what this half accepted: {e}") from e


def _write(path: Path, data: bytes, what: str) -> None:
    """Atomically and durably: the record is on disk before what it records takes effect."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{path}: cannot record the {what}: {e.strerror}") from e

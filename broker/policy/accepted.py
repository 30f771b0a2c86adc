"""What a half has accepted — the highest policy version and the trust root in force — and
where that record is kept: its state dir, and its own audit log.

Each half's state dir holds `policy-accepted.json` (version, hash, deployment) and
`trust-root-accepted.json` (version, hash, and the root's signed document, against which a
rotation is checked). Every acceptance is also an audit entry (`policy_accepted`,
`trust_root_accepted`, carried across retention by the expiry anchor), so deleting the state
files lowers nothing: at start the floor is the highest of both records.

Records only ever LIMIT what is accepted: they are files the half itself can write, so they
never supply the keys in force (broker.policy.activation). From the audit log only entries of
the chain the writer adopted count (`from_audit`): a line appended or inserted without the
writer is no record. This module never lowers a floor: a record it cannot read is an error,
never "nothing accepted yet", and a missing record is reported as missing for the caller to
refuse. It never follows a symlink or blocks on a FIFO in the state dir or the audit log.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from broker import safe_files
from broker.audit import epochs, recovery
from broker.audit.entry import EXPIRED, GENESIS, raw_hash
from broker.audit.retention import CARRIED_POLICY, CARRIED_TRUST_ROOT
from broker.audit.segments import MAX_SEGMENT_BYTES, segment_numbers, segment_path
from broker.errors import ConfigError

POLICY_STATE = "policy-accepted.json"
ROOT_STATE = "trust-root-accepted.json"
POLICY_EVENT = "policy_accepted"
ROOT_EVENT = "trust_root_accepted"
# An audit detail string is kept up to 1 KiB (broker.audit.bound): the root's document is
# recorded as a list of base64 pieces below that, joined again when it is read back.
DOCUMENT_PIECE = 768
STATE_LIMIT = 1024 * 1024  # a state file is a few KiB: anything larger is no record of ours
# Only lines holding one of these can be a record; the others are only followed back.
_RECORD = re.compile(
    b'"event":"(?:'
    + b"|".join(re.escape(e.encode()) for e in (POLICY_EVENT, ROOT_EVENT, EXPIRED))
    + b')"'
)
_PREV_KEY = b'"prev_hash":"'


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
    roots: tuple[tuple[str, AcceptedRoot], ...]  # every root record found, with its place
    state_root: AcceptedRoot | None  # the state dir's own

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


def floor(state_dir: Path, writer_dir: Path, head: str | None) -> Floor:
    """The highest accepted policy and trust root of the state dir and the audit log of
    this half (`<audit dir>/<writer>`, its chain followed back from `head`: see
    `from_audit`); raises ConfigError for an unreadable state file."""
    policy_state = _read(state_dir / POLICY_STATE, AcceptedPolicy)
    root_state = _read(state_dir / ROOT_STATE, AcceptedRoot)
    policy_log, root_log = from_audit(writer_dir, head) if head is not None else (None, None)
    places = (
        (str(state_dir / ROOT_STATE), root_state),
        (f"the {ROOT_EVENT} entry in {writer_dir}", root_log),
    )
    roots = tuple((place, r) for place, r in places if r is not None)
    return Floor(
        _higher(policy_state, policy_log), _higher(root_state, root_log), roots, root_state
    )


def adopted_head(writer_dir: Path, audit_key: Path, appliance: str, writer: str) -> str | None:
    """The hash of the last checkpoint of `writer_dir` that verifies, as the writer's own
    start-up recovery finds it (broker.audit.recovery): where `from_audit` starts for a
    process that reads another writer's log (`run`'s and `validate`'s checks). None: none."""
    try:
        chain, _ = epochs.read_chain(writer_dir, epochs.RootKey.from_files(audit_key).public)
        found = recovery.examine(writer_dir, segment_numbers(writer_dir), chain, appliance, writer)
    except (OSError, ConfigError):
        return None  # nothing adopted can be found: the state files alone count
    return found.last_good_hash if found.last_good_seq else None


def from_audit(writer_dir: Path, head: str) -> tuple[AcceptedPolicy | None, AcceptedRoot | None]:
    """The newest `policy_accepted` and `trust_root_accepted` records (entries, or carried by
    an expiry anchor) of the chain that ends at `head`, the hash of an entry the writer wrote
    or adopted: each line counted is the one whose hash the line after it names, checked
    over its bytes. A line appended, inserted or edited without the writer (an unadopted
    tail, a forged record) is never on that chain, so it counts for nothing.

    Newest segment first, each search stopping at the first found, which is also the
    highest: a half records an acceptance only at or above its floor, and that floor
    included every record on the chain before it (this same walk, at its own start, or the
    policy in memory), so versions never fall along one writer's chain. `--reset-state`
    does not break this: it is allowed only when the chain holds no record at all. The walk
    reads back only to the newest records (each start records both), not the whole log.
    """
    policy: AcceptedPolicy | None = None
    root: AcceptedRoot | None = None
    expected = head
    for number in reversed(segment_numbers(writer_dir)):
        try:
            # As everywhere a segment is read: no link followed, no FIFO waited on, no giant
            # read whole (`run` reads the plant's log as root, and the plant user owns it).
            data = safe_files.read_regular(segment_path(writer_dir, number), MAX_SEGMENT_BYTES)
        except OSError:
            # Not the chain's if the head is in an older one; if the chain runs through it,
            # the older segments hold no line with the hash sought and the walk finds nothing.
            continue
        end = len(data)
        while expected != GENESIS:
            needle = b'"hash":"' + expected.encode() + b'",'
            at = data.rfind(needle, 0, end)
            if at < 0:
                break  # in an older segment
            start = data.rfind(b"\n", 0, at) + 1
            stop = data.find(b"\n", at)
            line = data[start : stop if stop >= 0 else len(data)]
            end = start
            # The needle may also sit inside a line's details: only the line whose own hash
            # it is, over its own bytes, is the chain's.
            if stop < 0 or raw_hash(line, expected) != expected:
                continue
            if _RECORD.search(line):
                entry = _decoded(line)
                if policy is None:
                    policy = _policy_record(entry)
                if root is None:
                    root = _root_record(entry)
                if policy is not None and root is not None:
                    return policy, root
            previous = _previous(line)
            if previous is None:
                return policy, root
            expected = previous
        if expected == GENESIS:
            break
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


def _decoded(line: bytes) -> dict[str, Any]:
    try:
        entry = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _previous(line: bytes) -> str | None:
    """The line's own `prev_hash` (keys are sorted: a `prev_hash` key inside `details` comes
    before it, and no key after it can hold one; a string cannot hold the quotes)."""
    at = line.rfind(_PREV_KEY)
    if at < 0:
        return None
    value = line[at + len(_PREV_KEY) : at + len(_PREV_KEY) + 64]
    if len(value) != 64 or line[at + len(_PREV_KEY) + 64 : at + len(_PREV_KEY) + 65] != b'"':
        return None
    return value.decode("ascii", "replace")


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
        data = safe_files.read_regular(path, STATE_LIMIT)
        return msgspec.json.decode(data, type=kind)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        # Never treat an unreadable record as "nothing accepted yet": that would allow rollback.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConfigError(f"{path}: unreadable record of what this half accepted: {reason}") from e


def _write(path: Path, data: bytes, what: str) -> None:
    try:
        safe_files.replace_durably(path, data)
    except OSError as e:
        raise ConfigError(f"{path}: cannot record the {what}: {e.strerror}") from e

"""Which old audit segments go: by age, and by size, with room kept for security events.

Oldest segment first, never the one being written (ADR 0015):
- a segment older than the retention age goes;
- past `TRIM_AT` of the capacity, the oldest go whatever their age, down to `TRIM_TO`;
- from `RESERVE` (where outsider and repeated device events stop being written in full, so
  that security events keep the rest) segments older than `KEEP_S` go, down to `TRIM_TO`.
  Without this an appliance whose ordinary consumer traffic once reached the reserve would
  stay in it until security events alone filled the next tenth; with it, a flood can push
  out history older than `KEEP_S`, never the last `KEEP_S` of it.

Trimming ends below the reserve line, so a log that reached capacity leaves the reserve.
Whatever is deleted, the anchor it returns carries the seq and hash of the last deleted
entry, that entry itself whole when it is a checkpoint (as it is when its segment was ended
by a rollover), and the highest-version `policy_accepted` and `trust_root_accepted` entries among them (or
carried by an anchor among them), so no amount of retention removes the record of the policy
and trust root in force (broker.policy.accepted reads them back at start).

This module deletes only whole segments older than the current one, and never raises: a
file it cannot read or delete stops this round, and the next one tries again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.audit.entry import CHECKPOINT, EXPIRED
from broker.audit.segments import read_entries, segment_numbers, segment_path

RESERVE = 0.8  # share of the capacity past which only security events are written in full
TRIM_AT = 0.9  # past this share the oldest segments go whatever their age …
TRIM_TO = 0.7  # … down to this share, below the reserve line
KEEP_S = 7 * 86_400  # at the reserve line, history younger than this is kept
CARRIED_POLICY = "last_policy_accepted"  # in an expiry anchor
CARRIED_TRUST_ROOT = "last_trust_root_accepted"  # likewise
CARRIED = {"policy_accepted": CARRIED_POLICY, "trust_root_accepted": CARRIED_TRUST_ROOT}
CARRIED_FIELDS = ("seq", "time", "boot_id", "policy_version", "details", "hash")


@dataclass
class Expiry:
    segments: list[int] = field(default_factory=list)
    freed: int = 0  # bytes
    anchor: dict[str, Any] | None = None  # details of the `audit_segments_expired` entry due


def expire(directory: Path, current: int, used: int, capacity: int, retention_s: float) -> Expiry:
    """Delete what the rules above say must go; what went, and the anchor to record."""
    now = time.time()
    hard = used > TRIM_AT * capacity
    soft = used >= RESERVE * capacity
    done = Expiry()
    carried: dict[str, dict[str, Any]] = {}
    last: dict[str, Any] | None = None  # the last deleted entry
    checkpoint: dict[str, Any] | None = None  # the last deleted checkpoint
    try:
        for number in (n for n in segment_numbers(directory) if n < current):
            path = segment_path(directory, number)
            stat = path.stat()
            age = now - stat.st_mtime
            over = used - done.freed > TRIM_TO * capacity
            if not (age > retention_s or (over and (hard or (soft and age > KEEP_S)))):
                break
            entries = [e for e in read_entries(path)[0] if _whole(e)]
            if entries:
                last = entries[-1]
                checkpoint = next(
                    (e for e in reversed(entries) if e["event"] == CHECKPOINT), checkpoint
                )
                _carry_highest(entries, carried)
            path.unlink()
            done.freed += stat.st_size
            done.segments.append(number)
    except (OSError, ValueError):
        pass  # a segment removed, unreadable or not a segment: retried at the next round
    if last is not None:
        done.anchor = _anchor(done.segments, last, checkpoint)
        done.anchor.update(carried)
    return done


def _anchor(
    segments: list[int], last: dict[str, Any], checkpoint: dict[str, Any] | None
) -> dict[str, Any]:
    """The anchor's own details. It carries the last deleted checkpoint whole, so that
    `audit verify` can check its signature with the key of its own epoch: an anchor made
    with a key taken later cannot vouch for history it never signed (ADR 0016)."""
    anchor: dict[str, Any] = {
        "segments": segments,
        "through_seq": last["seq"],
        "head": last["hash"],
        "checkpoint": checkpoint,
    }
    if checkpoint is not last:
        # A segment ends with its rollover checkpoint unless its writer crashed before it.
        anchor["note"] = f"the last deleted entry (seq {last['seq']}) is not a checkpoint; " + (
            f"the last deleted checkpoint (seq {checkpoint['seq']}) is carried"
            if checkpoint is not None
            else "no deleted segment held a checkpoint"
        )
    return anchor


def _whole(entry: Any) -> bool:
    """An entry with the fields the anchor uses, of the right types (a line that is not is
    left to `audit verify` to report: it is deleted with its segment all the same)."""
    return (
        isinstance(entry, dict)
        and type(entry.get("seq")) is int
        and isinstance(entry.get("hash"), str)
        and isinstance(entry.get("event"), str)
    )


def _carry_highest(entries: list[dict[str, Any]], carried: dict[str, dict[str, Any]]) -> None:
    """Into `carried` (by anchor key): of each CARRIED event in `entries`, or carried by an
    anchor there, the entry with the highest version. Highest, not last: a deleted segment
    may hold a tail its writer never adopted (ADR 0016), and a line put there to lower the
    rollback floor must not become the record the floor is read from."""
    for entry in entries:
        details = entry.get("details")
        event = entry.get("event")
        found: list[tuple[str, dict[str, Any]]] = []
        if event in CARRIED:
            found.append((CARRIED[event], {k: entry.get(k) for k in CARRIED_FIELDS}))
        elif event == EXPIRED and isinstance(details, dict):
            found += [(k, details[k]) for k in CARRIED.values() if isinstance(details.get(k), dict)]
        for key, record in found:
            if key not in carried or _version(record) >= _version(carried[key]):
                carried[key] = record


def _version(record: dict[str, Any]) -> int:
    """A policy_accepted entry's policy version, a trust_root_accepted entry's root version."""
    details = record.get("details")
    version = details.get("version") if isinstance(details, dict) else None
    if not isinstance(version, int):
        version = record.get("policy_version")
    return version if isinstance(version, int) and not isinstance(version, bool) else -1

"""Witnesses: copies of a writer's checkpoints kept outside its folder, read for `audit verify`.

A witness is an `audit_checkpoint` entry as a collector received it (a file given with
`audit verify --witness FILE`: bare JSON entries or syslog lines whose message is the entry),
or the `audit_checkpoint_witnessed` entry another writer of the appliance recorded when the
checkpoint reached it (the enterprise half keeps the plant half's). The verifier demands that
the witnessed writer's log still holds each of them, with the same hash: that is what makes a
truncated or rewritten log visible.

This module only reads and parses. It never decides a verdict, and a witness never vouches
for an entry: it can only demand one (a forged witness makes a log look broken, never intact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from broker.audit.entry import CHECKPOINT, entry_hash
from broker.errors import ConfigError

WITNESSED = "audit_checkpoint_witnessed"
# What an `audit_checkpoint_witnessed` entry adds to the checkpoint's own details.
_WITNESS_FIELDS = frozenset({"witnessed_writer", "seq", "hash"})


@dataclass(frozen=True)
class Witness:
    """One copy of writer `writer`'s checkpoint entry `seq`, whose entry hash is `hash`."""

    writer: str
    seq: int
    hash: str
    appliance: str
    details: dict[str, Any]  # the checkpoint's details as signed, kept as found
    source: str  # where it was found, for messages: "FILE line N", "enterprise log seq M"


@dataclass
class WitnessFile:
    path: Path
    witnesses: list[Witness] = field(default_factory=list)
    skipped: int = 0  # lines that are not audit entries
    corrupt: int = 0  # checkpoint entries whose content does not match their own hash


def read_file(path: Path) -> WitnessFile:
    """The checkpoint entries in a collector's file; other lines are skipped and counted."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--witness {path}: cannot read: {e.strerror}") from e
    found = WitnessFile(path)
    for number, line in enumerate(data.splitlines(), start=1):
        start = line.find(b"{")  # a syslog line's message is the entry, from its first `{`
        try:
            entry = msgspec.json.decode(line[start:]) if start >= 0 else None
        except msgspec.DecodeError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
            found.skipped += 1
            continue
        source = f"{path} line {number}"
        if entry.get("event") == CHECKPOINT:
            witness = from_checkpoint(entry, source)
            if witness is None:
                found.corrupt += 1
            else:
                found.witnesses.append(witness)
        elif entry.get("event") == WITNESSED:
            witness = from_witnessed(entry.get("details"), source)
            if witness is not None:
                found.witnesses.append(witness)
    return found


def from_checkpoint(entry: dict[str, Any], source: str) -> Witness | None:
    """A checkpoint entry as a witness, or None when its content does not match its hash."""
    if not isinstance(entry.get("hash"), str) or entry_hash(entry) != entry["hash"]:
        return None
    return _witness(
        entry.get("writer"), entry.get("seq"), entry["hash"], entry.get("details"), source
    )


def from_witnessed(details: Any, source: str) -> Witness | None:
    """The checkpoint an `audit_checkpoint_witnessed` entry holds, or None if malformed."""
    if not isinstance(details, dict):
        return None
    signed = {k: v for k, v in details.items() if k not in _WITNESS_FIELDS}
    return _witness(
        details.get("witnessed_writer"), details.get("seq"), details.get("hash"), signed, source
    )


def _witness(writer: Any, seq: Any, hash: Any, details: Any, source: str) -> Witness | None:
    if not isinstance(details, dict) or not isinstance(writer, str) or not isinstance(hash, str):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None
    return Witness(
        writer=writer,
        seq=seq,
        hash=hash,
        appliance=str(details.get("appliance")),
        details=details,
        source=source,
    )

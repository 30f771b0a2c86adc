"""The plant's audit checkpoints that cross the spool, as the enterprise half keeps them.

The plant half's `audit_checkpoint` entries cross the spool (broker.channel.spool, frames of
their own); the enterprise half writes each into its own audit log as an
`audit_checkpoint_witnessed` entry (broker.audit.witness reads them back for `audit verify`).
Cutting the plant's log after the fact then leaves witnesses holding seq numbers and hashes
it no longer has.

This module only checks the shape of what crossed and turns it into the witness entry's
details. It never verifies the checkpoint's signature (`audit verify` does, against the
witnessed writer's own log and key chain) and never passes on a field it has not checked:
bytes that are not a well-formed, self-consistent checkpoint entry of the expected writer are
refused.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from broker.audit.entry import CHECKPOINT, entry_hash

CROSSING_WRITER = "plant"  # the writer whose checkpoints cross the spool
_HEX64 = re.compile(r"[0-9a-f]{64}")
_COPIED = ("covers_seq", "head", "epoch", "keyid", "reason", "signature", "appliance")


def witness_details(unverified: bytes, writer: str = CROSSING_WRITER) -> dict[str, Any]:
    """The details of the `audit_checkpoint_witnessed` entry for a checkpoint entry's bytes.

    Raises ValueError naming what is wrong when they are not a whole, self-consistent
    `audit_checkpoint` entry of `writer`.
    """
    entry = _checkpoint_entry(unverified, writer)
    seq, details = entry["seq"], entry.get("details")
    if not isinstance(details, dict):
        raise ValueError(f"seq {seq}: no details")
    missing = [name for name in _COPIED if name not in details]
    if missing:
        raise ValueError(f"seq {seq}: details lack {', '.join(missing)}")
    if not (_positive(details["covers_seq"]) or details["covers_seq"] == 0):
        raise ValueError(f"seq {seq}: covers_seq {_shown(details['covers_seq'])} is not a seq")
    if not _positive(details["epoch"]):
        raise ValueError(f"seq {seq}: epoch {_shown(details['epoch'])} is not a positive integer")
    if not isinstance(details["head"], str) or not _HEX64.fullmatch(details["head"]):
        raise ValueError(f"seq {seq}: head {_shown(details['head'])} is not a SHA-256")
    for name in ("keyid", "signature", "appliance"):
        if not isinstance(details[name], str) or not details[name]:
            raise ValueError(f"seq {seq}: {name} {_shown(details[name])} is not a text")
    return {
        "witnessed_writer": writer,
        "seq": seq,
        "hash": entry["hash"],
        **{name: details[name] for name in _COPIED},
    }


def _checkpoint_entry(unverified: bytes, writer: str) -> dict[str, Any]:
    """The bytes as an `audit_checkpoint` entry of `writer` whose hash is its own."""
    try:
        entry = msgspec.json.decode(unverified)
    except msgspec.DecodeError as e:
        raise ValueError(f"not a JSON entry: {e}") from e
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    if entry.get("event") != CHECKPOINT:
        raise ValueError(f"event {_shown(entry.get('event'))} is not {CHECKPOINT}")
    if entry.get("writer") != writer:
        raise ValueError(f"writer {_shown(entry.get('writer'))} is not {writer!r}")
    if not _positive(entry.get("seq")):
        raise ValueError(f"seq {_shown(entry.get('seq'))} is not a positive integer")
    claimed = entry.get("hash")
    if not isinstance(claimed, str) or entry_hash(entry) != claimed:
        raise ValueError(f"seq {entry['seq']}: hash {_shown(claimed)} is not the entry's hash")
    return entry


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _shown(value: object) -> str:
    """A hostile value in a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

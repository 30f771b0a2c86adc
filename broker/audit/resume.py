"""Where a writer's chain continues at start, and the epoch key that signs from there.

The writer continues its chain only when its log ends with a checkpoint that verifies
(broker.audit.recovery) under a certified epoch (broker.audit.epochs); otherwise the chain
breaks there: the reasons go into the `audit_chain_break` entry the writer writes first, and
the new chain takes a seq above everything left unadopted. Either way a new epoch is
certified for the seqs to come, unless the last one was certified at the last start and never
used. This module writes only the epoch chain (epochs.jsonl and the epoch key), never a
segment; the root key's private half is loaded only when nothing else may certify.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import epochs
from broker.audit.recovery import examine
from broker.errors import ConfigError, DmzBrokerError


@dataclass(frozen=True)
class Resumed:
    seq: int  # the last seq of the chain (the next entry takes seq + 1)
    head: str  # the hash the next entry names as its predecessor
    chain: list[epochs.Epoch]  # the certified epochs, the signing one last
    epoch: epochs.Epoch  # the epoch that signs from seq + 1
    key: Ed25519PrivateKey  # its private key
    adopted_seq: int  # the last checkpoint found valid (where the log was adopted, or broke)
    chain_break: dict[str, Any] | None  # the break's details; None when the log was adopted


def resume(
    directory: Path, root: epochs.RootKey, appliance: str, writer: str, numbers: list[int]
) -> Resumed:
    """Find where the chain in `directory` (segments `numbers`) continues, and certify the
    epoch that signs from there. A first start (no segments, no key chain) certifies epoch 1
    with the root key. Raises OSError when the epoch chain cannot be written, ConfigError when
    the root key is needed and cannot be loaded."""
    chain, problem = epochs.read_chain(directory, root.public)
    # No epoch and no segment: nothing was ever vouched for (an epochs.jsonl left empty by a
    # first start that found the disk full is no log to break).
    first = not numbers and not chain
    if problem is not None:
        epochs.cut(directory, chain)  # new epochs follow the last one that verifies
        if problem.endswith(epochs.TORN):
            problem = None  # a crash during an epoch change: the old key is still certified
    reasons = [problem] if problem is not None and not first else []
    if not chain and not first and problem is None:
        reasons.append(f"{epochs.CHAIN_FILE}: no certified epoch")
    key, why = epochs.current_key(directory, chain)
    if chain and key is None:
        reasons.append(why)
    found = examine(directory, numbers, chain, appliance, writer)
    last = chain[-1] if chain else None
    if found.problem:
        reasons.insert(0, found.problem)
    elif last is not None and found.highest_seq + 1 < last.from_seq:
        reasons.append(
            f"the log ends at seq {found.highest_seq}, but epoch {last.number} "
            f"({epochs.CHAIN_FILE} line {last.line}) starts at seq {last.from_seq}: "
            "entries after the last checkpoint were removed"
        )
    chain_break: dict[str, Any] | None = None
    if first:
        seq = 0
        certifier = _root_private(directory, root, "this is the writer's first start")
    elif not reasons:
        seq = found.last_good_seq
        assert last is not None and key is not None
        if seq + 1 <= last.from_seq:  # certified at the last start, never used
            return Resumed(seq, found.last_good_hash, chain, last, key, seq, None)
        certifier = key
    else:
        # The break entry (written next) takes a seq above every seq found after the last
        # good checkpoint, and links to that checkpoint.
        seq = max(found.highest_seq + 1, last.from_seq + 1 if last is not None else 1) - 1
        if key is None:
            key = _root_private(directory, root, reasons[-1])
            reasons.append("a new epoch certified by the root key")
        certifier = key
        chain_break = {
            "last_good_seq": found.last_good_seq,
            "last_good_hash": found.last_good_hash,
            "first_bad": found.first_bad,
            "unadopted": list(found.unadopted) if found.unadopted is not None else None,
            "reason": "; ".join(reasons),
        }
    epoch, signing = epochs.advance(directory, appliance, chain, seq + 1, certifier)
    chain.append(epoch)
    return Resumed(
        seq, found.last_good_hash, chain, epoch, signing, found.last_good_seq, chain_break
    )


def _root_private(directory: Path, root: epochs.RootKey, why: str) -> Ed25519PrivateKey:
    try:
        return root.load_private()
    except DmzBrokerError as e:
        raise ConfigError(f"audit log {directory}: {why}: {e}") from e

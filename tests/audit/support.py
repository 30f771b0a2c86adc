"""Helpers for the audit tests: write varied entries, read segments as plain JSON, forge.

Everything here reads and writes the files directly (the standard `json` and `hashlib`), so
the tests check the writer and the verifier against the format, not against themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.log import AuditLog
from broker.trust import keys

CHECKPOINT_EVENT = "audit_checkpoint"
EVENTS = ("signal_read", "record_published", "policy_loaded", "client_login")
CATEGORIES = ("device", "channel", "policy", "access")  # of the seven in docs/audit.md
OUTCOMES = ("success", "failure", "unknown")


def body(i: int) -> dict[str, Any]:
    """The i-th recorded entry's fields: every kind of value, deterministic."""
    return {
        "event": EVENTS[i % len(EVENTS)],
        "category": CATEGORIES[i % len(CATEGORIES)],
        "outcome": OUTCOMES[i % len(OUTCOMES)],
        "actor": None if i % 5 == 0 else f"operator{i % 3}",
        "object": None if i % 7 == 0 else f"plant/tag/{i}",
        "policy_version": None if i % 6 == 0 else i % 4 + 1,
        "details": {} if i % 4 == 0 else {"i": i, "ok": i % 2 == 0, "tags": ["a", str(i)]},
    }


def record_many(log: AuditLog, count: int, start: int = 0) -> list[dict[str, Any]]:
    """Record `count` entries (bodies start..start+count-1); the bodies recorded."""
    recorded = []
    for i in range(start, start + count):
        fields = body(i)
        log.record(fields.pop("event"), **fields)
        recorded.append(body(i))
    return recorded


def segments(writer_dir: Path) -> list[Path]:
    """The segments (named by number; not epochs.jsonl, the key chain)."""
    # names are zero-padded: text order = number order
    return sorted(p for p in writer_dir.glob("*.jsonl") if p.stem.isdigit())


def read_segment(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_log(writer_dir: Path) -> list[dict[str, Any]]:
    return [entry for path in segments(writer_dir) for entry in read_segment(path)]


def canonical_text(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_of(entry: dict[str, Any]) -> str:
    """SHA-256 of the canonical entry without its `hash` (computed here, not by the broker)."""
    unhashed = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_text(unhashed).encode()).hexdigest()


def write_segment(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("".join(canonical_text(e) + "\n" for e in entries))


def fd_of(path: Path) -> int:
    """The descriptor this process holds open on `path` (Linux /proc)."""
    wanted = str(path.resolve())
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == wanted:
                return int(name)
        except OSError:  # the descriptor listdir itself used, already closed
            continue
    raise AssertionError(f"no open descriptor on {path}")


def abandon(writer_dir: Path) -> None:
    """What a crash does to a writer: its descriptors go (the segment's, and the folder lock's
    with its lock), no closing checkpoint is written."""
    os.close(fd_of(segments(writer_dir)[-1]))
    os.close(fd_of(writer_dir / ".lock"))


def write_public_key(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_text(keys.public_pem(key.public_key()))
    return path

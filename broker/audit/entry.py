"""One audit entry, its canonical bytes and its hash; the checkpoint signature message.

Shared by the writer and the verifier, so both compute exactly the same bytes. Canonical
form: JSON with sorted keys, no spaces (our entries hold only strings, integers, booleans,
null, lists and objects, so this is stable and equals the line written to disk minus
`hash`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

GENESIS = "0" * 64  # the prev_hash of a writer's first entry
CHECKPOINT = "audit_checkpoint"
CHAIN_BREAK = "audit_chain_break"  # a writer's start found a tail it would not adopt
EXPIRED = "audit_segments_expired"  # retention deleted old segments; names the last entry
DROPPED = "audit_entries_dropped"  # entries the writer could not keep; when writing resumes

_encoder = msgspec.json.Encoder(order="sorted")


def timestamp() -> str:
    """Now, as every time in the audit log is written: RFC 3339 UTC, microseconds, `Z`
    (as `datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")`, whose strftime was a quarter
    of the writer's time: the part up to the second is formatted once per second)."""
    global _second  # noqa: PLW0603 - a cache of one, replaced whole (no lock needed)
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    if _second[0] != seconds:
        _second = seconds, datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{micros:06d}Z"


_second = (-1, "")


def canonical(fields: dict[str, Any]) -> bytes:
    return _encoder.encode(fields)


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry's canonical form without its own `hash`."""
    unhashed = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(unhashed)).hexdigest()


def sealed_line(entry: dict[str, Any]) -> bytes:
    """Set `hash` on an entry that has none, and return its line as written (canonical,
    with a newline): the same bytes as `canonical(entry) + b"\\n"`, encoded once, not twice.

    The inverse of raw_hash: keys are sorted, so the top-level `hash` stands right before the
    top-level `object`, the last `,"object":` of the line (no value after it is an object,
    and inside a JSON string every `"` is escaped).
    """
    unhashed = canonical(entry)
    digest = hashlib.sha256(unhashed).hexdigest()
    entry["hash"] = digest
    at = unhashed.rfind(b',"object":')
    if at < 0:  # not an entry of ours (no `object`): encode it whole
        return canonical(entry) + b"\n"
    return b"".join((unhashed[:at], b',"hash":"', digest.encode(), b'"', unhashed[at:], b"\n"))


def checkpoint_message(writer: str, details: Mapping[str, Any]) -> bytes:
    """What a checkpoint signs: every one of its details but `signature` (appliance,
    covers_seq, head, epoch, keyid, reason, ...), canonical, after the writer's name.

    This appliance's writer vouches, with the key of `epoch` (broker.audit.epochs), for
    everything up to `head`, the hash of entry `covers_seq`, and for why it signed: a
    `reason` (e.g. "stop") cannot be changed without the signature failing.
    """
    signed = {k: v for k, v in details.items() if k != "signature"}
    return b"dmzbroker audit checkpoint v3|" + writer.encode() + b"|" + canonical(signed)


def raw_hash(line: bytes, claimed: str) -> str:
    """The hash of a line as written: its bytes without the `"hash":"…",` member.

    Any change to the bytes of a line, even one that keeps its JSON meaning (spaces, key
    order), changes this, so it is stricter than re-encoding the parsed entry.
    """
    # The last one: keys are sorted, so a `hash` key inside `details` comes before it, and
    # no key after it (object … writer) can hold one.
    start = line.rfind(_HASH_KEY)
    end = start + len(_HASH_KEY) + 64 + 2  # the hex digest, then `",`
    if start < 0 or line[start + len(_HASH_KEY) : end] != claimed.encode() + b'",':
        return ""
    return hashlib.sha256(line[:start] + line[end:]).hexdigest()


_HASH_KEY = b'"hash":"'

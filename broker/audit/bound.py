"""How large one audit entry may be, whatever an outsider puts in a path, a header or a name.

Every string of an entry (`actor`, `object`, and each string in `details` at any depth) is
kept up to a number of bytes *as stored* — JSON-escaped UTF-8, where a control character
costs six bytes (`\\u0001`) — and a longer one keeps its beginning and an ellipsis. For each
value cut, `details.truncated` names where it was (`object`, `actor`, or a dotted path in
`details`) with the full value's length in UTF-8 bytes and its SHA-256, so the original can
still be matched against a packet capture or a proxy log. Details still larger than a
whole-entry bound after that are replaced by their size and SHA-256 (a last line of defence:
many fields, deep nesting). Text that cannot be stored as UTF-8 (a lone surrogate) is
replaced and noted the same way.

This module never drops a value without saying so, never raises on odd text, and never
touches an entry's event, category or outcome.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

ELLIPSIS = "…"
TRUNCATED = "truncated"  # the details key listing what was cut


@dataclass(frozen=True)
class Bounds:
    text_bytes: int  # one string as stored, escapes included
    details_bytes: int  # all details as stored


# Outsider-caused events (catalogue.AGGREGATED): the flood budget is in entries per
# interval, so each entry must be small. The others come from our own code, the co-signed
# policy, local files and devices: more room keeps their error texts whole.
OUTSIDER = Bounds(text_bytes=256, details_bytes=2048)
INSIDER = Bounds(text_bytes=1024, details_bytes=16384)
# An `events_suppressed` summary names every identity and device it counted (up to 200 pairs
# each, broker.audit.throttle) and the 20 largest addresses: once per interval, so it may be
# larger than one event's details.
SUMMARY = Bounds(text_bytes=256, details_bytes=96 * 1024)

_encoder = msgspec.json.Encoder(order="sorted")
_WORST_CHAR = 6  # `\u00XX`: no character costs more once stored


def bound_entry(
    actor: str | None, object: str | None, details: dict[str, Any], bounds: Bounds
) -> tuple[str | None, str | None, dict[str, Any]]:
    """`actor`, `object` and `details` within `bounds` (details as plain JSON types)."""
    cut: dict[str, dict[str, Any]] = {}
    actor = _text(actor, "actor", bounds, cut) if actor is not None else None
    object = _text(object, "object", bounds, cut) if object is not None else None
    kept = {key: _value(value, key, bounds, cut) for key, value in details.items()}
    if cut:
        kept[TRUNCATED] = cut
    stored = _encoder.encode(kept)
    if len(stored) > bounds.details_bytes:
        kept = {TRUNCATED: {"details": _fingerprint(stored)}}
    return actor, object, kept


def shortened(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes as stored (with the ellipsis), or as it is."""
    if _fits(text, limit):
        return text
    room, used, end = limit - len(ELLIPSIS.encode()), 0, len(text)
    for i, char in enumerate(text):
        used += _cost(char)
        if used > room:
            end = i
            break
    return text[:end].encode("utf-8", "replace").decode() + ELLIPSIS


def _text(text: str, where: str, bounds: Bounds, cut: dict[str, dict[str, Any]]) -> str:
    stored = shortened(text, bounds.text_bytes)
    if stored != text:
        cut[where] = _fingerprint(text.encode("utf-8", "surrogatepass"))
    return stored


def _value(value: Any, where: str, bounds: Bounds, cut: dict[str, dict[str, Any]]) -> Any:
    if isinstance(value, str):
        return _text(value, where, bounds, cut)
    if isinstance(value, dict):
        return {k: _value(v, f"{where}.{k}", bounds, cut) for k, v in value.items()}
    if isinstance(value, list):
        return [_value(v, f"{where}.{i}", bounds, cut) for i, v in enumerate(value)]
    return value


def _fits(text: str, limit: int) -> bool:
    if len(text) * _WORST_CHAR <= limit:  # the common case: short, nothing to measure
        return _storable(text)
    if len(text) > limit:  # every character takes at least one byte
        return False
    try:
        return len(_encoder.encode(text)) - 2 <= limit  # without the quotes
    except UnicodeEncodeError:
        return False


def _storable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _cost(char: str) -> int:
    """Bytes `char` takes as stored (at most; a lone surrogate becomes one `?`)."""
    code = ord(char)
    if code < 0x20:
        return _WORST_CHAR
    if char in '"\\':
        return 2
    if code < 0x80:
        return 1
    return 2 if code < 0x800 else 3 if code < 0x10000 else 4


def _fingerprint(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

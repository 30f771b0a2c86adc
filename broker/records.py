"""The record that crosses the boundary, and its two encodings.

This is the only data type both halves share. Field names are a public contract that
consumers' code depends on: add fields, never rename or remove one.

- spool frames carry MessagePack (compact, typed, fast to decode on the enterprise side);
- consumers get JSON, with times as RFC 3339 UTC strings ending in `Z`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

Quality = Literal["good", "uncertain", "bad", "stale"]
AssetState = Literal["running", "stopped", "unknown"]
Value = bool | int | float | str | None


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """Operational context added at the edge, from the plant half's own knowledge."""

    asset_state: AssetState = "unknown"


class Record(msgspec.Struct, kw_only=True):
    signal: str  # site/area/asset/measure
    value: Value
    unit: str
    quality: Quality
    source_time: datetime  # when the plant produced the value (UTC)
    broker_time: datetime  # when the plant half turned it into this record (UTC)
    policy_version: int
    context: Context
    seq: int = 0  # stamped by the channel sender when the record is durably written


_to_msgpack = msgspec.msgpack.Encoder()
_from_msgpack = msgspec.msgpack.Decoder(Record)
_to_json = msgspec.json.Encoder()


def encode_frame_payload(record: Record) -> bytes:
    return _to_msgpack.encode(record)


def decode_frame_payload(payload: bytes) -> Record:
    """Decode one spool payload; raises msgspec.DecodeError on anything malformed."""
    return _from_msgpack.decode(payload)


def to_json(obj: object) -> bytes:
    """JSON for consumers: records, lists of records, metadata."""
    return _to_json.encode(obj)

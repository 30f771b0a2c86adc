"""The record that crosses the boundary, and its two encodings.

This is the only data type both halves share. Field names are a public contract that
consumers' code depends on: add fields, never rename or remove one.

- spool frames carry arrays of records as MessagePack (compact, typed, fast to decode on the enterprise side);
- consumers get JSON, with times as RFC 3339 UTC strings ending in `Z`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import msgspec

Quality = Literal["good", "uncertain", "bad", "stale"]
Value = bool | int | float | str | None


class _Part(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Records and their parts never form reference cycles: the cyclic garbage collector
    need not track them (with millions alive in stores and queues, its pauses were the
    stream's worst latencies)."""


class WindowStats(_Part, frozen=True, kw_only=True):
    mean: float | None  # None when no good value fell in the window
    max: float | None


class Load(_Part, frozen=True, kw_only=True):
    signal: str
    windows: dict[str, WindowStats]  # "15m" → mean and max over the last 15 minutes


class WorkOrder(_Part, frozen=True, kw_only=True):
    id: str
    title: str


MaintenanceStatus = Literal["ok", "due", "overdue", "unknown"]


class Maintenance(_Part, frozen=True, kw_only=True):
    status: MaintenanceStatus
    last_service: str | None = None  # ISO dates, as the maintenance file says
    next_due: str | None = None
    open_work_orders: list[WorkOrder] = []


AssessmentLabel = Literal["expected", "drifting", "abnormal"]
AssessmentDirection = Literal["above", "below"]


class Assessment(_Part, frozen=True, kw_only=True):
    expected: float  # the baseline at this sample's ambient and load
    deviation_pct: float  # (value - expected) / |expected| × 100, two decimals
    label: AssessmentLabel  # how far from expected, in the direction the baseline calls worse
    direction: AssessmentDirection | None  # the side of expected; None: exactly on it


class Trend(_Part, frozen=True, kw_only=True):
    slope_per_h: float  # least squares over the asset's trend window
    direction: Literal["rising", "falling", "steady"]
    window: str


class Alert(_Part, frozen=True, kw_only=True):
    rule: str
    severity: Literal["info", "warning", "critical"]
    message: str
    action: str  # the recommended action
    outcome: str  # energy, product_quality, asset_life or safety


class QualityIssue(_Part, frozen=True, kw_only=True):
    # read_failed, undecodable, device_status, out_of_range, spike, flatline, noise,
    # inputs_missing, clock_ahead, stale
    check: str
    detail: str


class Context(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Operational context added at the edge, from the plant half's own knowledge
    (docs/records.md). Only plant-side knowledge: never anything from the enterprise side."""

    asset: str = ""  # the asset path; "" for a signal outside any asset
    asset_type: str = "other"
    asset_state: str = "unknown"
    ambient: dict[str, Value] = {}  # the asset's ambient names → their latest values
    load: Load | None = None
    maintenance: Maintenance | None = None
    assessment: Assessment | None = None  # only for a measure with a baseline
    trend: Trend | None = None  # only for a numeric measure with enough history
    alerts: list[Alert] = []  # the asset's active rules
    quality_issues: list[QualityIssue] = []  # why the value is not `good`


class Record(msgspec.Struct, kw_only=True, gc=False):
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
_from_msgpack = msgspec.msgpack.Decoder(list[Record])
_to_json = msgspec.json.Encoder()


def encode_frame_payload(records: Sequence[Record]) -> bytes:
    """One spool payload: the records as one MessagePack array (one encoder call for all of
    them costs a third less than one per record)."""
    return _to_msgpack.encode(records)


def decode_frame_payload(payload: bytes) -> list[Record]:
    """Decode one spool payload; raises msgspec.DecodeError on anything malformed."""
    return _from_msgpack.decode(payload)


def to_json(obj: object) -> bytes:
    """JSON for consumers: records, lists of records, metadata."""
    return _to_json.encode(obj)

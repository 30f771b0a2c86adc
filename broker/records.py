"""The record that crosses the boundary, and its two encodings.

This is the only data type both halves share. Field names are a public contract that
consumers' code depends on: add fields, never rename or remove one.

- spool frames carry records as MessagePack, each asset's shared context once (ADR 0030) (compact, typed, fast to decode on the enterprise side);
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


FRAME_RECORDS = 256  # records a spool frame holds at most (a frame with context: ~150 KB)


class _Row(msgspec.Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    """A record in a frame that carries its asset's shared context once: the record's own
    fields, the index of its shared context in the frame, and the three context fields
    that differ from record to record."""

    signal: str
    value: Value
    unit: str
    quality: Quality
    source_time: datetime
    broker_time: datetime
    policy_version: int
    seq: int
    shared: int
    assessment: Assessment | None
    trend: Trend | None
    quality_issues: list[QualityIssue]


class _SharedFrame(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A frame payload as written since issue 19: a MessagePack map (the older payload is a
    bare array of records, which still decodes). Unknown keys and longer rows are refused:
    a later format's additions must count as an undecodable frame here, never be skipped."""

    contexts: list[Context]  # without assessment, trend and quality issues
    records: list[_Row]


_to_msgpack = msgspec.msgpack.Encoder()
_from_msgpack = msgspec.msgpack.Decoder(list[Record])
_from_shared = msgspec.msgpack.Decoder(_SharedFrame)
_to_json = msgspec.json.Encoder()
_replace = msgspec.structs.replace
_MAP = 0x80  # the high nibble of a MessagePack fixmap: a shared-context payload


def encode_frame_payload(records: Sequence[Record]) -> bytes:
    """One spool payload: the records with each asset's shared context once (its state,
    ambient, load, maintenance and alerts are the same for every record of a scan; they
    were three quarters of the bytes), one encoder call for the frame."""
    shared_at: dict[int, int] = {}  # id(context) → index in `shared`
    # Contexts made from one asset's base share its parts by identity: by the id of their
    # alerts first (one id, not four, per record with a context of its own), then compared.
    by_alerts: dict[int, list[tuple[Context, int]]] = {}
    shared: list[Context] = []
    rows: list[tuple[object, ...]] = []
    add_row = rows.append
    for r in records:
        c = r.context
        key = id(c)  # contexts are alive through the call: ids are stable
        at = shared_at.get(key)
        if at is None:
            alike = by_alerts.get(id(c.alerts))
            if alike is None:
                alike = by_alerts[id(c.alerts)] = []
            for other, index in alike:
                if (
                    other.ambient is c.ambient
                    and other.load is c.load
                    and other.maintenance is c.maintenance
                    and other.asset == c.asset
                    and other.asset_type == c.asset_type
                    and other.asset_state == c.asset_state
                ):
                    at = index
                    break
            else:
                at = len(shared)
                alike.append((c, at))
                shared.append(_replace(c, assessment=None, trend=None, quality_issues=[]))
            shared_at[key] = at
        add_row(
            (
                r.signal,
                r.value,
                r.unit,
                r.quality,
                r.source_time,
                r.broker_time,
                r.policy_version,
                r.seq,
                at,
                c.assessment,
                c.trend,
                c.quality_issues,
            )
        )
    return _to_msgpack.encode({"contexts": shared, "records": rows})


def decode_record_array(payload: bytes) -> list[Record]:
    """A bare MessagePack array of records (the diode's datagrams, spools before issue 19);
    raises msgspec.DecodeError on anything else, a shared-context map included."""
    return _from_msgpack.decode(payload)


def decode_frame_payload(payload: bytes) -> list[Record]:
    """Decode one spool payload, of either form; raises msgspec.DecodeError on anything
    malformed."""
    if not payload or payload[0] & 0xF0 != _MAP:
        return _from_msgpack.decode(payload)
    frame = _from_shared.decode(payload)
    contexts = frame.contexts
    # The encoder writes at most FRAME_RECORDS rows, and no context without a row: one
    # context shared by more rows would make a small frame into a flood of JSON downstream.
    if len(frame.records) > FRAME_RECORDS:
        raise msgspec.DecodeError(
            f"a frame of {len(frame.records)} records, at most {FRAME_RECORDS} are written"
        )
    if len(contexts) > len(frame.records):
        raise msgspec.DecodeError(
            f"a frame of {len(contexts)} shared contexts for {len(frame.records)} records"
        )
    if any(not 0 <= row.shared < len(contexts) for row in frame.records):
        raise msgspec.DecodeError("a record's shared context is not in its frame")
    return [
        Record(
            signal=row.signal,
            value=row.value,
            unit=row.unit,
            quality=row.quality,
            source_time=row.source_time,
            broker_time=row.broker_time,
            policy_version=row.policy_version,
            context=contexts[row.shared]
            if row.assessment is None and row.trend is None and not row.quality_issues
            else _replace(
                contexts[row.shared],
                assessment=row.assessment,
                trend=row.trend,
                quality_issues=row.quality_issues,
            ),
            seq=row.seq,
        )
        for row in frame.records
    ]


def to_json(obj: object) -> bytes:
    """JSON for consumers: records, lists of records, metadata."""
    return _to_json.encode(obj)

"""Record encodings: MessagePack frames round-trip exactly; consumers' JSON keeps the public names."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from broker.channel.spool import SpoolReceiver, frame, segment_path
from broker.records import (
    FRAME_RECORDS,
    Alert,
    Assessment,
    Context,
    Load,
    Maintenance,
    QualityIssue,
    Record,
    Trend,
    Value,
    WindowStats,
    WorkOrder,
    decode_frame_payload,
    encode_frame_payload,
    to_json,
)

PUBLIC_FIELDS = {
    "signal",
    "value",
    "unit",
    "quality",
    "source_time",
    "broker_time",
    "seq",
    "policy_version",
    "context",
}
SOURCE_TIME = datetime(2025, 3, 9, 23, 59, 58, 123456, tzinfo=UTC)


def record(value: Value = 4.25, **changes: object) -> Record:
    fields: dict[str, object] = {
        "signal": "coldstore/machine-room/compressor-1/suction_pressure",
        "value": value,
        "unit": "bar",
        "quality": "good",
        "source_time": SOURCE_TIME,
        "broker_time": SOURCE_TIME + timedelta(seconds=1, microseconds=7),
        "policy_version": 12,
        "context": Context(asset_state="running"),
        "seq": 987_654_321,
    }
    fields.update(changes)
    return Record(**fields)  # type: ignore[arg-type]


def round_trip(r: Record) -> Record:
    (decoded,) = decode_frame_payload(encode_frame_payload([r]))
    return decoded


def as_dict(r: Record) -> dict[str, object]:
    return {name: getattr(r, name) for name in r.__struct_fields__}


@pytest.mark.parametrize("value", [True, False, 0, -7, 2**53, 4.25, -0.001, "", "open", None])
def test_a_record_round_trips_through_a_frame_unchanged(value: Value) -> None:
    original = record(value)
    decoded = round_trip(original)
    assert decoded == original
    assert type(decoded.value) is type(value)  # a bool stays a bool, an int never a float


@pytest.mark.parametrize("quality", ["good", "uncertain", "bad", "stale"])
@pytest.mark.parametrize("state", ["running", "stopped", "unknown"])
def test_every_quality_and_asset_state_round_trips(quality: str, state: str) -> None:
    original = record(quality=quality, context=Context(asset_state=state))
    assert as_dict(round_trip(original)) == as_dict(original)


def test_times_stay_timezone_aware_utc_with_microseconds() -> None:
    decoded = round_trip(record())
    for name in ("source_time", "broker_time"):
        time = getattr(decoded, name)
        assert time.utcoffset() == timedelta(0)
        assert time == getattr(record(), name)
    assert decoded.source_time.microsecond == 123456


def test_a_record_without_a_sequence_number_decodes_with_seq_0() -> None:
    fields = as_dict(record())
    del fields["seq"]
    assert decode_frame_payload(msgspec.msgpack.encode([fields]))[0].seq == 0


def test_json_has_exactly_the_public_field_names() -> None:
    document = json.loads(to_json(record()))
    assert set(document) == PUBLIC_FIELDS
    assert document["context"] == {
        "asset": "", "asset_type": "other", "asset_state": "running", "ambient": {}, "load": None,
        "maintenance": None, "assessment": None, "trend": None, "alerts": [], "quality_issues": [],
    }  # fmt: skip


def test_json_values_match_the_record() -> None:
    r = record("open", quality="uncertain")
    document = json.loads(to_json(r))
    for name in ("signal", "value", "unit", "quality", "seq", "policy_version"):
        assert document[name] == getattr(r, name)


def test_json_times_are_rfc3339_utc_ending_in_z() -> None:
    r = record()
    document = json.loads(to_json(r))
    for name in ("source_time", "broker_time"):
        text = document[name]
        assert text.endswith("Z")
        assert datetime.fromisoformat(text.removesuffix("Z") + "+00:00") == getattr(r, name)
    assert document["source_time"] == "2025-03-09T23:59:58.123456Z"


def test_a_list_of_records_is_a_json_array_of_records() -> None:
    records = [record(1, seq=1), record(2, seq=2)]
    document = json.loads(to_json(records))
    assert [item["seq"] for item in document] == [1, 2]
    assert all(set(item) == PUBLIC_FIELDS for item in document)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xc1", b"\xff\x00\x13garbage", b'{"signal": "a/b"}', msgspec.msgpack.encode([1, 2])],
)
def test_garbage_is_a_decode_error(garbage: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_frame_payload(garbage)


def test_a_truncated_frame_is_a_decode_error() -> None:
    payload = encode_frame_payload([record()])
    with pytest.raises(msgspec.DecodeError):
        decode_frame_payload(payload[: len(payload) // 2])


@pytest.mark.parametrize("missing", sorted(PUBLIC_FIELDS - {"seq"}))
def test_a_payload_missing_a_required_field_is_a_decode_error(missing: str) -> None:
    fields = as_dict(record())
    del fields[missing]
    with pytest.raises(msgspec.DecodeError, match=missing):
        decode_frame_payload(msgspec.msgpack.encode([fields]))


@pytest.mark.parametrize(
    ("name", "wrong"),
    [("quality", "excellent"), ("policy_version", "12"), ("context", {"asset_state": 7})],
)
def test_a_payload_with_a_wrong_value_is_a_decode_error(name: str, wrong: object) -> None:
    fields = {**as_dict(record()), name: wrong}
    with pytest.raises(msgspec.DecodeError):
        decode_frame_payload(msgspec.msgpack.encode([fields]))


def scan_of_one_asset() -> list[Record]:
    """Records as the context engine makes them: one base per asset and scan, shared by
    identity, and copies of it carrying a record's own assessment, trend and issues."""
    base = Context(
        asset="site/a/pump-1",
        asset_type="pump",
        asset_state="running",
        ambient={"temperature": 21.5},
        load=Load(signal="site/a/pump-1/power", windows={"15m": WindowStats(mean=2.5, max=3.0)}),
        maintenance=Maintenance(status="due", open_work_orders=[WorkOrder(id="7", title="seal")]),
        alerts=[Alert(rule="hot", severity="warning", message="m", action="a", outcome="energy")],
    )
    trend = Trend(slope_per_h=0.25, direction="rising", window="1h")
    assessment = Assessment(expected=20.0, deviation_pct=7.5, label="expected", direction="above")
    issue = QualityIssue(check="out_of_range", detail="999 outside the valid range 0 to 100")
    other = msgspec.structs.replace(base, asset="site/a/pump-2", ambient={"temperature": None})
    contexts = [
        base,
        msgspec.structs.replace(base, trend=trend),
        msgspec.structs.replace(base, assessment=assessment, trend=trend),
        msgspec.structs.replace(base, quality_issues=[issue]),
        other,
        Context(asset="site/a/other"),
    ]
    return [record(float(i), seq=i + 1, context=c) for i, c in enumerate(contexts)]


def test_records_sharing_a_context_round_trip_exactly_and_carry_it_once() -> None:
    records = scan_of_one_asset()
    payload = encode_frame_payload(records)
    decoded = decode_frame_payload(payload)
    assert decoded == records
    assert [to_json(r) for r in decoded] == [to_json(r) for r in records]
    assert len(msgspec.msgpack.decode(payload)["contexts"]) == 3  # an asset's once
    assert decoded[0].context.alerts is decoded[1].context.alerts  # shared on this side too


def test_a_payload_written_before_shared_contexts_still_decodes() -> None:
    """Spools written before issue 19 hold frames of bare record arrays (ADR 0003, 0030)."""
    records = scan_of_one_asset()
    assert decode_frame_payload(msgspec.msgpack.encode(records)) == records


@pytest.mark.parametrize("index", [-1, 1])
def test_a_record_pointing_outside_its_frames_contexts_is_a_decode_error(index: int) -> None:
    payload = msgspec.msgpack.decode(encode_frame_payload([record()]))
    payload["records"][0][8] = index
    with pytest.raises(msgspec.DecodeError, match="shared context"):
        decode_frame_payload(msgspec.msgpack.encode(payload))


def shared_frame(records: list[Record]) -> dict[str, list[object]]:
    decoded: dict[str, list[object]] = msgspec.msgpack.decode(encode_frame_payload(records))
    return decoded


def too_many_rows() -> dict[str, list[object]]:
    return shared_frame([record(seq=i + 1) for i in range(FRAME_RECORDS + 1)])


def more_contexts_than_rows() -> dict[str, list[object]]:
    payload = shared_frame([record()])
    payload["contexts"].append(payload["contexts"][0])
    return payload


def an_unknown_key() -> dict[str, list[object]]:
    return shared_frame([record()]) | {"zzz": [1]}


def a_longer_row() -> dict[str, list[object]]:
    payload = shared_frame([record()])
    payload["records"][0].append(None)  # type: ignore[attr-defined]
    return payload


HOSTILE_FRAMES = pytest.mark.parametrize(
    ("hostile", "error"),
    [
        (too_many_rows, f"257 records, at most {FRAME_RECORDS}"),
        (more_contexts_than_rows, "2 shared contexts for 1 records"),
        (an_unknown_key, "unknown field `zzz`"),
        (a_longer_row, "at most length 12, got 13"),
    ],
)


@HOSTILE_FRAMES
def test_a_frame_the_encoder_never_writes_is_a_decode_error(
    hostile: Callable[[], dict[str, list[object]]], error: str
) -> None:
    """No amplification (one context copied into rows without bound) and no silent skip of
    what a later format adds (ADR 0030): such a frame counts as undecodable."""
    with pytest.raises(msgspec.DecodeError, match=re.escape(error)):
        decode_frame_payload(msgspec.msgpack.encode(hostile()))


def test_a_full_frame_of_one_shared_context_still_decodes() -> None:
    records = [record(seq=i + 1) for i in range(FRAME_RECORDS)]
    assert decode_frame_payload(encode_frame_payload(records)) == records


@HOSTILE_FRAMES
def test_the_spool_receiver_counts_a_hostile_frame_and_reads_on(
    tmp_path: Path, hostile: Callable[[], dict[str, list[object]]], error: str
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [encode_frame_payload([record(seq=seq)]) for seq in (1, 2)]
    bad = msgspec.msgpack.encode(hostile())
    segment_path(spool, 1).write_bytes(frame(good[0]) + frame(bad) + frame(good[1]))
    receiver = SpoolReceiver(spool, tmp_path / "state")
    assert [r.seq for r in receiver.receive()] == [1, 2]
    assert receiver.bad_records == 1

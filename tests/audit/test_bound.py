"""An entry's size is bounded whatever the strings in it: cut values keep their beginning,
and their full length and SHA-256 are in `details.truncated`."""

from __future__ import annotations

import hashlib
import json

import pytest

from broker.audit.bound import INSIDER, OUTSIDER, bound_entry, shortened

PERCENT_01_PATH = "/v1/signals/" + "\x01" * 2700  # what an 8 KB path of `%01` decodes to


def stored(value: object) -> int:
    """Bytes of `value` as the audit log stores it (JSON, UTF-8), without quotes."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()) - 2


def test_a_long_control_character_object_is_cut_to_the_bound_with_its_hash() -> None:
    actor, object, details = bound_entry("spiffe://x", PERCENT_01_PATH, {"reason": "r"}, OUTSIDER)
    assert object is not None and object.endswith("…")
    assert PERCENT_01_PATH.startswith(object[:-1])
    assert stored(object) <= OUTSIDER.text_bytes
    full = PERCENT_01_PATH.encode()
    assert details["truncated"] == {
        "object": {"bytes": len(full), "sha256": hashlib.sha256(full).hexdigest()}
    }
    assert actor == "spiffe://x" and details["reason"] == "r"


@pytest.mark.parametrize(
    "text",
    [
        "x" * 5000,
        "\x01" * 5000,
        '"\\' * 3000,
        "é" * 3000,
        "€" * 3000,
        "😀" * 3000,
        "\ud800" * 3000,  # lone surrogates: not storable as UTF-8 at all
        'a\x01é€😀\ud800\n"\\' * 700,
    ],
)
def test_any_text_is_stored_within_the_bound(text: str) -> None:
    for limit in (16, 256, 1024):
        cut = shortened(text, limit)
        assert stored(cut) <= limit, (limit, cut[:20])
        cut.encode()  # storable


def test_short_values_are_kept_as_they_are() -> None:
    details = {"remote": "127.0.0.1", "n": 3, "ok": True, "signers": ["ot:Olga:ab12"], "x": None}
    assert bound_entry("a", "b", details, OUTSIDER) == ("a", "b", details)


def test_a_value_just_at_the_bound_is_kept_and_one_more_byte_is_cut() -> None:
    limit = OUTSIDER.text_bytes
    assert shortened("x" * limit, limit) == "x" * limit
    assert shortened("x" * (limit + 1), limit) == "x" * (limit - 3) + "…"
    escaped = "\x01" * (limit // 6)  # 6 bytes each once stored
    assert shortened(escaped, limit) == escaped
    assert shortened(escaped + "\x01", limit) != escaped + "\x01"


def test_a_short_unstorable_value_is_replaced_and_noted() -> None:
    _, _, details = bound_entry(None, None, {"header": "a\ud800b"}, OUTSIDER)
    assert details["header"].encode()
    assert details["truncated"]["header"]["bytes"] == 5  # the surrogate passed through as 3


def test_nested_values_are_cut_and_named_by_where_they_were() -> None:
    long = "y" * 3000
    _, _, details = bound_entry(None, None, {"peer": {"sans": ["ok", long]}}, INSIDER)
    assert details["peer"]["sans"][0] == "ok"
    assert stored(details["peer"]["sans"][1]) <= INSIDER.text_bytes
    assert (
        details["truncated"]["peer.sans.1"]["sha256"] == hashlib.sha256(long.encode()).hexdigest()
    )


def test_too_many_fields_replace_the_details_by_their_size_and_hash() -> None:
    many = {f"header_{i}": "v" * 200 for i in range(100)}
    _, _, details = bound_entry(None, None, many, OUTSIDER)
    assert list(details) == ["truncated"]
    summary = details["truncated"]["details"]
    assert summary["bytes"] > OUTSIDER.details_bytes and len(summary["sha256"]) == 64
    assert stored(details) <= OUTSIDER.details_bytes


def test_security_events_keep_longer_texts_than_outsider_events() -> None:
    error = "policy.yaml: " + "signals[3].source.address: out of range; " * 15  # ~640 bytes
    _, _, inside = bound_entry(None, None, {"error": error}, INSIDER)
    _, _, outside = bound_entry(None, None, {"error": error}, OUTSIDER)
    assert inside == {"error": error}
    assert outside["error"] != error


def test_the_ellipsis_counts_within_the_bound() -> None:
    assert shortened("abcdef", 4) == "a…"
    assert shortened("abcdef", 6) == "abcdef"

"""Repeatable events: the first few per (event, source) and interval in full, the rest
counted into one summary per interval, with a cap per kind of source (addresses, identities,
devices: none can use up another's), trust events never crowded out, and a capacity reserve.

The throttle is given a clock the test moves, so intervals end exactly when the test says.
"""

from __future__ import annotations

from typing import Any

from broker.audit.throttle import Kind, Limits, Throttle

DENIED = "consumer_denied"
HANDSHAKE = "tls_handshake_failed"
REFUSED = "device_read_refused"
ADDRESS, IDENTITY, DEVICE = Kind.ADDRESS, Kind.IDENTITY, Kind.DEVICE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**limits: Any) -> tuple[Throttle, Clock]:
    clock = Clock()
    return Throttle(Limits(**limits), clock), clock


def flood(
    throttle: Throttle,
    event: str,
    source: str,
    count: int,
    reserved: bool = False,
    kind: Kind | None = None,
    trust: bool = False,
) -> int:
    """Offer `count` events; how many were admitted in full. Handshakes come from addresses,
    other events from identities, unless `kind` says otherwise."""
    kind = kind or (ADDRESS if event == HANDSHAKE else IDENTITY)
    return sum(
        throttle.admit(event, source, kind, reserved=reserved, trust=trust) for _ in range(count)
    )


def test_the_first_few_per_source_are_written_and_the_rest_counted_once_per_interval() -> None:
    throttle, clock = make(per_source=5, interval_s=60)
    assert flood(throttle, DENIED, "spiffe://a", 1000) == 5
    assert flood(throttle, HANDSHAKE, "10.0.0.9", 7) == 5  # its own budget
    assert throttle.summary(reserved=False) is None  # the interval is not over
    clock.now += 59.9
    assert throttle.summary(reserved=False) is None
    clock.now += 0.1
    summary = throttle.summary(reserved=False)  # due without any new event
    assert summary is not None
    assert summary["suppressed"] == 997 and summary["written"] == 10
    assert summary["by_event"] == {DENIED: 995, HANDSHAKE: 2}
    assert summary["by_source"] == [
        {"event": HANDSHAKE, "kind": "address", "source": "10.0.0.9", "count": 2},
        {"event": DENIED, "kind": "identity", "source": "spiffe://a", "count": 995},
    ]
    assert summary["by_kind"] == {"address": 2, "identity": 995}
    assert summary["other_sources"] == {}
    assert summary["capacity_reserve"] is False
    assert throttle.summary(reserved=False) is None  # one summary per interval
    assert flood(throttle, DENIED, "spiffe://a", 10) == 5  # a new interval, a new budget
    assert throttle.suppressed == {DENIED: 1000, HANDSHAKE: 2}  # since start


def test_an_interval_without_anything_counted_gives_no_summary() -> None:
    throttle, clock = make(per_source=5)
    flood(throttle, DENIED, "a", 5)
    clock.now += 61
    assert throttle.summary(reserved=False) is None


def test_many_sources_cannot_multiply_the_budget() -> None:
    throttle, clock = make(per_source=10, overall=50)
    written = sum(flood(throttle, HANDSHAKE, f"10.0.{i // 256}.{i % 256}", 10) for i in range(1000))
    assert written == 50
    clock.now += 60
    summary = throttle.summary(reserved=False)
    assert summary is not None and summary["suppressed"] == 10_000 - 50


def test_a_summary_names_the_largest_sources_and_sums_the_rest() -> None:
    throttle, _ = make(per_source=0, top_sources=3)
    for i in range(10):
        flood(throttle, HANDSHAKE, f"source-{i}", i + 1)  # source-9 sends most
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert [s["source"] for s in summary["by_source"]] == ["source-9", "source-8", "source-7"]
    assert summary["other_sources"] == {"address": {"pairs": 7, "count": sum(range(1, 8))}}
    assert summary["suppressed"] == sum(range(1, 11))


def test_memory_is_bounded_by_the_pairs_tracked() -> None:
    throttle, _ = make(per_source=0, tracked=100, top_sources=5)
    for i in range(5000):
        flood(throttle, HANDSHAKE, f"2001:db8::{i:x}", 1)
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert summary["suppressed"] == 5000
    assert summary["other_sources"] == {"address": {"pairs": 95, "count": 5000 - 5}}


def test_a_long_source_is_counted_by_its_beginning() -> None:
    throttle, _ = make(per_source=1)
    flood(throttle, DENIED, "x" * 10_000 + "1", 3)
    flood(throttle, DENIED, "x" * 10_000 + "2", 3)
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert summary["by_source"] == [
        {"event": DENIED, "kind": "identity", "source": "x" * 128, "count": 5}
    ]


def test_in_the_capacity_reserve_nothing_is_written_and_an_interval_lasts_longer() -> None:
    throttle, clock = make(per_source=5, interval_s=60, reserve_interval_s=3600)
    assert flood(throttle, DENIED, "a", 100, reserved=True) == 0
    clock.now += 61
    assert throttle.summary(reserved=True) is None  # one summary an hour in the reserve
    clock.now += 3600
    summary = throttle.summary(reserved=True)
    assert summary is not None and summary["capacity_reserve"] is True
    assert summary["suppressed"] == 100


def test_leaving_the_reserve_ends_its_long_interval() -> None:
    throttle, clock = make(per_source=5, reserve_interval_s=3600)
    flood(throttle, DENIED, "a", 10, reserved=True)
    clock.now += 1
    summary = throttle.summary(reserved=False)  # retention made room again
    assert summary is not None and summary["suppressed"] == 10
    assert flood(throttle, DENIED, "a", 10) == 5


def test_the_final_summary_is_due_at_once() -> None:
    throttle, _ = make(per_source=1)
    flood(throttle, DENIED, "a", 3)
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None and summary["suppressed"] == 2


def test_addresses_cannot_use_up_the_budget_of_identities() -> None:
    """The review's reproduction: 25 addresses x 20 failed handshakes used to spend the one
    overall budget, and a stolen identity's denials then went unwritten and unnamed."""
    throttle, _ = make()
    handshakes = sum(flood(throttle, HANDSHAKE, f"10.9.0.{i}", 20) for i in range(25))
    assert handshakes == 200  # the addresses' own budget, used up
    assert flood(throttle, DENIED, "spiffe://site/historian", 3) == 3
    assert flood(throttle, REFUSED, "plc-1", 3, kind=DEVICE) == 3  # nor the devices' budget


def test_a_summary_names_every_identity_it_counted_whatever_the_addresses_do() -> None:
    throttle, _ = make(per_source=10, overall=200)
    for i in range(1000):
        flood(throttle, HANDSHAKE, f"2001:db8::{i:x}", 30)  # far more than any identity
    for i in range(150):
        flood(throttle, DENIED, f"spiffe://site/c{i}", 12)  # 20 get 10 in full, 130 none
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    named = {s["source"]: s["count"] for s in summary["by_source"] if s["kind"] == "identity"}
    assert len(named) == 150
    assert sum(named.values()) == 20 * 2 + 130 * 12
    assert sum(s["kind"] == "address" for s in summary["by_source"]) == 20  # the top 20 only
    assert set(summary["other_sources"]) == {"address"}  # no identity left unnamed


def test_identities_beyond_the_cap_are_summed_and_the_summary_says_so() -> None:
    throttle, _ = make(per_source=0, named=200)
    for i in range(250):
        flood(throttle, DENIED, f"spiffe://site/c{i:03d}", 2 if i < 200 else 1)
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert sum(s["kind"] == "identity" for s in summary["by_source"]) == 200
    assert summary["other_sources"] == {"identity": {"pairs": 50, "count": 50}}


def test_trust_denials_are_never_crowded_out_but_their_own_repeats_are_counted() -> None:
    throttle, clock = make(per_source=10, overall=20)
    assert flood(throttle, DENIED, "spiffe://a", 30) == 10
    assert flood(throttle, DENIED, "spiffe://b", 30) == 10  # the identities' budget is spent
    assert flood(throttle, DENIED, "spiffe://c", 5) == 0
    assert flood(throttle, DENIED, "spiffe://c", 5, trust=True) == 5  # revoked: written
    assert flood(throttle, DENIED, "spiffe://d", 5, reserved=True, trust=True) == 5  # reserve
    assert flood(throttle, DENIED, "spiffe://c", 30, trust=True) == 5  # 10 per interval each
    clock.now += 60
    summary = throttle.summary(reserved=False)
    assert summary is not None
    assert {"event": DENIED, "kind": "identity", "source": "spiffe://c", "count": 30} in summary[
        "by_source"
    ]


def test_devices_have_their_own_budget_and_are_named_by_device() -> None:
    throttle, _ = make(per_source=3, overall=10)
    flood(throttle, REFUSED, "plc-1", 1000, kind=DEVICE)  # 1,000 signals of one PLC flipping
    assert flood(throttle, REFUSED, "plc-2", 5, kind=DEVICE) == 3
    # 4 within the budget (plc-0's 3, plc-1's first), then only the other 7 devices' first
    assert sum(flood(throttle, "scan_overrun", f"plc-{i}", 3, kind=DEVICE) for i in range(9)) == 11
    assert flood(throttle, DENIED, "spiffe://a", 3) == 3  # the IT side's budget is untouched
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    by_device = {(s["event"], s["source"]): s["count"] for s in summary["by_source"]}
    assert by_device[(REFUSED, "plc-1")] == 997 and by_device[(REFUSED, "plc-2")] == 2
    assert summary["by_kind"]["device"] == 997 + 2 + 27 - 11


DEVICE_EVENTS = ("device_status_reported", "device_read_refused", "device_read_recovered",
                 "device_session_up", "device_session_down", "device_unsolicited_ignored",
                 "scan_overrun", "scan_overrun_ended", "device_connector_failed")  # fmt: skip


def test_noisy_devices_cannot_hide_another_devices_first_event() -> None:
    """Review 16 (availability, finding 2): a DNP3 outstation toggling its indications and a
    BACnet device refusing every other request use up the devices' overall budget; a good
    device's `device_session_down` was then only a count in the summary."""
    throttle, clock = make()  # the defaults: 10 per (event, device), 200 per interval
    noisy = ("dnp3-iin-toggle", "bacnet-refuser", "dnp3-flap")
    written = sum(  # every noisy pair once, then over and over
        flood(throttle, event, device, count, kind=DEVICE)
        for count in (1, 50)
        for device in noisy
        for event in DEVICE_EVENTS
    )
    assert written == 200  # the devices' overall budget, used up
    clock.now += 59  # the same interval
    assert flood(throttle, "device_session_down", "good-plc", 1, kind=DEVICE) == 1  # in full
    assert flood(throttle, "device_session_up", "good-plc", 1, kind=DEVICE) == 1
    assert flood(throttle, "device_session_down", "good-plc", 5, kind=DEVICE) == 0  # repeats
    assert flood(throttle, "device_session_up", "good-plc", 5, kind=DEVICE) == 0
    # the noisy ones stay limited: each of their pairs had its first entry, or 10, already
    assert sum(flood(throttle, e, d, 20, kind=DEVICE) for d in noisy for e in DEVICE_EVENTS) == 0
    assert flood(throttle, "device_session_down", "good-plc", 1, reserved=True, kind=DEVICE) == 0
    assert flood(throttle, "device_session_up", "other-plc", 1, reserved=True, kind=DEVICE) == 0
    clock.now += 1
    summary = throttle.summary(reserved=False)
    assert summary is not None
    assert summary["written"] == 202
    counted = {(s["event"], s["source"]): s["count"] for s in summary["by_source"]}
    assert counted[("device_session_down", "good-plc")] == 6
    assert counted[("device_session_up", "good-plc")] == 5
    assert counted[("device_session_up", "other-plc")] == 1  # the capacity reserve held it
    # a new interval: the good device's first is written again, even with the budget spent
    sum(flood(throttle, e, d, 50, kind=DEVICE) for d in noisy for e in DEVICE_EVENTS)
    assert flood(throttle, "device_session_down", "good-plc", 3, kind=DEVICE) == 1


def test_first_device_entries_beyond_the_budget_are_bounded_by_the_pairs_tracked() -> None:
    throttle, _ = make(per_source=10, overall=5, tracked=50)
    assert flood(throttle, REFUSED, "noisy", 100, kind=DEVICE) == 5  # the budget, spent
    # pairs beyond `tracked` (a config cannot name that many; the bound holds all the same)
    written = sum(flood(throttle, REFUSED, f"plc-{i}", 2, kind=DEVICE) for i in range(1000))
    assert written == 50 - 1  # one pair each until 50 pairs were written in full
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert summary["written"] == 5 + 49
    assert summary["suppressed"] == 95 + 49 + (1000 - 49) * 2
    assert summary["other_sources"] == {"device": {"pairs": 0, "count": (1000 - 49) * 2}}

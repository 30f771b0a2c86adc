"""plan_reads: every modelled address, no other address, within the per-request limits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import msgspec

from broker.plant.connectors.modbus_plan import READ_FUNCTIONS, ReadRequest, plan_reads
from broker.policy import Signal, load
from broker.policy.schema import REGISTER_WIDTH
from tests.harness import DEMO_POLICY


def sig(
    address: int, type_: str = "int16", table: str = "input_register", name: str = ""
) -> Signal:
    return msgspec.convert(
        {
            "path": f"site/asset/{name or f'{table}-{type_}-{address}'}",
            "device": "plc",
            "source": {"protocol": "modbus", "table": table, "address": address, "type": type_},
        },
        Signal,
    )


def covered(requests: Sequence[ReadRequest]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = defaultdict(set)
    for r in requests:
        out[r.table] |= set(range(r.address, r.address + r.count))
    return dict(out)


def modelled(signals: Sequence[Signal]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = defaultdict(set)
    for s in signals:
        width = REGISTER_WIDTH.get(s.source.type, 1)
        out[s.source.table] |= set(range(s.source.address, s.source.address + width))
    return dict(out)


def spans(requests: Sequence[ReadRequest]) -> list[tuple[str, int, int]]:
    return [(r.table, r.address, r.count) for r in requests]


def assert_each_signal_whole_in_exactly_one_request(
    signals: Sequence[Signal], requests: Sequence[ReadRequest]
) -> None:
    by_path = {s.path: s for s in signals}
    seen = []
    for r in requests:
        for slot in r.slots:
            s = by_path[slot.signal]
            assert s.source.table == r.table
            assert r.address + slot.offset == s.source.address
            assert slot.width == s.source.width
            assert slot.offset + slot.width <= r.count  # not split across requests
            seen.append(slot.signal)
    assert sorted(seen) == sorted(by_path)


def test_read_functions_are_exactly_the_four_read_codes() -> None:
    assert {code for code, _, _ in READ_FUNCTIONS.values()} == {1, 2, 3, 4}
    assert all(method.startswith("read_") for _, method, _ in READ_FUNCTIONS.values())


def test_demo_plan_reads_exactly_the_modelled_addresses_per_table() -> None:
    signals = load(DEMO_POLICY).signals

    requests = plan_reads(signals, 1)

    assert covered(requests) == modelled(signals)
    assert_each_signal_whole_in_exactly_one_request(signals, requests)


def test_demo_plan_uses_the_function_code_of_each_table() -> None:
    codes = {"coil": 1, "discrete_input": 2, "holding_register": 3, "input_register": 4}

    for request in plan_reads(load(DEMO_POLICY).signals, 1):
        assert request.function_code == codes[request.table]


def test_gaps_are_never_bridged() -> None:
    signals = [sig(0), sig(2), sig(10, "float32")]

    requests = plan_reads(signals, 1)

    assert spans(requests) == [
        ("input_register", 0, 1),
        ("input_register", 2, 1),
        ("input_register", 10, 2),
    ]


def test_adjacent_signals_are_merged_into_one_request() -> None:
    signals = [sig(8, "uint16"), sig(5, "int16"), sig(6, "float32")]

    (request,) = plan_reads(signals, 1)

    assert (request.address, request.count) == (5, 4)
    assert_each_signal_whole_in_exactly_one_request(signals, [request])


def test_tables_are_never_mixed_in_one_request() -> None:
    signals = [sig(0, table="input_register"), sig(1, table="holding_register")]

    requests = plan_reads(signals, 1)

    assert sorted(spans(requests)) == [("holding_register", 1, 1), ("input_register", 0, 1)]


def test_run_of_exactly_125_registers_is_one_request() -> None:
    signals = [sig(a) for a in range(125)]

    assert spans(plan_reads(signals, 1)) == [("input_register", 0, 125)]


def test_run_of_126_registers_is_split_at_125() -> None:
    signals = [sig(a) for a in range(126)]

    assert spans(plan_reads(signals, 1)) == [("input_register", 0, 125), ("input_register", 125, 1)]


def test_long_register_run_is_split_without_splitting_a_two_register_signal() -> None:
    # float32 number 62 occupies registers 124-125: it straddles the 125-register limit.
    signals = [sig(a, "float32") for a in range(0, 140, 2)]

    requests = plan_reads(signals, 1)

    assert len(requests) == 2  # 140 registers cannot take fewer
    assert all(r.count <= 125 for r in requests)
    assert covered(requests) == modelled(signals)
    assert_each_signal_whole_in_exactly_one_request(signals, requests)


def test_bit_requests_are_limited_to_2000() -> None:
    signals = [sig(a, "bool", "coil") for a in range(2001)]

    requests = plan_reads(signals, 1)

    assert spans(requests) == [("coil", 0, 2000), ("coil", 2000, 1)]
    assert_each_signal_whole_in_exactly_one_request(signals, requests)


def test_2000_bits_fit_one_request() -> None:
    signals = [sig(a, "bool", "discrete_input") for a in range(2000)]

    assert spans(plan_reads(signals, 1)) == [("discrete_input", 0, 2000)]


def test_two_signals_on_one_register_share_one_request() -> None:
    signals = [sig(7, "int16", name="signed"), sig(7, "uint16", name="unsigned")]

    (request,) = plan_reads(signals, 1)

    assert (request.address, request.count) == (7, 1)
    assert sorted((s.signal, s.offset) for s in request.slots) == [
        ("site/asset/signed", 0),
        ("site/asset/unsigned", 0),
    ]


def test_partly_overlapping_signals_share_one_request() -> None:
    signals = [sig(10, "float32"), sig(11, "int16")]

    (request,) = plan_reads(signals, 1)

    assert (request.address, request.count) == (10, 2)
    assert_each_signal_whole_in_exactly_one_request(signals, [request])


def test_signal_inside_a_wider_one_does_not_shorten_the_request() -> None:
    signals = [sig(10, "float32"), sig(10, "int16"), sig(12, "uint16")]

    (request,) = plan_reads(signals, 1)

    assert (request.address, request.count) == (10, 3)
    assert_each_signal_whole_in_exactly_one_request(signals, [request])

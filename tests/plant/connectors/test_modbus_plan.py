"""plan_reads: every modelled address, no other address, within the per-request limits, in
the fewest requests (a property test against an exhaustive search)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.plant.connectors.modbus_plan import (
    READ_FUNCTIONS,
    ReadRequest,
    Window,
    cover,
    plan_reads,
)
from broker.policy import Signal, load
from broker.policy.schema import BIT_TABLES
from tests.harness import DEMO_POLICY


def demo_signals() -> list[Signal]:
    demo = load(DEMO_POLICY)
    return [s for s in demo.signals if s.device == demo.devices[0].name]  # not derived ones


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
        out[s.source.table] |= set(range(s.source.address, s.source.address + s.source.width))
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
            assert (s.source.unit_id or 1) == r.unit_id
            assert r.address + slot.offset == s.source.address
            assert slot.width == s.source.width
            assert slot.offset + slot.width <= r.count  # not split across requests
            seen.append(slot.signal)
    assert sorted(seen) == sorted(by_path)


def test_read_functions_are_exactly_the_four_read_codes() -> None:
    assert {code for code, _, _ in READ_FUNCTIONS.values()} == {1, 2, 3, 4}
    assert all(method.startswith("read_") for _, method, _ in READ_FUNCTIONS.values())


def test_demo_plan_reads_exactly_the_modelled_addresses_per_table() -> None:
    signals = demo_signals()

    requests = plan_reads(signals, 1)

    assert covered(requests) == modelled(signals)
    assert_each_signal_whole_in_exactly_one_request(signals, requests)


def test_demo_plan_uses_the_function_code_of_each_table() -> None:
    codes = {"coil": 1, "discrete_input": 2, "holding_register": 3, "input_register": 4}

    for request in plan_reads(demo_signals(), 1):
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


# Several unit ids behind one gateway


def unit_sig(address: int, unit_id: int | None, name: str) -> Signal:
    return msgspec.convert(
        {
            "path": f"site/asset/{name}",
            "device": "plc",
            "source": {"protocol": "modbus", "table": "holding_register", "address": address,
                       "type": "uint16", **({} if unit_id is None else {"unit_id": unit_id})},
        },
        Signal,
    )  # fmt: skip


def test_each_unit_id_gets_its_own_requests_even_for_adjacent_addresses() -> None:
    signals = [unit_sig(0, None, "a"), unit_sig(1, 2, "b"), unit_sig(2, None, "c")]

    requests = plan_reads(signals, default_unit_id=7)

    assert [(r.unit_id, r.address, r.count) for r in requests] == [(2, 1, 1), (7, 0, 1), (7, 2, 1)]


# Property: the plan is a minimum, against an exhaustive search


def optimum(spans: Sequence[tuple[int, int]], limit: int) -> int:
    """The fewest windows found by breadth-first search over every valid window.

    Independent of the planner: a valid window starts at some span's start, ends at some
    span's end, reads only modelled addresses and fits the limit; any other window can shrink
    to one of these without losing a span it holds whole.
    """
    modelled = {a for start, end in spans for a in range(start, end)}
    windows = {
        sum(1 << i for i, (a, b) in enumerate(spans) if s <= a and b <= e)
        for s, _ in spans
        for _, e in spans
        if s < e <= s + limit and all(a in modelled for a in range(s, e))
    }
    everything = (1 << len(spans)) - 1
    reached, frontier, steps = {0}, {0}, 0
    while everything not in reached:
        frontier = {held | w for held in frontier for w in windows} - reached
        assert frontier, "no plan exists"
        reached |= frontier
        steps += 1
    return steps


def check_windows(spans: Sequence[tuple[int, int]], limit: int, windows: Sequence[Window]) -> None:
    modelled = {a for start, end in spans for a in range(start, end)}
    read = set()
    for w in windows:
        assert 0 < w.end - w.start <= limit
        read |= set(range(w.start, w.end))
        for i in w.members:
            assert w.start <= spans[i][0] and spans[i][1] <= w.end  # whole, not split
    assert read == modelled  # every modelled address, and no other
    assert sorted(i for w in windows for i in w.members) == list(range(len(spans)))


@st.composite
def spans_and_limit(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    widths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=9))
    spans = [(draw(st.integers(0, 30)), w) for w in widths]
    limit = draw(st.integers(max(widths), 12))
    return [(start, start + width) for start, width in spans], limit


@settings(max_examples=400, deadline=None)
@given(spans_and_limit())
def test_cover_is_minimal_and_reads_exactly_the_modelled_addresses(
    case: tuple[list[tuple[int, int]], int],
) -> None:
    spans, limit = case

    windows = cover(spans, limit)

    check_windows(spans, limit, windows)
    assert len(windows) == optimum(spans, limit)


REGISTER_TYPES = ["int16", "uint16", "int32", "float32", "uint64", "float64", "string", "bool"]


@st.composite
def modbus_maps(draw: st.DrawFn) -> list[Signal]:
    """Small random maps over several unit ids and tables, with long strings near the
    125-register limit so that it binds."""
    signals = []
    for n in range(draw(st.integers(1, 10))):
        table = draw(st.sampled_from(sorted(READ_FUNCTIONS)))
        source: dict[str, object] = {"protocol": "modbus", "table": table,
                                     "address": draw(st.integers(0, 300))}  # fmt: skip
        if table in BIT_TABLES:
            source["type"] = "bool"
        else:
            source["type"] = draw(st.sampled_from(REGISTER_TYPES))
            if source["type"] == "string":
                source["length"] = draw(st.sampled_from([1, 40, 100, 124, 125]))
            if source["type"] == "bool":
                source["bit"] = draw(st.integers(0, 15))
        unit = draw(st.sampled_from([None, 1, 2]))
        if unit is not None:
            source["unit_id"] = unit
        signals.append(
            msgspec.convert({"path": f"site/asset/s{n}", "device": "plc", "source": source}, Signal)
        )
    return signals


@settings(max_examples=200, deadline=None)
@given(modbus_maps())
def test_plan_is_minimal_per_unit_and_table_and_reads_nothing_else(signals: list[Signal]) -> None:
    requests = plan_reads(signals, default_unit_id=1)

    assert_each_signal_whole_in_exactly_one_request(signals, requests)
    groups: dict[tuple[int, str], list[Signal]] = defaultdict(list)
    for s in signals:
        groups[s.source.unit_id or 1, s.source.table].append(s)
    for (unit, table), group in groups.items():
        mine = [r for r in requests if (r.unit_id, r.table) == (unit, table)]
        spans = [(s.source.address, s.source.address + s.source.width) for s in group]
        limit = READ_FUNCTIONS[table][2]
        assert all(r.count <= limit for r in mine)
        assert {a for r in mine for a in range(r.address, r.address + r.count)} == {
            a for start, end in spans for a in range(start, end)
        }
        assert len(mine) == optimum(spans, limit)

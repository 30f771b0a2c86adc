"""The static read plan of the DNP3 connector: exactly the named points, in range headers
over runs of adjacent indexes, never across a gap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.plant.connectors.dnp3_objects import Header
from broker.plant.connectors.dnp3_plan import HEADERS_PER_READ, static_reads
from broker.policy import Dnp3Source


def test_runs_of_adjacent_indexes_share_a_header_and_a_gap_splits_them() -> None:
    sources = [Dnp3Source(group=30, index=i, variation=5) for i in (0, 1, 2, 4, 300)]
    assert static_reads(sources) == [
        [Header(30, 5, 0x00, 0, 2), Header(30, 5, 0x00, 4, 4), Header(30, 5, 0x01, 300, 300)]
    ]


def test_a_point_named_in_two_variations_is_read_in_a_second_read() -> None:
    sources = [Dnp3Source(group=30, index=0), Dnp3Source(group=30, index=0, variation=5)]
    assert static_reads(sources) == [[Header(30, 0, 0x00, 0, 0)], [Header(30, 5, 0x00, 0, 0)]]


def test_a_read_carries_at_most_its_share_of_headers() -> None:
    sources = [Dnp3Source(group=1, index=2 * i) for i in range(HEADERS_PER_READ + 1)]
    reads = static_reads(sources)
    assert [len(read) for read in reads] == [HEADERS_PER_READ, 1]


@given(st.sets(st.tuples(st.sampled_from([1, 20, 30]), st.integers(0, 600)), max_size=60))
def test_the_plan_reads_every_named_point_once_per_variation_and_nothing_else(
    points: set[tuple[int, int]],
) -> None:
    sources = [Dnp3Source(group=g, index=i) for g, i in points]
    read = [
        (h.group, i) for r in static_reads(sources) for h in r for i in range(h.start, h.stop + 1)
    ]
    assert sorted(read) == sorted(points)

"""The READs of one static DNP3 scan, planned once when the policy loads (docs/dnp3.md).

Pure: no I/O. It must never plan a read of a point that no signal names, not even to
fill a gap between two runs of indexes (docs/specs/component.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Final

from broker.plant.connectors.dnp3_objects import Header, range_header
from broker.policy import Dnp3Source

HEADERS_PER_READ: Final = 32  # object headers of one READ (at most 227 bytes: one segment)


def static_reads(sources: Sequence[Dnp3Source]) -> list[list[Header]]:
    """The READs of one static scan: a range header per run of adjacent indexes of one group
    and variation (never bridging a gap: no point that no signal names is read), at most
    HEADERS_PER_READ to a READ. A point named in two variations is read in two READs: an
    outstation answers a point once per request (opendnp3 in the last variation asked)."""
    layers: list[list[tuple[int, int, int]]] = []
    seen: dict[tuple[int, int], int] = {}
    for group, variation, index in sorted({(s.group, s.variation, s.index) for s in sources}):
        layer = seen.get((group, index), 0)
        seen[group, index] = layer + 1
        if layer == len(layers):
            layers.append([])
        layers[layer].append((group, variation, index))
    reads = []
    for points in layers:
        headers = _runs(points)
        reads += [
            headers[i : i + HEADERS_PER_READ] for i in range(0, len(headers), HEADERS_PER_READ)
        ]
    return reads


def _runs(points: list[tuple[int, int, int]]) -> list[Header]:
    """Range headers over the runs of adjacent indexes in sorted (group, variation, index)."""
    headers = []
    for (group, variation), same in groupby(points, key=lambda p: p[:2]):
        indexes = [index for _, _, index in same]
        run_start = previous = indexes[0]
        for index in [*indexes[1:], None]:
            if index is not None and index == previous + 1:
                previous = index
                continue
            headers.append(range_header(group, variation, run_start, previous))
            if index is not None:
                run_start = previous = index
    return headers

"""QualityChecks' tallies: each signal's own, however they are stored."""

from __future__ import annotations

import msgspec

from broker.plant.quality import QualityChecks
from broker.policy import Signal


def ranged(path: str) -> Signal:
    return msgspec.convert(
        {
            "path": path,
            "device": "plc",
            "source": {"protocol": "modbus", "table": "input_register", "address": 0,
                       "type": "int16"},
            "range": {"min": 0, "max": 10},
        },
        Signal,
    )  # fmt: skip


def test_each_signal_tallies_its_own_failed_checks() -> None:
    checks = QualityChecks([ranged("a/hot"), ranged("a/cold"), ranged("a/fine")])
    for t, (path, value) in enumerate([("a/hot", 11), ("a/cold", -1), ("a/hot", 12)]):
        issues = checks.check(path, value, float(t))
        checks.tally(path, "uncertain", issues, float(t))
    checks.tally("a/fine", "good", checks.check("a/fine", 5, 3.0), 3.0)

    stats = checks.stats
    assert dict(stats["a/hot"].failed_checks) == {"out_of_range": 2}
    assert dict(stats["a/cold"].failed_checks) == {"out_of_range": 1}
    assert dict(stats["a/fine"].failed_checks) == {}
    assert stats["a/fine"].failed_checks["out_of_range"] == 0  # a Counter all the same
    assert (stats["a/hot"].samples, stats["a/fine"].by_quality) == (2, {"good": 1})

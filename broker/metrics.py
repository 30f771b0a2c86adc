"""Prometheus metrics of both halves, and how the plant half's reach `/metrics` one way.

The plant half opens no socket: it writes its metrics to `metrics-plant.prom` in the spool
directory (replaced atomically), and the enterprise half serves that file with its own
metrics at `/metrics` (issue 5 adds more). Metric names: `dmzbroker_<name>_<unit>_total`.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PLANT_FILE = "metrics-plant.prom"


class _Drops(Collector):
    """The gate's drop counts by reason, read when metrics are collected (not per sample)."""

    def __init__(self, dropped: Callable[[], Tally[str]]) -> None:
        self._dropped = dropped

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "dmzbroker_points_dropped", "Samples the gate did not let cross", labels=["reason"]
        )
        for reason, count in sorted(self._dropped().items()):
            family.add_metric([reason], count)
        yield family


class PlantMetrics:
    """Read from the plant half's own state when collected, so they never disagree with it."""

    def __init__(
        self,
        dropped: Callable[[], Tally[str]],
        island: Callable[[], bool],
        audit_failing: Callable[[], bool],
    ) -> None:
        self.registry = CollectorRegistry()
        self.records_written = Counter(
            "dmzbroker_records_written", "Records written to the spool", registry=self.registry
        )
        Gauge(
            "dmzbroker_plant_audit_failing",
            "1 while the plant half's audit log cannot be written (nothing crosses)",
            registry=self.registry,
        ).set_function(audit_failing)
        Gauge(
            "dmzbroker_island_mode",
            "1 while island mode stops all crossing",
            registry=self.registry,
        ).set_function(island)
        self.registry.register(_Drops(dropped))

    def write(self, spool_dir: Path) -> None:
        write_to_textfile(str(spool_dir / PLANT_FILE), self.registry)


class EnterpriseMetrics:
    def __init__(self, streams: Callable[[], int], audit_failing: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        self.records_received = Counter(
            "dmzbroker_records_received", "Records read from the spool", registry=self.registry
        )
        Gauge(
            "dmzbroker_enterprise_audit_failing",
            "1 while the enterprise half's audit log cannot be written (consumers refused)",
            registry=self.registry,
        ).set_function(audit_failing)
        Gauge(
            "dmzbroker_streams_open", "Open /v1/stream connections", registry=self.registry
        ).set_function(streams)

    def exposition(self, spool_dir: Path) -> bytes:
        """Our metrics, then the plant half's as it last wrote them."""
        try:
            plant = (spool_dir / PLANT_FILE).read_bytes()
        except OSError:
            plant = b""
        return generate_latest(self.registry) + plant

"""Prometheus metrics of both halves, and how the plant half's reach `/metrics` one way.

The plant half opens no socket: it writes its metrics to `metrics-plant.prom` in the spool
directory (replaced atomically), and the enterprise half serves that file with its own
metrics at `/metrics` (issue 5 adds more). Metric names: `dmzbroker_<name>_<unit>_total`.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PLANT_FILE = "metrics-plant.prom"
DIODE_FILE = "diode.prom"  # on an IT host behind a diode: broker.channel.udp_receiver writes it


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


class DeviceStats(Protocol):  # read only: a connector's counters, or its supervisor's view
    @property
    def scans(self) -> int: ...
    @property
    def overruns(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def last_scan_s(self) -> float: ...


class SignalStats(Protocol):
    @property
    def by_quality(self) -> Mapping[str, int]: ...
    @property
    def failed_checks(self) -> Mapping[str, int]: ...

    last_s: float | None  # when the last value was read, seconds since the epoch
    longest_gap_s: float


class _SignalQuality(Collector):
    """Each signal's values by quality, its failed data-quality checks, and how fresh and
    complete its values are (docs/model.md): completeness is the samples' rate against the
    device's poll interval, staleness the age of the last value."""

    def __init__(self, signals: Callable[[], dict[str, SignalStats]]) -> None:
        self._signals = signals

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        samples = CounterMetricFamily(
            "dmzbroker_signal_samples", "Values by quality", labels=["signal", "quality"]
        )
        age = GaugeMetricFamily(
            "dmzbroker_signal_value_age_seconds",
            "Since the last value was read",
            labels=["signal"],
        )
        gap = GaugeMetricFamily(
            "dmzbroker_signal_longest_gap_seconds",
            "Longest time between two values",
            labels=["signal"],
        )
        now = time.time()
        failed = CounterMetricFamily(
            "dmzbroker_signal_check_failures",
            "Failed data-quality checks",
            labels=["signal", "check"],
        )
        for path, stats in sorted(self._signals().items()):
            for quality, count in sorted(stats.by_quality.items()):
                samples.add_metric([path, quality], count)
            for check, count in sorted(stats.failed_checks.items()):
                failed.add_metric([path, check], count)
            if stats.last_s is not None:
                age.add_metric([path], max(0.0, now - stats.last_s))
                gap.add_metric([path], stats.longest_gap_s)
        yield from (samples, failed, age, gap)


class _Devices(Collector):
    """Each device's scan counters, read from its connector when metrics are collected."""

    def __init__(self, devices: Callable[[], dict[str, DeviceStats]]) -> None:
        self._devices = devices

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        scans = CounterMetricFamily("dmzbroker_device_scans", "Whole scans", labels=["device"])
        skipped = CounterMetricFamily(
            "dmzbroker_device_skipped_scans", "Scan slots skipped (overruns)", labels=["device"]
        )
        errors = CounterMetricFamily(
            "dmzbroker_device_errors", "Failed connections and reads", labels=["device"]
        )
        latency = GaugeMetricFamily(
            "dmzbroker_device_scan_seconds", "Duration of the last whole scan", labels=["device"]
        )
        for name, stats in sorted(self._devices().items()):
            scans.add_metric([name], stats.scans)
            skipped.add_metric([name], stats.overruns)
            errors.add_metric([name], stats.errors)
            latency.add_metric([name], stats.last_scan_s)
        yield from (scans, skipped, errors, latency)


class PlantMetrics:
    """Read from the plant half's own state when collected, so they never disagree with it."""

    def __init__(
        self,
        *,
        dropped: Callable[[], Tally[str]],
        island: Callable[[], bool],
        audit_failing: Callable[[], bool],
        devices: Callable[[], dict[str, DeviceStats]],
        written_seq: Callable[[], int],
        signals: Callable[[], dict[str, SignalStats]] = dict,
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
        Gauge(
            "dmzbroker_spool_written_seq", "seq of the last record written", registry=self.registry
        ).set_function(written_seq)
        self.registry.register(_Drops(dropped))
        self.registry.register(_Devices(devices))
        self.registry.register(_SignalQuality(signals))

    def write(self, spool_dir: Path) -> None:
        write_to_textfile(str(spool_dir / PLANT_FILE), self.registry)


class _DaysLeft(Collector):
    def __init__(self, certificates: Callable[[], dict[str, float]]) -> None:
        self._certificates = certificates

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "dmzbroker_certificate_days_left", "Days until a certificate ends", labels=["what"]
        )
        for what, days in sorted(self._certificates().items()):
            family.add_metric([what], days)
        yield family


class ConnectionCounts(Protocol):
    @property
    def open(self) -> int: ...
    @property
    def limited(self) -> Mapping[str, int]: ...
    @property
    def accept_errors(self) -> Mapping[str, int]: ...
    @property
    def http_errors(self) -> Mapping[str, int]: ...


_LIMITS = ("per_address", "overall", "evicted", "header_timeout")  # shown at 0 from the start
_OUT_OF_FILES = ("EMFILE", "ENFILE")  # this process's and the system's file table full
_HTTP_ERRORS = ("400", "500")  # a request that could not be parsed; a handler that failed


class _Connections(Collector):
    """The consumer listener's connections and limits (ADR 0014), read when collected."""

    def __init__(self, counts: Callable[[], ConnectionCounts | None]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counts = self._counts()
        if counts is None:
            return
        yield GaugeMetricFamily(
            "dmzbroker_connections_open", "Consumer connections open", value=counts.open
        )
        yield _by_label(
            "dmzbroker_connections_limited",
            "Consumer connections refused or closed by a limit",
            "reason", _LIMITS, counts.limited,
        )  # fmt: skip
        yield _by_label(
            "dmzbroker_accept_errors",
            "Failed accepts on the consumer port (EMFILE, ENFILE...), retried",
            "error", _OUT_OF_FILES, counts.accept_errors,
        )  # fmt: skip
        yield _by_label(
            "dmzbroker_http_errors",
            "Requests the HTTP layer answered with an error itself (400: malformed)",
            "status", _HTTP_ERRORS, counts.http_errors,
        )  # fmt: skip


def _by_label(
    name: str, help_text: str, label: str, known: Iterable[str], counts: Mapping[str, int]
) -> CounterMetricFamily:
    """A counter per label value: the `known` ones shown at 0 from the start (so a dashboard
    or an alert has a series before the first hit), and any other value that was counted."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value in sorted({*known, *counts}):
        family.add_metric([value], counts.get(value, 0))
    return family


class _AuditSuppressed(Collector):
    """Outsider-caused audit events counted instead of written (ADR 0015), by event."""

    def __init__(self, suppressed: Callable[[], Mapping[str, int]]) -> None:
        self._suppressed = suppressed

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "dmzbroker_audit_events_suppressed",
            "Audit events only counted into an events_suppressed entry",
            labels=["event"],
        )
        for event, count in sorted(self._suppressed().items()):
            family.add_metric([event], count)
        yield family


class EnterpriseMetrics:
    def __init__(
        self,
        streams: Callable[[], int],
        audit_failing: Callable[[], bool],
        read_seq: Callable[[], int] = lambda: 0,
        certificates: Callable[[], dict[str, float]] = dict,
        connections: Callable[[], ConnectionCounts | None] = lambda: None,
        *,
        audit_suppressed: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry()
        self.records_received = Counter(
            "dmzbroker_records_received", "Records read from the spool", registry=self.registry
        )
        self.spool_read_errors = Counter(
            "dmzbroker_spool_read_errors",
            "Failed reads of the spool or saves of the read position (EMFILE, EIO...), retried",
            ["error"],
            registry=self.registry,
        )
        for error in _OUT_OF_FILES:
            self.spool_read_errors.labels(error)
        # Each output (docs/specs/output.md) counts what it delivered; one that reads the
        # spool also shows its position (lag: dmzbroker_spool_written_seq minus this).
        self.output_records = Counter(
            "dmzbroker_output_records",
            "Records each output delivered (written, published, served as a value)",
            ["output"],
            registry=self.registry,
        )
        self.output_refused = Counter(
            "dmzbroker_output_refused",
            "Records an output left out for good: their destination refused their data",
            ["output"],
            registry=self.registry,
        )
        self.output_seq = Gauge(
            "dmzbroker_output_position_seq",
            "seq of the last record an output that reads the spool has delivered",
            ["output"],
            registry=self.registry,
        )
        self.registry.register(_Connections(connections))
        Gauge(
            "dmzbroker_enterprise_audit_failing",
            "1 while the enterprise half's audit log cannot be written (consumers refused)",
            registry=self.registry,
        ).set_function(audit_failing)
        Gauge(
            "dmzbroker_streams_open", "Open /v1/stream connections", registry=self.registry
        ).set_function(streams)
        Gauge(
            "dmzbroker_spool_read_seq",
            "seq of the last record read (lag: dmzbroker_spool_written_seq minus this)",
            registry=self.registry,
        ).set_function(read_seq)
        self.registry.register(_DaysLeft(certificates))
        self.registry.register(_AuditSuppressed(audit_suppressed))

    def exposition(self, spool_dir: Path) -> bytes:
        """Our metrics, then the plant half's and the diode receiver's as they last wrote
        them (each file only where it exists)."""
        written = b""
        for name in (PLANT_FILE, DIODE_FILE):
            with contextlib.suppress(OSError):
                written += (spool_dir / name).read_bytes()
        return generate_latest(self.registry) + written

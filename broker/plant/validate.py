"""`dmzbroker validate`: read the real devices for a while, publish nothing, judge each signal.

Runs the plant half's own connectors and pipeline on the verified policy, so a signal is
judged on exactly what the plant half would make of it (decoding, range, spike, flatline,
noise). The records are thrown away as they are made and only the pipeline's quality
tallies are kept: this never opens the spool, never writes to a device (the connectors are
read-only) and never records the policy as accepted. The thresholds are explained in
docs/model.md ("Validating proposed signals").
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import msgspec
import structlog

from broker.config import PlantConfig
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.registry import connectors_for
from broker.plant.maintenance import MaintenanceBook
from broker.plant.pipeline import PlantPipeline
from broker.plant.quality import SignalStats
from broker.policy import Device, OpcUaDevice, Policy, Signal
from broker.policy.schema import Lifecycle

MIN_COMPLETENESS_PCT = 95.0  # good samples of those the poll interval promises
MIN_GOOD_PCT = 95.0  # good samples of those that arrived
STALE_POLLS = 3  # a silence longer than this many poll intervals is stale
PROGRESS_EVERY_S = 10.0

log = structlog.get_logger("validate")

Verdict = Literal["fit", "not_fit"]


class Thresholds(msgspec.Struct, frozen=True, kw_only=True):
    min_completeness_pct: float = MIN_COMPLETENESS_PCT
    min_good_pct: float = MIN_GOOD_PCT
    stale_after_polls: int = STALE_POLLS


class SignalReport(msgspec.Struct, frozen=True, kw_only=True):
    """One signal's verdict; fields documented in docs/model.md."""

    signal: str
    lifecycle: Lifecycle
    device: str | None  # None for a derived signal
    samples: int
    expected_samples: int | None  # None where counting cannot judge it
    completeness_pct: float | None
    good: int
    uncertain: int
    bad: int
    failed_checks: dict[str, int]
    longest_gap_s: float | None  # None with fewer than two samples
    stale_after_s: float | None
    verdict: Verdict
    reasons: list[str]


class Report(msgspec.Struct, frozen=True, kw_only=True):
    policy_version: int
    requested_s: float
    observed_s: float
    complete: bool  # False when stopped (Ctrl-C) before the requested duration
    thresholds: Thresholds
    signals: list[SignalReport]
    promotable: list[str]  # proposed signals that are fit


def cadence_s(device: Device | None) -> float | None:
    """The interval a device's values arrive at, where counting them means something.

    A derived signal is computed only when its asset's inputs arrive, and an OPC UA
    subscription reports changes only (and none inside a deadband): neither has a cadence.
    A DNP3 device read by events and a BACnet device read by COV emit every signal at every
    poll (an unchanged one with its last value, confirmed by the poll): theirs is the poll's.
    """
    if device is None or (isinstance(device, OpcUaDevice) and device.read == "subscribe"):
        return None
    return device.poll_interval_s


def judge(
    signal: Signal, device: Device | None, stats: SignalStats, observed_s: float
) -> SignalReport:
    """The verdict on one signal's tallies over `observed_s` seconds of reading."""
    interval = cadence_s(device)
    good = stats.by_quality.get("good", 0)
    failed = dict(sorted(stats.failed_checks.items()))
    reasons: list[str] = []
    if stats.samples == 0:
        reasons.append(f"no samples in {observed_s:.1f} s")
    expected = completeness = stale_after = None
    if interval is not None:
        expected = max(1, int(observed_s // interval))
        completeness = round(min(100.0, good * 100 / expected), 1)
        stale_after = STALE_POLLS * interval
        if stats.samples and completeness < MIN_COMPLETENESS_PCT:
            reasons.append(
                f"completeness {completeness:.1f} % ({good} good of {expected} expected), "
                f"below {MIN_COMPLETENESS_PCT:g} %"
            )
    if stats.samples and (good_pct := good * 100 / stats.samples) < MIN_GOOD_PCT:
        why = ", ".join(f"{check} {n}" for check, n in failed.items())
        reasons.append(
            f"good {good_pct:.1f} % of samples, below {MIN_GOOD_PCT:g} %"
            + (f" ({why})" if why else "")
        )
    if out_of_range := failed.get("out_of_range"):
        reasons.append(f"out of range in {out_of_range} samples")
    gap = round(stats.longest_gap_s, 3) if stats.samples > 1 else None
    if stale_after is not None and gap is not None and gap > stale_after:
        reasons.append(
            f"longest gap {gap:g} s, above {stale_after:g} s ({STALE_POLLS} poll intervals)"
        )
    return SignalReport(
        signal=signal.path,
        lifecycle=signal.lifecycle,
        device=signal.device,
        samples=stats.samples,
        expected_samples=expected,
        completeness_pct=completeness,
        good=good,
        uncertain=stats.by_quality.get("uncertain", 0),
        bad=stats.by_quality.get("bad", 0) + stats.by_quality.get("stale", 0),
        failed_checks=failed,
        longest_gap_s=gap,
        stale_after_s=stale_after,
        verdict="not_fit" if reasons else "fit",
        reasons=reasons,
    )


class Validation:
    """The connectors and the pipeline of the plant half, with nothing behind the pipeline."""

    def __init__(self, policy: Policy, plant: PlantConfig) -> None:
        self._policy = policy
        self.pipeline = PlantPipeline(policy, MaintenanceBook(plant.maintenance))
        # Built before any reading, so a device the appliance config cannot serve (OPC UA
        # certificates, credentials) stops the command before it starts.
        self._connectors = connectors_for(policy, plant.opcua)
        self.samples = 0
        self.observed_s = 0.0
        self.complete = False  # True once the whole duration was read

    async def _take(self, samples: list[RawSample]) -> None:
        self.pipeline.process(samples)  # the records end here: validate publishes nothing
        self.samples += len(samples)

    async def observe(self, duration_s: float) -> None:
        """Read for `duration_s`; a cancellation stops it early with the tallies kept."""
        proposed = sum(s.lifecycle == "proposed" for s in self._policy.signals)
        log.info(
            "validation_started",
            duration_s=duration_s,
            signals=len(self._policy.signals),
            proposed=proposed,
            policy_version=self._policy.version,
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(duration_s), asyncio.TaskGroup() as tasks:
                for name, connector in self._connectors.items():
                    tasks.create_task(connector.run(self._take), name=f"connector {name}")
                tasks.create_task(self._progress(started, duration_s), name="progress")
        except TimeoutError:
            self.complete = True  # connectors never return: only the timeout ends it
        finally:
            self.observed_s = time.monotonic() - started

    async def _progress(self, started: float, duration_s: float) -> None:
        while True:  # ends with the observation's timeout or cancellation
            await asyncio.sleep(PROGRESS_EVERY_S)
            stats = self.pipeline.checks.stats.values()
            log.info(
                "validation_progressed",
                elapsed_s=round(time.monotonic() - started),
                duration_s=duration_s,
                samples=self.samples,
                bad=sum(s.by_quality.get("bad", 0) for s in stats),
                signals_seen=sum(s.samples > 0 for s in stats),
                signals=len(self._policy.signals),
            )

    def report(self, requested_s: float) -> Report:
        devices = {d.name: d for d in self._policy.devices}
        stats = self.pipeline.checks.stats
        signals = [
            judge(s, devices.get(s.device or ""), stats[s.path], self.observed_s)
            for s in self._policy.signals
        ]
        report = Report(
            policy_version=self._policy.version,
            requested_s=requested_s,
            observed_s=round(self.observed_s, 3),
            complete=self.complete,
            thresholds=Thresholds(),
            signals=signals,
            promotable=[
                s.signal for s in signals if s.lifecycle == "proposed" and s.verdict == "fit"
            ],
        )
        log.info(
            "validation_finished",
            observed_s=report.observed_s,
            complete=report.complete,
            promotable=len(report.promotable),
            not_fit=sum(s.verdict == "not_fit" for s in signals),
        )
        return report


_COLUMNS = ("SIGNAL", "LIFECYCLE", "SAMPLES", "COMPLETE", "GOOD/UNC/BAD", "GAP/STALE", "VERDICT")


def render(report: Report) -> str:
    """The report as a table for people, with the reasons below it."""
    rows = [_COLUMNS]
    for s in report.signals:
        completeness = "n/a" if s.completeness_pct is None else f"{s.completeness_pct:.1f} %"
        gap = "-" if s.longest_gap_s is None else f"{s.longest_gap_s:.1f}"
        stale = "n/a" if s.stale_after_s is None else f"{s.stale_after_s:g}"
        verdict = s.verdict if s.lifecycle == "proposed" else f"{s.verdict} (approved)"
        rows.append(
            (s.signal, s.lifecycle, str(s.samples), completeness,
             f"{s.good}/{s.uncertain}/{s.bad}", f"{gap}/{stale} s", verdict)
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        f"Read for {report.observed_s:.1f} s of {report.requested_s:g} s"
        + ("" if report.complete else " (stopped early)")
        + f", policy version {report.policy_version}.",
        "",
        *("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
          for row in rows),
    ]  # fmt: skip
    not_fit = [s for s in report.signals if s.reasons]
    if not_fit:
        lines += ["", "Not fit:"]
        lines += [f"  {s.signal}: {'; '.join(s.reasons)}" for s in not_fit]
    proposed = [s for s in report.signals if s.lifecycle == "proposed"]
    lines.append("")
    if not proposed:
        lines.append("No proposed signals in this policy.")
    else:
        promotable = ", ".join(report.promotable) or "none"
        lines.append(f"Fit to promote ({len(report.promotable)} of {len(proposed)}): {promotable}")
    return "\n".join(lines)

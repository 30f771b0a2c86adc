"""What a signer reads before signing: `policy show` and `policy diff`.

These read the payload of an envelope WITHOUT verifying it (that is `policy verify`'s job):
they show a person what they are about to sign, and say so. What the policy asks of a device
beyond its budget, or above the defaults, is a WARNING here (`budget.py`), never a refusal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from datetime import datetime
from pathlib import Path

from broker.policy import advice, budget, parse
from broker.policy import envelope as envelopes
from broker.policy.access import Access
from broker.policy.device_schema import BacnetDevice, Device, Dnp3Device, ModbusDevice, OpcUaDevice
from broker.policy.schema import (
    Asset,
    BacnetSource,
    Baseline,
    DerivedSource,
    Dnp3Source,
    OpcUaSource,
    Policy,
    Signal,
    written,
)

UNVERIFIED = "(contents shown as written; `dmzbroker policy verify` checks the signatures)"


def unverified(path: Path) -> tuple[Policy, str]:
    """For review commands only (`policy show|diff`, `plan`): the payload of the envelope at
    `path` parsed WITHOUT checking its signatures, and the payload's SHA-256."""
    payload = envelopes.read(path).untrusted_payload
    return parse.from_payload(payload, str(path)), hashlib.sha256(payload).hexdigest()


def _device(d: Device) -> str:
    timing = f"every {written(d.poll_interval_s)} s, timeout {written(d.timeout_s)} s"
    if isinstance(d, OpcUaDevice):
        pin = ", server pinned" if d.server_certificate_sha256 else ", server from the trust list"
        return (
            f"{d.name}: opcua {d.endpoint} {d.security_policy}/{d.security_mode}"
            f"{pin}, {d.user_identity} identity, {d.read}, {timing}"
        )
    if isinstance(d, Dnp3Device):
        return f"{d.name}: dnp3 {d.address} {_dnp3_reads(d)}, {timing}"
    if isinstance(d, BacnetDevice):
        rate = f"at most {written(d.max_requests_per_s)} requests/s"
        # a subscription is state the broker leaves on the device: the signer must see it
        reads = "poll" if d.read == "poll" else "cov (SubscribeCOV: subscribes on the device)"
        return f"{d.name}: bacnet {d.address} device {d.device_instance}, {reads}, {timing}, {rate}"
    return f"{d.name}: modbus {d.host}:{d.port} unit {d.unit_id}, {timing}, {budget.describe(d)}"


def _dnp3_reads(d: Dnp3Device) -> str:
    """What the master asks the outstation for, and what it accepts unasked."""
    link = f"master {d.master_address} → outstation {d.outstation_address}"
    if d.read == "static":
        return f"{link}, static reads of the named points"
    integrity = d.integrity_every_s
    classes = ", ".join(map(str, d.classes_polled))
    unsolicited = ", unsolicited accepted" if d.unsolicited else ", unsolicited ignored"
    # Confirming events deletes them from the outstation's buffer for this master address:
    # the signer must see that it has to be the broker's own (docs/dnp3.md).
    return (
        f"{link}, events of class {classes} confirmed (consumed for master {d.master_address}), "
        f"integrity poll every {written(integrity or 0)} s{unsolicited}"
    )


def _source(s: Signal) -> str:
    src = s.source
    if isinstance(src, DerivedSource):
        n = src.decimals
        to = f" to {n} decimal{'' if n == 1 else 's'}" if n is not None else ""
        return f"= {src.expression}{to}"
    if isinstance(src, OpcUaSource):
        return f"{s.device} {src.node}{_monitoring(src)}"
    if isinstance(src, Dnp3Source):
        return f"{s.device} g{src.group}v{src.variation} index {src.index} {src.type}"
    if isinstance(src, BacnetSource):
        return f"{s.device} {src.object_type},{src.instance} {src.property} {src.type}"
    unit = f" unit {src.unit_id}" if src.unit_id is not None else ""
    bit = f" bit {src.bit}" if src.bit is not None else ""
    bit += f" length {src.length}" if src.length is not None else ""
    order = (
        f" {src.word_order or 'big'}-word-first" if src.width > 1 and src.type != "string" else ""
    )
    order += " little-endian-bytes" if src.byte_order == "little" else ""
    return f"{s.device}{unit} {src.table} {src.address} {src.type}{bit}{order}"


def _monitoring(src: OpcUaSource) -> str:
    """What the server is asked for when it samples the node (a subscription only)."""
    shown = ""
    if src.sampling_interval_ms is not None:
        shown += f" sampled every {written(src.sampling_interval_ms)} ms"
    if src.queue_size != 1:
        shown += f" queue {src.queue_size}"
    if src.deadband is not None:
        percent = " %" if src.deadband.kind == "percent" else ""
        shown += f" deadband {src.deadband.kind} {written(src.deadband.value)}{percent}"
    return shown


def _signal(s: Signal) -> str:
    sign = "+" if s.offset > 0 else "-"
    scaling = (f" ×{written(s.scale)}" if s.scale != 1.0 else "") + (
        f" {sign}{written(abs(s.offset))}" if s.offset != 0.0 else ""
    )
    unit = f" [{s.unit}]" if s.unit else ""
    trial = " PROPOSED: read and validated, never published" if s.lifecycle == "proposed" else ""
    return f"{s.path}{unit} ← {_source(s)}{scaling}{trial}"


def _meaning(s: Signal) -> str:
    """What a signal means, as the model says: shown under it by `policy show`."""
    parts = [s.description or "(no description)"]
    if s.quantity:
        parts.append(s.quantity)
    if s.range is not None:
        parts.append(f"valid {written(s.range.min)} to {written(s.range.max)}")
    if s.outcomes:
        parts.append("bears on " + ", ".join(s.outcomes))
    checks = s.checks
    for name, limit in (
        ("flatline after", checks.flatline),
        ("spike above /s", checks.max_rate_per_s),
        ("noise above", checks.max_noise),
    ):
        if limit is not None:
            parts.append(f"{name} {limit if isinstance(limit, str) else written(limit)}")
    return "; ".join(parts)


def _asset(a: Asset) -> list[str]:
    lines = [
        f"  {a.path} ({a.type})" + (f": {a.description}" if a.description else ""),
        f"      trends over {a.trend_window}",
    ]
    if a.states:
        states = "; ".join(f"{rule.state} when {rule.when}" for rule in a.states)
        lines.append(f"      states: {states}; otherwise {a.otherwise}")
    if a.ambient:
        lines.append("      ambient: " + ", ".join(f"{n} = {p}" for n, p in a.ambient.items()))
    if a.load is not None:
        lines.append(f"      load: {a.load.signal} over {', '.join(a.load.windows)}")
    for b in a.baselines:
        axes = f"{b.ambient}" + (" and load" if b.load_points else "")
        only = f"; only when {', '.join(b.states)}" if b.states else ""
        lines.append(
            f"      baseline: {b.measure} by {axes}; {b.worse} is worse: drifting from "
            f"{written(b.drifting_pct)} %, abnormal from {written(b.abnormal_pct)} %{only}"
        )
        lines.extend(f"          {row}" for row in _expected(b))
    for r in a.rules:
        lines.append(f"      rule {r.name} ({r.severity}, {r.outcome}): when {r.when}")
        lines.append(f"          → {r.alert}; do: {r.action}")
    return lines


def _expected(b: Baseline) -> list[str]:
    """The baseline's table, point by point: the values the assessment compares against."""
    if not b.load_points:
        pairs = zip(b.ambient_points, b.expected, strict=True)
        return [
            f"expected by {b.ambient}: "
            + ", ".join(f"{written(x)} → {written(row[0])}" for x, row in pairs)
        ]
    return [
        f"expected at {b.ambient} {written(x)}, by load: "
        + ", ".join(
            f"{written(load)} → {written(v)}" for load, v in zip(b.load_points, row, strict=True)
        )
        for x, row in zip(b.ambient_points, b.expected, strict=True)
    ]


def warnings(policy: Policy, requests_per_scan: Mapping[str, int]) -> list[str]:
    """Every warning for the signers: each Modbus device's budget against its planned
    `requests_per_scan`, then what the policy may not mean (`advice.py`)."""
    return [
        *(
            warning
            for d in policy.devices
            if isinstance(d, ModbusDevice)
            for warning in budget.warnings(d, requests_per_scan.get(d.name, 0))
        ),
        *advice.warnings(policy),
    ]


def warning_lines(found: list[str]) -> list[str]:
    """A block of its own (after a blank line), or nothing at all when nothing is found."""
    if not found:
        return []
    return [
        "",
        f"WARNINGS for the OT and IT owners ({len(found)}): read them before signing",
        *(f"  WARNING: {warning}" for warning in found),
    ]


def show(policy: Policy, sha256: str, now: datetime, requests_per_scan: Mapping[str, int]) -> str:
    """What a signer reads; `requests_per_scan` is the planned count per Modbus device."""
    days = (policy.expires - now).total_seconds() / 86400
    found = warnings(policy, requests_per_scan)
    lines = [
        f"deployment  {policy.deployment_id}",
        f"version     {policy.version}",
        f"expires     {policy.expires.isoformat()} "
        + (f"(in {days:.0f} days)" if days >= 0 else "(EXPIRED)"),
        f"sha256      {sha256}",
        UNVERIFIED,
        *warning_lines(found),
        "",
        f"devices read ({len(policy.devices)}), with read-only services only:",
        *(f"  {_device(d)}" for d in policy.devices),
        "",
        f"signals of the semantic model ({len(policy.signals)}):",
        *(line for s in policy.signals for line in (f"  {_signal(s)}", f"      {_meaning(s)}")),
        "",
        f"assets ({len(policy.assets)}):",
        *(line for a in policy.assets for line in _asset(a)),
        "",
        "roles:",
        *(
            f"  {r.name}: {', '.join(r.signals) or '(no signals)'}"
            + ("; may read /metrics" if r.metrics else "")
            for r in policy.roles
        ),
        "",
        "consumers and what each may see:",
    ]
    access = Access(policy)
    for consumer in policy.consumers:
        visible = sorted(access.visible_to(consumer.identity))
        lines.append(
            f"  {consumer.identity} (roles: {', '.join(consumer.roles)}) — {len(visible)} signals"
        )
        lines.extend(f"      {path}" for path in visible)
    if not policy.consumers:
        lines.append("  (none: no enterprise consumer may see anything)")
    return "\n".join(lines)


def diff(old: Policy, new: Policy) -> str:
    """What `new` lets cross or lets someone see that `old` did not, and what it removes."""
    lines = [f"version {old.version} → {new.version}", UNVERIFIED]
    if old.deployment_id != new.deployment_id:
        lines.append(f"deployment_id {old.deployment_id} → {new.deployment_id}")
    if old.expires != new.expires:
        lines.append(f"expires {old.expires.isoformat()} → {new.expires.isoformat()}")

    old_devices = {d.name: _device(d) for d in old.devices}
    new_devices = {d.name: _device(d) for d in new.devices}
    old_signals = {s.path: _signal(s) for s in old.signals}
    new_signals = {s.path: _signal(s) for s in new.signals}
    old_views, new_views = Access(old).views(), Access(new).views()

    widened = [f"  {line}" for line in _widened(old, new, old_views, new_views)]
    old_trial = {s.path for s in old.signals if s.lifecycle == "proposed"}
    new_trial = {s.path for s in new.signals if s.lifecycle == "proposed"}
    removed = [
        f"  signal {p} back to proposed: no longer published"
        for p in sorted(new_trial - old_trial)
        if p in old_signals
    ]
    removed += [f"  - device {text}" for text in _only_in(old_devices, new_devices)]
    removed += [f"  - signal {text}" for text in _only_in(old_signals, new_signals)]
    for identity in sorted(old_views):
        lost = old_views[identity] - new_views.get(identity, frozenset())
        removed += [f"  {identity} may no longer see {path}" for path in sorted(lost)]
    changed = [
        f"  {kind} {name}: {before} → {after}"
        for kind, before_map, after_map in (
            ("device", old_devices, new_devices),
            ("signal", old_signals, new_signals),
        )
        for name, before in before_map.items()
        if (after := after_map.get(name)) is not None and after != before
    ]
    lines += ["", "WIDENS (new crossings or new visibility):", *(widened or ["  nothing"])]
    lines += ["", "NARROWS (removed):", *(removed or ["  nothing"])]
    lines += ["", "CHANGES:", *(changed or ["  nothing"])]
    old_modbus = {d.name: d for d in old.devices if isinstance(d, ModbusDevice)}
    raised = [
        warning
        for d in new.devices
        if isinstance(d, ModbusDevice) and d.name in old_modbus
        for warning in budget.raised_since(old_modbus[d.name], d, old.version)
    ]
    lines += warning_lines(raised)
    return "\n".join(lines)


WIDENING_LIMIT = 20  # lines kept in a `policy_accepted` entry; `policy diff` shows them all


def widening(old: Policy, new: Policy) -> list[str]:
    """What `new` newly lets cross or lets someone see, as `policy diff` says it, in at most
    WIDENING_LIMIT lines (the last one says how many more), for the `policy_accepted` entry."""
    found = _widened(old, new, Access(old).views(), Access(new).views())
    if len(found) <= WIDENING_LIMIT:
        return found
    more = len(found) - WIDENING_LIMIT + 1
    return [*found[: WIDENING_LIMIT - 1], f"… and {more} more (`dmzbroker policy diff` lists all)"]


def _widened(
    old: Policy,
    new: Policy,
    old_views: Mapping[str, frozenset[str]],
    new_views: Mapping[str, frozenset[str]],
) -> list[str]:
    """Devices and signals added, visibility gained per consumer, signals approved."""
    new_signals = {s.path: _signal(s) for s in new.signals}
    found = _only_in({d.name: _device(d) for d in new.devices}, {d.name for d in old.devices})
    found = [f"+ device {text}" for text in found]
    found += [f"+ signal {text}" for text in _only_in(new_signals, {s.path for s in old.signals})]
    for identity in sorted(new_views):
        gained = new_views[identity] - old_views.get(identity, frozenset())
        found += [f"{identity} may now see {path}" for path in sorted(gained)]
    old_trial = {s.path for s in old.signals if s.lifecycle == "proposed"}
    new_trial = {s.path for s in new.signals if s.lifecycle == "proposed"}
    found += [
        f"signal {p} approved: now published"
        for p in sorted(old_trial - new_trial)
        if p in new_signals
    ]
    return found


def _only_in(first: dict[str, str], second: Collection[str]) -> list[str]:
    return [text for name, text in first.items() if name not in second]

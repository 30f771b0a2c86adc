"""The draft policy `discover pcap` prints: one device per (protocol, server, unit) the capture
showed, one `lifecycle: proposed` signal per point the SCADA read (docs/discovery.md).

Used by the CLI only. It renders with `discovery_starter`, as `discover dnp3` does, so the
draft compiles as printed. What it promises, each checked by a test:
- A point the SCADA only wrote is never a signal: a comment in the header names it. A point
  it read and wrote is a signal marked as a setpoint; the broker never writes it.
- Modbus: each request `dmzbroker plan` derives from the draft lies inside one range the
  SCADA read (and polled: asked at least twice), and no device is polled more often than
  the SCADA polled it (`poll_interval_s` is the SCADA's interval rounded up). The planner
  joins spans that touch into one request, so where two of the SCADA's ranges touch or
  overlap, the first point of the later one is left out (a comment says so) rather than
  have the broker send a request the SCADA never sent.
- DNP3: a point the SCADA reads by range in one variation is read in that variation (a
  float stays a float); one it only class-polls, in the outstation's default (variation 0).
- The scale a guess suggests is a comment, never applied: it comes from how values look,
  and a wrong one would pass for a real reading once the signal is approved.
Text from the capture (BACnet names, the readers' evidence) reaches the YAML only as a
quoted value or a comment cut to one line: a device cannot write keys into the draft.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.passive.infer import Guess
from broker.passive.observations import UNKNOWN_UNIT, Peer, Protocol
from broker.passive.polls import Polled
from broker.plant.discovery_starter import EDIT, Listed, starter_policy
from broker.policy.fields import NAME
from broker.policy.schema import DNP3_VARIATIONS

# The tables the broker reads, per protocol, and the word a signal path gives each.
TABLE_WORDS: dict[str, dict[str, str]] = {
    "modbus": {"coil": "coil", "discrete_input": "di", "holding_register": "hr",
               "input_register": "ir"},
    "dnp3": {"1": "bi", "3": "dbi", "10": "bo", "20": "counter", "21": "frozen-counter",
             "30": "ai", "40": "ao"},
    "bacnet": {"analog-input": "ai", "analog-output": "ao", "analog-value": "av",
               "binary-input": "bi", "binary-output": "bo", "binary-value": "bv",
               "multi-state-input": "msi", "multi-state-output": "mso",
               "multi-state-value": "msv", "accumulator": "acc"},
}  # fmt: skip
UNIT_WORDS = {"modbus": "unit", "dnp3": "outstation", "bacnet": "device"}
DEFAULT_INTERVAL_S = 1.0  # when the capture shows nothing polled twice
MAX_INTERVAL_S = 86_400.0  # the policy's longest poll interval
BACNET_PLACEHOLDER_INSTANCE = 0  # the connector refuses a device that answers with another
WRITTEN = "\n  # written by the SCADA (a setpoint): read only, never written"  # a 2nd line
MAX_TEXT = 160  # characters of capture text kept in one comment or description
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # YAML reads \x85, \u2028/9 as breaks
_MASTER = re.compile(r"\(master (\d+)\)")  # how the DNP3 reader names the SCADA's address
_READ_AS = re.compile(r"READ g(\d+)v(\d+) ")  # how it names a range read's group and variation
_ADDRESS = re.compile(  # IPv6 (an IPv4-mapped tail too), else IPv4 (a port may follow)
    r"(?<![\w:.])(?:[0-9a-fA-F]{0,4}:){2,7}(?:[0-9a-fA-F]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:.])"
    r"|(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"
)  # a false match (a time written 12:30:45) only hides more than asked


class Hosts:
    """How an address is shown: as itself, or (--redact) as `host-N`, numbered in the order
    first asked for within the run. A pseudonym, not a hash: trying addresses finds nothing."""

    def __init__(self, redact: bool) -> None:
        self.redact = redact
        self._names: dict[str, str] = {}

    def __call__(self, host: str) -> str:
        if not self.redact:
            return host
        return self._names.setdefault(host, f"host-{len(self._names) + 1}")

    def peer(self, peer: Peer) -> str:
        return str(Peer(self(peer.host), peer.port))

    def text(self, text: str) -> str:
        """`text` with every IPv4 and IPv6 address in it shown as `__call__` shows it."""
        return _ADDRESS.sub(lambda m: self(m.group()), text) if self.redact else text


@dataclass(frozen=True)
class Point:
    """One guess as the draft holds it: a proposed signal, or a comment saying why not."""

    guess: Guess
    device: str
    path: str
    signal: dict[str, Any] | None  # None: not a signal (`comment` says why)
    comment: str  # the evidence for a signal; the reason for anything else
    interval_s: float | None  # the SCADA's shortest interval for it
    polled_by: tuple[str, ...]  # the pollers that read it (shown as `Hosts` shows them)


@dataclass
class Device:
    protocol: Protocol
    server: Peer
    unit: int
    name: str
    fields: dict[str, Any]  # as the policy's `devices` entry has it
    scada_interval_s: float | None
    notes: list[str] = field(default_factory=list)  # header comments about this device
    points: list[Point] = field(default_factory=list)


@dataclass(frozen=True)
class Draft:
    text: str | None  # the policy YAML; None when no point could be proposed
    devices: list[Device]  # the devices with at least one signal, in policy order
    points: list[Point]  # every point seen, in device and address order
    left_out: list[str]  # the header's lines about what is not a signal


def seconds(value: float) -> str:
    """An interval as the comments show it: 1.0, 0.5, 2.25."""
    shown = f"{value:.3g}"
    return shown if "." in shown or "e" in shown else shown + ".0"


def one_line(text: str) -> str:
    """Capture text fit for a comment: one line, bounded."""
    cleaned = _BREAKS.sub(" ", text).strip()
    return cleaned if len(cleaned) <= MAX_TEXT else cleaned[: MAX_TEXT - 1] + "…"


def draft(
    guesses: Sequence[Guess],
    polled: Sequence[Polled],
    interval_s: Callable[[Peer, int], float | None],
    *,
    site: str,
    hosts: Hosts,
    source: str,
) -> Draft:
    """The draft for what a capture showed: `interval_s` is `PollLog.interval_s`, `source`
    how the header names the capture."""
    reads = _reads(polled)
    devices = _devices(guesses, polled, interval_s, hosts)
    for guess in sorted(guesses, key=_point_order):
        device = devices[guess.protocol, guess.server, guess.unit]
        device.points.append(_point(guess, device, reads, site, hosts))
    with_signals = [d for d in devices.values() if any(p.signal for p in d.points)]
    points = [p for d in devices.values() for p in d.points]
    left_out = [
        f"# Not proposed: {p.device} {p.path.rpartition('/')[2]}: {p.comment}"
        for p in points
        if p.signal is None
    ] + [
        f"# Not proposed: device {d.name}: no point the SCADA read and the broker can read"
        for d in devices.values()
        if d not in with_signals
    ]
    if not with_signals:
        return Draft(None, [], points, left_out)
    signals = sum(1 for p in points if p.signal)
    header = [
        f"# Draft policy from the packet capture {source}: passive discovery, nothing was "
        "sent to the plant.",
        f"# {len(with_signals)} device(s), {signals} proposed signal(s) of {len(points)} "
        "point(s) seen. Every signal is `lifecycle: proposed`: read and validated, never "
        "published, until approved.",
        "# Modbus: every request `dmzbroker plan` shows is within one the SCADA sent, and no "
        "device is polled more often than the SCADA polled it.",
        "# A suggested scale is a comment, not applied: check it against the PLC program.",
        *[f"# Device {d.name}: {note}" for d in with_signals for note in d.notes],
        *left_out,
        *EDIT,
    ]
    first, *others = with_signals
    listed = [
        Listed(p.comment + (WRITTEN if p.guess.written else ""), p.signal)
        for d in with_signals
        for p in d.points
        if p.signal
    ]
    text = starter_policy(header, first.fields, listed, more_devices=[d.fields for d in others])
    return Draft(text, with_signals, points, left_out)


def _point_order(guess: Guess) -> tuple[str, Peer, int, str, int]:
    return (guess.protocol, guess.server, guess.unit, guess.table, guess.address)


Span = tuple[int, int]  # [start, end) of addresses


@dataclass(frozen=True)
class _Reads:
    """The SCADA's read requests, by (protocol, server, unit, table)."""

    polled: dict[tuple[str, Peer, int, str], list[Polled]]  # asked at least twice
    once: dict[tuple[str, Peer, int, str], list[Polled]]  # asked once
    segments: dict[tuple[str, Peer, int, str], list[Span]]  # Modbus: what the draft may read


def _reads(polled: Sequence[Polled]) -> _Reads:
    twice: dict[tuple[str, Peer, int, str], list[Polled]] = defaultdict(list)
    once: dict[tuple[str, Peer, int, str], list[Polled]] = defaultdict(list)
    for p in polled:
        if not p.write:
            key = (p.protocol, p.server, p.unit, p.table)
            (twice if p.interval_s is not None else once)[key].append(p)
    segments = {
        key: _segments([(p.start, p.start + p.count) for p in ranges])
        for key, ranges in twice.items()
        if key[0] == "modbus"
    }
    return _Reads(twice, once, segments)


def _segments(ranges: Sequence[Span]) -> list[Span]:
    """Parts of the SCADA's ranges with a gap between any two: the planner joins spans that
    touch into one request, and such a request would be one the SCADA never sent. Greedy by
    start, the longest first: a range inside another adds nothing; where two touch or
    overlap, the later one loses what comes before the first address past the gap."""
    kept: list[Span] = []
    for asked, end in sorted(set(ranges), key=lambda r: (r[0], -r[1])):
        start = max(asked, kept[-1][1] + 1) if kept else asked
        if start < end:
            kept.append((start, end))
    return kept


def _devices(
    guesses: Sequence[Guess],
    polled: Sequence[Polled],
    interval_s: Callable[[Peer, int], float | None],
    hosts: Hosts,
) -> dict[tuple[str, Peer, int], Device]:
    keys = sorted({(g.protocol, g.server, g.unit) for g in guesses})
    ports: dict[tuple[str, str], set[int]] = defaultdict(set)
    for protocol, server, _ in keys:
        ports[protocol, server.host].add(server.port)
    devices: dict[tuple[str, Peer, int], Device] = {}
    for i, (protocol, server, unit) in enumerate(keys, 1):
        host = hosts(server.host)
        words = [protocol, re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-")]
        if len(ports[protocol, server.host]) > 1:
            words.append(f"port-{server.port}")
        if unit != UNKNOWN_UNIT:
            words.append(f"{UNIT_WORDS[protocol]}-{unit}")
        name = "-".join(words)
        if not NAME.fullmatch(name):  # too long (an IPv6 address and a port)
            name = f"{protocol}-device-{i}"
        scada = interval_s(server, unit)
        device = Device(protocol, server, unit, name, {}, scada)
        device.fields = {"name": name, "protocol": protocol, "host": host, "port": server.port,
                         **_addressing(device, polled), "poll_interval_s": _interval(device)}  # fmt: skip
        devices[protocol, server, unit] = device
    return devices


def _interval(device: Device) -> float:
    """The SCADA's interval rounded up to 0.1 s: never below it."""
    if device.scada_interval_s is None:
        device.notes.append(
            f"poll_interval_s {DEFAULT_INTERVAL_S:g} is a default: the capture shows nothing "
            "of it polled twice, so not how often the SCADA reads it"
        )
        return DEFAULT_INTERVAL_S
    tenths = math.ceil(round(device.scada_interval_s * 10, 6))
    interval = min(max(tenths, 1) / 10, MAX_INTERVAL_S)
    device.notes.append(
        f"poll_interval_s {seconds(interval)}: the SCADA's {seconds(device.scada_interval_s)} s "
        "(its slowest range) rounded up to 0.1 s"
    )
    return interval


def _addressing(device: Device, polled: Sequence[Polled]) -> dict[str, Any]:
    """The device's protocol address keys, and notes where the capture could not say."""
    if device.protocol == "modbus":
        return {"unit_id": device.unit}
    if device.protocol == "bacnet":
        if device.unit != UNKNOWN_UNIT:
            return {"device_instance": device.unit}
        device.notes.append(
            f"device_instance {BACNET_PLACEHOLDER_INSTANCE} is a placeholder: the capture "
            "holds no I-Am from it; set the device's instance (the broker refuses a device "
            "that answers with another)"
        )
        return {"device_instance": BACNET_PLACEHOLDER_INSTANCE}
    seen = {
        int(m.group(1))
        for p in polled
        if (p.protocol, p.server, p.unit) == ("dnp3", device.server, device.unit)
        for m in [_MASTER.search(p.function)]
        if m
    }
    master = next(a for a in range(1, 65520) if a not in seen and a != device.unit)
    scada = f"the SCADA's is {', '.join(map(str, sorted(seen)))}" if seen else (
        "the capture does not show the SCADA's")  # fmt: skip
    device.notes.append(
        f"master_address {master} is one the capture never showed ({scada}): the broker must "
        "not share the SCADA's link address; configure the outstation to accept it"
    )
    return {"outstation_address": device.unit, "master_address": master}


def _point(guess: Guess, device: Device, reads: _Reads, site: str, hosts: Hosts) -> Point:
    key = (guess.protocol, guess.server, guess.unit, guess.table)
    word = TABLE_WORDS[guess.protocol].get(guess.table)
    path = f"{site}/{device.name}/{word or _word(guess.table)}-{guess.address}"
    end = guess.address + guess.width
    covering = [
        p for p in reads.polled.get(key, []) if p.start <= guess.address < p.start + p.count
    ]
    if guess.protocol == "dnp3":  # a class poll reads every point of the outstation
        covering += reads.polled.get((guess.protocol, guess.server, guess.unit, ""), [])
    intervals = [p.interval_s for p in covering if p.interval_s is not None]
    interval = min(intervals) if intervals else None
    by = tuple(sorted({hosts(p.client) for p in covering}))

    def not_proposed(reason: str) -> Point:
        return Point(guess, device.name, path, None, reason, interval, by)

    if word is None:
        return not_proposed(f"the broker does not read {guess.protocol} table {guess.table!r}")
    if guess.protocol == "modbus":
        inside = any(s <= guess.address and end <= e for s, e in reads.segments.get(key, []))
        if not inside:
            return not_proposed(_why_not_read(guess, covering, reads.once.get(key, [])))
    elif not covering and guess.written:
        return not_proposed(_why_not_read(guess, [], reads.once.get(key, [])))
    signal = {
        "path": path,
        "device": device.name,
        "source": _source(guess, covering),
        "unit": guess.units or "",
        "description": _description(guess, hosts),
        "lifecycle": "proposed",
    }
    comment = _evidence(guess, word, interval, by, hosts)
    return Point(guess, device.name, path, signal, comment, interval, by)


def _word(table: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", table.lower()).strip("-") or "point"


def _why_not_read(guess: Guess, covering: Sequence[Polled], once: Sequence[Polled]) -> str:
    if covering:
        return (
            "the SCADA reads it, but in a range that touches or overlaps another it reads: the "
            "broker would join the two into one request the SCADA never sent"
        )
    if any(p.start <= guess.address < p.start + p.count for p in once):
        return "read once in the capture, not polled: how often the SCADA reads it is unknown"
    if guess.written:
        return (
            "written by the SCADA, never read: a read of it would be a request the SCADA never sent"
        )
    return "not read by any request the capture holds"


def _source(guess: Guess, covering: Sequence[Polled]) -> dict[str, Any]:
    if guess.protocol == "dnp3":
        return {"group": int(guess.table), "index": guess.address,
                "variation": _variation(guess, covering)}  # fmt: skip
    if guess.protocol == "bacnet":
        return {"object_type": guess.table, "instance": guess.address}
    if guess.table in ("coil", "discrete_input"):
        return {"table": guess.table, "address": guess.address, "type": "bool"}
    source: dict[str, Any] = {"table": guess.table, "address": guess.address, "type": guess.type}
    if guess.type == "bool":  # a register only ever 0 or 1: its lowest bit
        source["bit"] = 0
    elif guess.width == 2:
        source["word_order"] = guess.word_order or "big"
    return source


def _variation(guess: Guess, covering: Sequence[Polled]) -> int:
    """The variation the SCADA's range reads of a DNP3 point asked for, when they all asked
    the same one: a value it reads as a float (g30v5) stays one (variation 0 may be an int32
    for the outstation). Else 0, the outstation's default, as a class poll gets it."""
    asked = {
        int(m.group(2))
        for p in covering
        if (m := _READ_AS.match(p.function)) and m.group(1) == guess.table  # not an event group
    }
    only = asked.pop() if len(asked) == 1 else 0
    return only if only in DNP3_VARIATIONS.get(int(guess.table), ()) else 0


def _description(guess: Guess, hosts: Hosts) -> str:
    named = [] if hosts.redact else [t for t in (guess.name, guess.description) if t]
    if named:
        return one_line(": ".join(dict.fromkeys(named)))
    return f"{guess.table.replace('_', ' ')} {guess.address}, {guess.kind}"


def _evidence(
    guess: Guess, word: str, interval: float | None, by: Sequence[str], hosts: Hosts
) -> str:
    """The comment above a signal: why this type, how often the SCADA reads it, by whom."""
    if hosts.redact:  # the readers' words may quote values: only what --redact keeps
        order = {"big": " BE", "little": " LE"}.get(guess.word_order or "", "")
        said = f"{guess.type}{order}, {guess.kind}, {guess.samples:,} samples"
    else:
        said = one_line(guess.evidence)
    parts = [said, f"confidence {guess.confidence:.0%}"]
    if interval is not None:
        parts.append(f"polled every {seconds(interval)} s by {', '.join(by)}")
    elif by:
        parts.append(f"read by {', '.join(by)}")
    if guess.scale is not None:
        parts.append(f"scale {guess.scale:g} suggested, not applied")
    if guess.changes_with:
        parts.append(f"changes with {', '.join(f'{word}-{a}' for a in guess.changes_with[:8])}")
    return ", ".join(parts)

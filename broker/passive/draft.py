"""The draft policy `discover pcap` prints: one device per (protocol, server, unit) the capture
showed, one `lifecycle: proposed` signal per point the SCADA read regularly (docs/discovery.md).

Used by the CLI only. It renders with `discovery_starter`, as `discover dnp3` does, so the
draft compiles as printed. What it promises, each checked by a test:
- A point the SCADA only wrote is never a signal: a comment in the header names it. A point
  it read and wrote is a signal marked as a setpoint; the broker never writes it.
- No point is read more often than the SCADA read it: a device's `poll_interval_s` is the
  slowest of its signals' SCADA intervals, rounded up. A device has one interval, so a range
  the SCADA read rarely (polls.RARE_FACTOR times less than the device's most-read one) is a
  comment, not a signal: drafted, it would slow every other signal of the device to its pace.
- Modbus: each request `dmzbroker plan` derives from the draft lies inside one range the
  SCADA read regularly (plannable.py decides, with the planner itself, which points of
  ranges that touch or overlap can stay).
- Modbus registers that never changed (spares, in a SCADA's 125-register blocks) are one
  header comment per run unless `include_constant`: they give no evidence of their type.
- DNP3: a point the SCADA reads by range in one variation is read in that variation (a
  float stays a float); one it only class-polls, in the outstation's default (variation 0).
- The scale a guess suggests is a comment, never applied: it comes from how values look,
  and a wrong one would pass for a real reading once the signal is approved.
Capture text reaches the YAML only through `shown.one_line`, as a quoted value or a comment.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.passive.infer import Guess
from broker.passive.observations import UNKNOWN_UNIT, Peer, Protocol
from broker.passive.polls import Envelope, Polled, envelopes
from broker.passive.selection import TABLE_WORDS, select
from broker.passive.shown import Hosts, one_line, seconds
from broker.plant.discovery_starter import EDIT, Listed, starter_policy
from broker.policy.fields import NAME
from broker.policy.schema import DNP3_VARIATIONS

UNIT_WORDS = {"modbus": "unit", "dnp3": "outstation", "bacnet": "device"}
DEFAULT_INTERVAL_S = 1.0  # when the capture shows nothing polled twice
MAX_INTERVAL_S = 86_400.0  # the policy's longest poll interval
BACNET_PLACEHOLDER_INSTANCE = 0  # the connector refuses a device that answers with another
WRITTEN = "\n  # written by the SCADA (a setpoint): read only, never written"  # a 2nd line
_MASTER = re.compile(r"\(master (\d+)\)")  # how the DNP3 reader names the SCADA's address
_READ_AS = re.compile(r"READ g(\d+)v(\d+) ")  # how it names a range read's group and variation


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
    draft_interval_s: float | None = None  # how often the draft reads it (a signal only)


@dataclass
class Device:
    protocol: Protocol
    server: Peer
    unit: int
    name: str
    fields: dict[str, Any]  # as the policy's `devices` entry has it
    scada_interval_s: float | None  # the slowest of its signals' SCADA intervals
    notes: list[str] = field(default_factory=list)  # header comments about this device
    points: list[Point] = field(default_factory=list)


@dataclass(frozen=True)
class _How:
    site: str  # a signal path's first word
    hosts: Hosts
    include_constant: bool  # propose Modbus registers that never changed too


@dataclass(frozen=True)
class Draft:
    text: str | None  # the policy YAML; None when no point could be proposed
    devices: list[Device]  # the devices with at least one signal, in policy order
    points: list[Point]  # every point seen, in device and address order
    left_out: list[str]  # the header's lines about what is not a signal


def draft(
    guesses: Sequence[Guess],
    polled: Sequence[Polled],
    *,
    site: str,
    hosts: Hosts,
    source: str,
    include_constant: bool = False,
) -> Draft:
    """The draft for what a capture showed (BACnet units already resolved: plain data);
    `source` is how the header names the capture."""
    envelope = envelopes(polled)
    by_device: dict[tuple[Protocol, Peer, int], list[Guess]] = defaultdict(list)
    for guess in sorted(guesses, key=_point_order):
        by_device[guess.protocol, guess.server, guess.unit].append(guess)
    ports: dict[tuple[str, str], set[int]] = defaultdict(set)  # several: the name says which
    for protocol, server, _ in by_device:
        ports[protocol, server.host].add(server.port)
    asked: dict[tuple[Protocol, Peer, int], list[Polled]] = defaultdict(list)
    for p in polled:
        asked[p.protocol, p.server, p.unit].append(p)
    how = _How(site, hosts, include_constant)
    devices = []
    for i, key in enumerate(sorted(by_device), 1):
        device = _device(key, i, len(ports[key[0], key[1].host]) > 1, asked[key], hosts)
        _points(device, by_device[key], envelope.get(key, Envelope((), (), (), 0)), how)
        devices.append(device)
    with_signals = [d for d in devices if any(p.signal for p in d.points)]
    points = [p for d in devices for p in d.points]
    left_out = _left_out(points) + [
        f"# Not proposed: device {d.name}: no point the SCADA read regularly and the broker "
        "can read"
        for d in devices
        if not any(p.signal for p in d.points)
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
        "# No point is read more often than the SCADA read it.",
        *(["# Modbus: every request `dmzbroker plan` shows is within one the SCADA sent."]
          if any(d.protocol == "modbus" for d in with_signals) else []),
        "# A suggested scale is a comment, not applied: check it against the PLC program.",
        *[f"# Device {d.name}: {note}" for d in with_signals for note in d.notes],
        *left_out,
        *EDIT,
    ]  # fmt: skip
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


def _device(
    key: tuple[Protocol, Peer, int], i: int, ports: bool, asked: Sequence[Polled], hosts: Hosts
) -> Device:
    """The device's entry (without its interval, which its signals decide); `ports`: the
    host serves this protocol on several ports; `asked`: what the pollers asked of it."""
    protocol, server, unit = key
    host = hosts(server.host)
    words = [protocol, re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-")]
    if ports:
        words.append(f"port-{server.port}")
    if unit != UNKNOWN_UNIT:
        words.append(f"{UNIT_WORDS[protocol]}-{unit}")
    name = "-".join(words)
    if not NAME.fullmatch(name):  # too long (an IPv6 address and a port)
        name = f"{protocol}-device-{i}"
    device = Device(protocol, server, unit, name, {}, None)
    device.fields = {"name": name, "protocol": protocol, "host": host, "port": server.port,
                     **_addressing(device, asked)}  # fmt: skip
    return device


def _addressing(device: Device, asked: Sequence[Polled]) -> dict[str, Any]:
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
    seen = {int(m.group(1)) for p in asked if (m := _MASTER.search(p.function))}
    master = next(a for a in range(1, 65520) if a not in seen and a != device.unit)
    scada = f"the SCADA's is {', '.join(map(str, sorted(seen)))}" if seen else (
        "the capture does not show the SCADA's")  # fmt: skip
    device.notes.append(
        f"master_address {master} is one the capture never showed ({scada}): the broker must "
        "not share the SCADA's link address; configure the outstation to accept it"
    )
    return {"outstation_address": device.unit, "master_address": master}


def _points(device: Device, guesses: Sequence[Guess], envelope: Envelope, how: _How) -> None:
    """Which of a device's points are signals, then its interval, then each point rendered."""
    seen = select(guesses, envelope, redact=how.hosts.redact,
                  include_constant=how.include_constant)  # fmt: skip
    intervals = [s.interval_s() for s in seen if s.reason is None]
    device.scada_interval_s = max((i for i in intervals if i is not None), default=None)
    drafted = device.fields["poll_interval_s"] = _interval(device)
    for s in seen:
        g, every = s.guess, s.interval_s()
        word = TABLE_WORDS[g.protocol].get(g.table)
        path = f"{how.site}/{device.name}/{word or _word(g.table)}-{g.address}"
        by = tuple(sorted({how.hosts(p.client) for p in s.covering}))
        if s.reason is not None or word is None:
            device.points.append(Point(g, device.name, path, None, s.reason or "", every, by))
            continue
        signal = {"path": path, "device": device.name, "source": _source(g, s.covering),
                  "unit": one_line(g.units or ""),
                  "description": _description(g, word, how.hosts), "lifecycle": "proposed"}  # fmt: skip
        comment = _evidence(g, word, by, how.hosts, scada=every, drafted=drafted)
        device.points.append(Point(g, device.name, path, signal, comment, every, by, drafted))


def _interval(device: Device) -> float:
    """The slowest of the device's signals' SCADA intervals rounded up to 0.1 s: no signal is
    read more often than the SCADA read it."""
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
        "(the slowest of its signals) rounded up to 0.1 s"
    )
    return interval


def _word(table: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", table.lower()).strip("-") or "point"


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


def _description(guess: Guess, word: str, hosts: Hosts) -> str:
    named = [] if hosts.redact else [t for t in (guess.name, guess.description) if t]
    if named:
        return one_line(": ".join(dict.fromkeys(named)))
    table = word if guess.protocol == "dnp3" else guess.table.replace("_", " ")  # not "30 0"
    return f"{table} {guess.address}, {guess.kind}"


def _evidence(
    guess: Guess, word: str, by: Sequence[str], hosts: Hosts, *, scada: float | None, drafted: float
) -> str:
    """The comment above a signal: why this type, how often the SCADA reads it, by whom, and
    how often the draft would."""
    if hosts.redact:  # the readers' words may quote values: only what --redact keeps
        order = {"big": " BE", "little": " LE"}.get(guess.word_order or "", "")
        said = f"{guess.type}{order}, {guess.kind}, {guess.samples:,} samples"
    else:
        said = one_line(guess.evidence)
    parts = [said, f"confidence {guess.confidence:.0%}"]
    if scada is not None:
        parts.append(f"polled every {seconds(scada)} s by {', '.join(by)}")
    elif by:
        parts.append(f"read by {', '.join(by)}")
    parts.append(f"the draft reads it every {seconds(drafted)} s")
    if guess.scale is not None:
        parts.append(f"scale {guess.scale:g} suggested, not applied")
    if guess.changes_with:
        parts.append(f"changes with {', '.join(f'{word}-{a}' for a in guess.changes_with[:8])}")
    return ", ".join(parts)


def _left_out(points: Sequence[Point]) -> list[str]:
    """A header line per run of points left out for the same reason (a SCADA's 125-register
    block of spares is one line: `hr-3..124`)."""
    lines: list[str] = []
    run: list[Point] = []
    for p in [p for p in points if p.signal is None] + [None]:
        last = run[-1] if run else None
        if (
            p is not None
            and last is not None
            and (p.device, p.guess.table, p.comment)
            == (last.device, last.guess.table, last.comment)
            and p.guess.address == last.guess.address + last.guess.width
        ):
            run.append(p)
            continue
        if run:
            where = run[0].path.rpartition("/")[2]
            if len(run) > 1:
                where += f"..{run[-1].guess.address}"
            lines.append(f"# Not proposed: {run[0].device} {where}: {run[0].comment}")
        run = [p] if p is not None else []
    return lines

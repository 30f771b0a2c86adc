"""What `discover pcap` reports besides the draft: the summary table, the warnings, and the
`--json` document (its keys are documented in docs/discovery.md and kept stable).

Everything shown passes through `Hosts`, so `--redact` holds for the table, the JSON and the
warnings alike: addresses become pseudonyms, and with `--redact` no observed value, BACnet
name or description is shown. Text a capture supplied is shown only through `one_line`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from broker.passive.draft import Draft, Point
from broker.passive.observations import Warnings
from broker.passive.polls import Polled
from broker.passive.shown import Hosts, one_line, seconds


def document(
    draft: Draft, polled: Sequence[Polled], warnings: Warnings, hosts: Hosts
) -> dict[str, Any]:
    """The `--json` document: {"draft", "devices", "signals", "polled", "warnings"}."""
    return {
        "draft": draft.text,
        "devices": [
            {
                "name": d.name,
                "protocol": d.protocol,
                "host": hosts(d.server.host),
                "port": d.server.port,
                "unit": d.unit,
                "poll_interval_s": d.fields["poll_interval_s"],
                "scada_interval_s": d.scada_interval_s,
                "signals": sum(1 for p in d.points if p.signal),
                "notes": d.notes,
            }
            for d in draft.devices
        ],
        "signals": [_point(p, hosts) for p in draft.points],
        "polled": [
            {
                "protocol": p.protocol,
                "client": hosts(p.client),
                "server": hosts.peer(p.server),
                "unit": p.unit,
                "table": p.table,
                "start": p.start,
                "count": p.count,
                "function": p.function,
                "requests": p.requests,
                "interval_s": p.interval_s,
                "write": p.write,
            }
            for p in polled
        ],
        "warnings": [
            {"kind": one_line(hosts.text(kind)), "count": n, "first": one_line(hosts.text(where))}
            for kind, n, where in warnings.items()
        ],
    }


def _point(point: Point, hosts: Hosts) -> dict[str, Any]:
    g = point.guess
    observed = not hosts.redact
    return {
        "device": point.device,
        "path": point.path,
        "proposed": point.signal is not None,
        "protocol": g.protocol,
        "server": hosts.peer(g.server),
        "unit": g.unit,
        "table": g.table,
        "address": g.address,
        "type": g.type,
        "word_order": g.word_order,
        "width": g.width,
        "kind": g.kind,
        "confidence": round(g.confidence, 3),
        "written": g.written,
        "scale": g.scale,
        "units": g.units,
        "samples": g.samples,
        "minimum": g.minimum if observed else None,
        "maximum": g.maximum if observed else None,
        "changes_with": list(g.changes_with),
        "interval_s": point.interval_s,
        "draft_interval_s": point.draft_interval_s,
        "polled_by": list(point.polled_by),
        "name": g.name if observed else None,
        "description": g.description if observed else None,
        "comment": point.comment,  # the evidence, or why the point is not a signal
    }


def table(draft: Draft) -> str:
    """One line per point seen: what the draft makes of it, how often the SCADA and the draft
    read it (nothing when no point was seen)."""
    if not draft.points:
        return ""
    rows = [("device", "point", "type", "kind", "conf", "scada", "draft", "by", "in draft")]
    for p in draft.points:
        g = p.guess
        order = {"big": " BE", "little": " LE"}.get(g.word_order or "", "")
        rows.append((
            p.device,
            p.path.rpartition("/")[2],
            g.type + order,
            g.kind + (" (written)" if g.written else ""),
            f"{g.confidence:.2f}",
            _every(p.interval_s),
            _every(p.draft_interval_s),
            ", ".join(p.polled_by) or "-",
            "signal" if p.signal else "comment",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return (
        "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )
        + "\n"
    )


def _every(interval: float | None) -> str:
    return "-" if interval is None else f"{seconds(interval)} s"


def warnings_text(warnings: Warnings, hosts: Hosts) -> str:
    """The warnings, one line per kind: how many, and where the first was."""
    if not len(warnings):
        return ""
    lines = [f"discover pcap: {len(warnings):,} warning(s) reading the capture:"]
    lines += [
        f"  {one_line(hosts.text(kind))}: {n:,} (first: {one_line(hosts.text(where))})"
        for kind, n, where in warnings.items()
    ]
    return "\n".join(lines) + "\n"

"""Inline SVG charts for the audit report: horizontal bars, and periods on a time axis.

Pure functions from numbers and labels to SVG text. Every label passes through `text()` (HTML
escaping, control and bidirectional characters shown as escapes), so a value an outsider chose
can never become markup. They never reference anything outside the page (no `xmlns` URL, no
link, no font, no script): the page must render offline with JavaScript off.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

WIDTH = 900  # px, the width of every chart
LABEL_W = 300  # px kept for the labels left of bars and lanes
ROW_H = 22  # px per bar or lane
LABEL_CHARS = 44  # a longer label is cut (its full text is the SVG <title>)

# C0/C1 controls, and the Unicode characters that reorder or hide text (Trojan Source).
_UNSEEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def text(value: object) -> str:
    """A value from the log as inert HTML text: escaped, with unseen characters made visible."""
    plain = _UNSEEN.sub(lambda m: f"\\u{ord(m.group()):04x}", "" if value is None else str(value))
    return html.escape(plain, quote=True)


def _cut(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def bars(rows: Sequence[tuple[str, int]], title: str) -> str:
    """One horizontal bar per (label, count), scaled to the largest count."""
    if not rows:
        return ""
    largest = max(count for _, count in rows) or 1
    height = ROW_H * len(rows) + 8
    span = WIDTH - LABEL_W - 90
    parts = [
        f'<svg class="chart" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{text(title)}" viewBox="0 0 {WIDTH} {height}">'
    ]
    for i, (label, count) in enumerate(rows):
        y = 4 + i * ROW_H
        length = max(1, round(span * count / largest))
        parts.append(
            f"<g><title>{text(label)}: {count:,}</title>"
            f'<text x="{LABEL_W - 6}" y="{y + 15}" text-anchor="end">{text(_cut(label))}</text>'
            f'<rect x="{LABEL_W}" y="{y + 3}" width="{length}" height="{ROW_H - 6}" class="bar"/>'
            f'<text x="{LABEL_W + length + 6}" y="{y + 15}">{count:,}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Span:
    lane: str  # e.g. "island · plant"
    start: datetime | None  # None: before the log's first entry (or unknown)
    end: datetime | None  # None: still going at the log's last entry
    kind: str  # CSS class: "island", "failure"


@dataclass(frozen=True)
class Mark:
    at: datetime
    label: str  # e.g. "v3"


def timeline(
    spans: Sequence[Span], marks: Sequence[Mark], first: datetime, last: datetime, title: str
) -> str:
    """Lanes of periods, and a lane of marks (policy versions), over [first, last]."""
    lanes = list(dict.fromkeys(span.lane for span in spans))
    rows = len(lanes) + (1 if marks else 0)
    if rows == 0:
        return ""
    height = ROW_H * rows + 34
    span_w = WIDTH - LABEL_W - 20
    total = max((last - first).total_seconds(), 1e-6)

    def x(moment: datetime | None, default: float) -> float:
        if moment is None:
            return default
        share = min(max((moment - first).total_seconds() / total, 0.0), 1.0)
        return round(LABEL_W + span_w * share, 1)

    parts = [
        f'<svg class="chart" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{text(title)}" viewBox="0 0 {WIDTH} {height}">'
    ]
    for i, lane in enumerate(lanes):
        y = 4 + i * ROW_H
        parts.append(
            f'<text x="{LABEL_W - 6}" y="{y + 15}" text-anchor="end">{text(_cut(lane))}</text>'
            f'<line x1="{LABEL_W}" x2="{LABEL_W + span_w}" y1="{y + 11}" y2="{y + 11}" '
            'class="lane"/>'
        )
        for s in (s for s in spans if s.lane == lane):
            left, right = x(s.start, LABEL_W), x(s.end, LABEL_W + span_w)
            start = "before the log" if s.start is None else s.start.isoformat()
            end = "still on at the end of the log" if s.end is None else s.end.isoformat()
            parts.append(
                f"<g><title>{text(lane)}: {text(start)} → {text(end)}</title>"
                f'<rect x="{left}" y="{y + 3}" width="{max(right - left, 2):.1f}" '
                f'height="{ROW_H - 6}" class="{text(s.kind)}"/></g>'
            )
    if marks:
        y = 4 + len(lanes) * ROW_H
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + 15}" text-anchor="end">policy</text>')
        for mark in marks:
            at = x(mark.at, LABEL_W)
            parts.append(
                f"<g><title>{text(mark.label)} at {text(mark.at.isoformat())}</title>"
                f'<circle cx="{at}" cy="{y + 11}" r="5" class="mark"/>'
                f'<text x="{at + 7}" y="{y + 15}">{text(_cut(mark.label))}</text></g>'
            )
    axis_y = height - 10
    parts.append(
        f'<text x="{LABEL_W}" y="{axis_y}">{text(first.isoformat())}</text>'
        f'<text x="{LABEL_W + span_w}" y="{axis_y}" text-anchor="end">'
        f"{text(last.isoformat())}</text></svg>"
    )
    return "".join(parts)

"""`dmzbroker audit report`: one self-contained HTML page for a security team's review.

The verdict per writer (broker.audit.verify), then what the log says (broker.audit.review):
policy versions with their signers and what each widened, trust root changes, denials by
consumer and by signal, TLS failures by reason, island and audit-failure periods, suppressed
events and chain breaks, with inline SVG charts (broker.audit.charts).

It must never put a value from the log into the page unescaped (every one goes through
`charts.text`), and never reference anything outside the page: no URL, no script, no font,
no image file. The page is read offline with JavaScript off; its Content-Security-Policy
(`default-src 'none'`) tells the browser to load and run nothing even if escaping failed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.audit.charts import Mark, Span, bars, text, timeline
from broker.audit.review import Review, Tally
from broker.audit.verify import WriterReport
from broker.errors import ConfigError

FIRST_ACCEPTED = "first accepted in this log (no previous policy known to compare with)"

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#1b1b1b}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0;width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,.h{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.intact{background:#d9f2d9}.window{background:#fff0c2}.broken{background:#f8d0d0}
.verdict{font-weight:bold}.note{color:#555}ul{margin:0;padding-left:18px}
svg.chart{display:block;margin:8px 0;font:12px system-ui,sans-serif}
svg .bar{fill:#4a78b5}svg .lane{stroke:#ddd}svg .island{fill:#d9932b}
svg .failure{fill:#c23b3b}svg .mark{fill:#2f6b2f}
"""


@dataclass(frozen=True)
class Verdict:
    writer: str
    css: str  # "intact", "window" or "broken"
    text: str  # as `audit verify` says it
    entries: int
    checkpoints: int
    witnesses: int
    notes: tuple[str, ...]


def verdict_of(report: WriterReport) -> Verdict:
    """`audit verify`'s answer for one writer, and which of the three kinds it is."""
    if report.problem is not None or report.unproven:
        css = "broken"
    elif report.window is not None:
        css = "window"
    else:
        css = "intact"
    notes = (
        *(b.describe() for b in report.breaks),
        *report.unproven[1:],  # the first is in the verdict
        *report.torn,
        *report.notes,
    )
    return Verdict(
        report.writer,
        css,
        report.verdict,
        report.entries,
        report.checkpoints,
        report.witnesses,
        notes,
    )


def render(
    directory: str,
    verdicts: Sequence[Verdict],
    review: Review,
    *,
    signatures_checked: bool,
    now: datetime | None = None,
) -> str:
    made = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    sections = [
        _verdicts(verdicts, signatures_checked),
        _policies(review),
        _trust(review),
        _denials(review),
        _tls(review),
        _periods(review),
        _suppressed(review),
        _breaks(review),
    ]
    span = f"{text(review.first)} to {text(review.last)}" if review.first else "no entries"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>dmzbroker audit report: {text(directory)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>dmzbroker audit report</h1><p>Audit directory <code>{text(directory)}</code>, "
        f"made {made}. Entries from {span}: {review.entries.total:,} entries read"
        + (f", {review.unreadable:,} lines that are not audit entries" if review.unreadable else "")
        + ".</p>"
        + "".join(sections)
        + '<h2>What this report does not prove</h2><p class="note">It reads the log as written; '
        "only the verdicts above say whether it was changed. Someone holding root on the "
        "appliance and the current audit key can still add new entries. Counts in "
        "<code>events_suppressed</code> summaries are counts, not entries: the events they "
        "counted were not written one by one.</p></body></html>\n"
    )


def _table(headings: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """`rows` hold cells already made inert (escaped) by the caller."""
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="note">{text(empty)}</p>'
    head = "".join(f"<th>{text(h)}</th>" for h in headings)
    return f"<table><tr>{head}</tr>{body}</table>"


def _td(value: object, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="n{" " + css if css else ""}">{value:,}</td>'
    return f"<td{cls}>{text(value)}</td>"


def _list(items: Sequence[object]) -> str:
    return "<td><ul>" + "".join(f"<li>{text(i)}</li>" for i in items) + "</ul></td>"


def _verdicts(verdicts: Sequence[Verdict], signatures_checked: bool) -> str:
    rows = [
        [
            _td(v.writer),
            _td(v.text, f"verdict {v.css}"),
            _td(v.entries),
            _td(v.checkpoints),
            _td(v.witnesses),
            _list(v.notes) if v.notes else _td(""),
        ]
        for v in verdicts
    ]
    worst = (
        "BROKEN or UNPROVEN"
        if any(v.css == "broken" for v in verdicts)
        else "INTACT, with entries not yet under a checkpoint"
        if any(v.css == "window" for v in verdicts)
        else "INTACT"
    )
    signed = (
        "Checkpoint signatures and the key chain were checked against the given public key."
        if signatures_checked
        else "Checkpoint signatures were NOT checked (no --pubkey): hashes and continuity only."
    )
    return (
        f'<h2>Verdict per writer</h2><p class="verdict">Overall: {text(worst)}</p>'
        f'<p class="note">{text(signed)}</p>'
        + _table(
            ("writer", "verdict", "entries", "checkpoints", "witnesses", "notes"),
            rows,
            "no writers",
        )
    )


def _policies(review: Review) -> str:
    versions = sorted(review.policies.values(), key=lambda p: p.first_time)
    marks = [m for p in versions if (m := _mark(p.first_time, f"v{p.version}")) is not None]
    rows = [
        [
            _td(p.version),
            _td(p.first_time),
            _td(", ".join(sorted(p.writers))),
            f'<td class="h">{text(p.sha256)}</td>',
            _list(p.signers),
            _list(p.widened or ["nothing"])
            if p.widened is not None
            else _td(FIRST_ACCEPTED, "note"),
        ]
        for p in versions
    ]
    return (
        "<h2>Policy versions</h2>"
        + _chart_over_time(review, [], marks, "policy versions over time")
        + _table(
            ("version", "first accepted", "by", "sha256", "signers", "widened"),
            rows,
            "no policy_accepted entry in this log",
        )
    )


def _trust(review: Review) -> str:
    rows = [
        [
            _td(n.time),
            _td(n.writer),
            _td(n.event),
            _td(n.details.get("version", n.details.get("kept_version"))),
            _td(n.details.get("sha256") or n.details.get("reason") or "", "h"),
            _list([str(s) for s in n.details.get("signers") or []] or [n.details.get("error", "")]),
        ]
        for n in review.trust
    ]
    return "<h2>Trust root changes</h2>" + _table(
        ("time", "writer", "event", "version", "sha256 / reason", "signers / error"),
        rows,
        "no trust_root_accepted or trust_root_refused entry in this log",
    )


def _denials(review: Review) -> str:
    consumers = Tally[str]()
    for source, count in review.denied_by_consumer.counts.items():
        consumers.add(source, count)
    for source, count in review.denied_suppressed.counts.items():
        consumers.add(source, count)
    top = consumers.top()
    rows = [
        [
            _td(source),
            _td(review.denied_by_consumer.counts.get(source, 0)),
            _td(review.denied_suppressed.counts.get(source, 0)),
            _td(total),
        ]
        for source, total in top
    ]
    by_signal = [
        [_td(obj), _td(event), _td(count)] for (event, obj), count in review.denied_by_signal.top()
    ]
    return (
        "<h2>Denials</h2><h3>By consumer (identity, certificate serial or address)</h3>"
        + bars([(source, total) for source, total in top], "denials by consumer")
        + _table(
            ("consumer", "entries", "counted in summaries", "total"),
            rows,
            "no consumer_denied entry in this log",
        )
        + _folded(review.denied_by_consumer, "consumers")
        + "<h3>By reason</h3>"
        + _table(
            ("reason", "entries"),
            ([_td(r), _td(c)] for r, c in review.denied_by_reason.top()),
            "none",
        )
        + "<h3>By signal or requested path</h3>"
        + _table(("signal or path", "event", "entries"), by_signal, "no denial in this log")
        + _folded(review.denied_by_signal, "signals or paths")
    )


def _tls(review: Review) -> str:
    top = review.tls_by_reason.top()
    counted = review.suppressed_by_event.counts.get("tls_handshake_failed", 0)
    note = (
        f'<p class="note">{counted:,} more were counted in events_suppressed summaries '
        "(their reasons are not recorded).</p>"
        if counted
        else ""
    )
    return (
        "<h2>TLS handshake failures by reason</h2>"
        + bars(top, "TLS handshake failures by reason")
        + _table(
            ("reason", "entries"),
            ([_td(r), _td(c)] for r, c in top),
            "no tls_handshake_failed entry in this log",
        )
        + note
    )


def _periods(review: Review) -> str:
    spans = [
        Span(f"{kind} · {p.writer}", _when(p.start), _when(p.end), _css(kind))
        for kind, periods in review.periods.items()
        for p in periods
    ]
    rows = [
        [
            _td(kind),
            _td(p.writer),
            _td(p.start or "before the oldest entry kept"),
            _td(p.end or "still on at the end of the log"),
            _td(p.detail),
        ]
        for kind, periods in review.periods.items()
        for p in periods
    ]
    more = (
        f'<p class="note">{review.dropped_periods:,} more periods not listed.</p>'
        if review.dropped_periods
        else ""
    )
    return (
        "<h2>Island mode and audit-failure periods</h2>"
        + _chart_over_time(review, spans, [], "island and audit-failure periods")
        + _table(
            ("period", "writer", "from", "to", "detail"),
            rows,
            "no island mode and no audit write failure in this log",
        )
        + more
    )


def _suppressed(review: Review) -> str:
    top = review.suppressed_by_event.top()
    reserve = (
        f" ({review.reserve_summaries:,} in the capacity reserve)"
        if review.reserve_summaries
        else ""
    )
    return (
        "<h2>Suppressed events</h2>"
        f'<p class="note">{review.summaries:,} events_suppressed summaries{reserve}, '
        f"{review.suppressed_by_event.total:,} events counted and not written one by one.</p>"
        + bars(top, "suppressed events by event")
        + _table(("event", "counted"), ([_td(e), _td(c)] for e, c in top), "nothing suppressed")
    )


def _breaks(review: Review) -> str:
    rows = [
        [
            _td(n.writer),
            _td(n.seq),
            _td(n.time),
            _td(n.details.get("reason", "")),
            _td(n.details.get("first_bad") or ""),
            _td(
                "{}..{}".format(*n.details["unadopted"])
                if isinstance(n.details.get("unadopted"), list) and len(n.details["unadopted"]) == 2
                else ""
            ),
            _td(f"seq {n.details.get('last_good_seq')} {n.details.get('last_good_hash')}"),
        ]
        for n in review.breaks
    ]
    more = (
        f'<p class="note">{review.dropped_notes:,} more entries not listed.</p>'
        if review.dropped_notes
        else ""
    )
    return (
        "<h2>Chain breaks</h2>"
        + _table(
            ("writer", "seq", "time", "reason", "first bad", "not adopted", "last good"),
            rows,
            "no audit_chain_break entry in this log",
        )
        + more
    )


def _folded(tally: Tally[Any], what: str) -> str:
    if not tally.folded_keys:
        return ""
    return (
        f'<p class="note">{tally.folded:,} more in {tally.folded_keys:,} other {text(what)} '
        "(too many distinct ones to count each).</p>"
    )


def _chart_over_time(review: Review, spans: list[Span], marks: list[Mark], title: str) -> str:
    first, last = _when(review.first), _when(review.last)
    if first is None or last is None or not (spans or marks):
        return ""
    return timeline(spans, marks, first, last, title)


def _mark(moment: str, label: str) -> Mark | None:
    at = _when(moment)
    return None if at is None else Mark(at, label)


def _when(moment: str | None) -> datetime | None:
    if moment is None:
        return None
    try:
        parsed = datetime.fromisoformat(moment)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _css(kind: str) -> str:
    return "island" if kind == "island" else "failure"


def write(path: Path, page: str) -> None:
    """Replace `path` with the page at once (a reader never sees half a report); mode 0640,
    as the audit log it summarises."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(page)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{path}: cannot write the report: {e.strerror}") from e

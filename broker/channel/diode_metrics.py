"""The diode's counters as Prometheus text files (neither end listens on a port).

The sender writes `diode-send.prom` in its state dir (a local textfile collector may read
it: nothing on the OT host serves metrics); the receiver writes `diode.prom` in the IT
host's spool dir, which the enterprise half appends to its `/metrics`. Read from the ends'
own counters when written, so they never disagree with them; never raises on a failed
write (the next one replaces it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.channel.sequence import Lost


def write(path: Path, collector: Collector) -> None:
    registry = CollectorRegistry()
    registry.register(collector)
    with contextlib.suppress(OSError):
        write_to_textfile(str(path), registry)


class SenderCounters(Protocol):
    sent: int
    records_sent: int
    resync_records: int
    resync_deferred: int
    last_record_seq: int

    @property
    def send_errors(self) -> Mapping[str, int]: ...


class ReceiverCounters(Protocol):
    received: int
    lost: int
    gaps: int
    sessions: int
    resync_written: int
    records_lost: int
    records_repeated: int
    seq_offset: int
    last_record_seq: int

    @property
    def refused(self) -> Mapping[str, int]: ...
    @property
    def recent(self) -> Sequence[Lost]: ...
    @property
    def link_up(self) -> bool: ...
    @property
    def duplicates(self) -> int: ...


# The metrics without labels: (family, name, help, the counters' attribute it reads).
_Unlabelled = tuple[type[CounterMetricFamily] | type[GaugeMetricFamily], str, str, str]
_Counter, _Gauge = CounterMetricFamily, GaugeMetricFamily
_SENDER: tuple[_Unlabelled, ...] = (
    (_Counter, "dmzbroker_diode_datagrams_sent", "Datagrams sent, copies included", "sent"),
    (_Counter, "dmzbroker_diode_records_sent", "Records sent (live)", "records_sent"),
    (_Counter, "dmzbroker_diode_resync_records_sent", "Records sent again", "resync_records"),
    (
        _Counter,
        "dmzbroker_diode_resync_rounds_deferred",
        "Resync rounds not started: the previous one was still being sent",
        "resync_deferred",
    ),
    (_Gauge, "dmzbroker_diode_sent_seq", "seq of the last record sent", "last_record_seq"),
)
_RECEIVER: tuple[_Unlabelled, ...] = (
    (
        _Counter,
        "dmzbroker_diode_datagrams_received",
        "Valid datagrams received, duplicates included",
        "received",
    ),
    (_Counter, "dmzbroker_diode_datagrams_lost", "Datagrams declared lost", "lost"),
    (_Counter, "dmzbroker_diode_gaps", "Lost datagram ranges", "gaps"),
    (
        _Counter,
        "dmzbroker_diode_records_lost",
        "Record seqs never written: lost datagrams, or a sender session's lost tail",
        "records_lost",
    ),
    (
        _Counter,
        "dmzbroker_diode_records_repeated",
        "Records at or below the IT spool's last seq, left out",
        "records_repeated",
    ),
    (_Counter, "dmzbroker_diode_datagrams_duplicate", "Duplicates dropped", "duplicates"),
    (_Counter, "dmzbroker_diode_sessions", "Sender sessions adopted", "sessions"),
    (
        _Counter,
        "dmzbroker_diode_resync_records_written",
        "Resync records newer than what was written, written as b'DR' frames",
        "resync_written",
    ),
    (_Gauge, "dmzbroker_diode_link_up", "1 while heartbeats arrive", "link_up"),
    (
        _Gauge,
        "dmzbroker_diode_announced_seq",
        "seq of the last record the sender announced in a heartbeat",
        "last_record_seq",
    ),
    (
        _Gauge,
        "dmzbroker_diode_seq_offset",
        "Added to the plant's record seqs since its spool was found behind the IT spool's",
        "seq_offset",
    ),
)


def _unlabelled(
    table: tuple[_Unlabelled, ...], counters: object
) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    for family, name, help_text, attribute in table:
        yield family(name, help_text, value=int(getattr(counters, attribute)))


class SenderStats(Collector):
    def __init__(self, sender: SenderCounters) -> None:
        self._s = sender

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield from _unlabelled(_SENDER, self._s)
        errors = CounterMetricFamily(
            "dmzbroker_diode_send_errors", "Datagrams the kernel refused", labels=["error"]
        )
        for reason, count in sorted(self._s.send_errors.items()):
            errors.add_metric([reason], count)
        yield errors


class ReceiverStats(Collector):
    def __init__(self, receiver: ReceiverCounters) -> None:
        self._r = receiver

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        r = self._r
        yield from _unlabelled(_RECEIVER, r)
        refused = CounterMetricFamily(
            "dmzbroker_diode_datagrams_refused", "Datagrams refused", labels=["reason"]
        )
        for reason in sorted({"crc", "magic", "oversized", "session", "seq_jump", *r.refused}):
            refused.add_metric([reason], r.refused.get(reason, 0))
        yield refused
        first = GaugeMetricFamily(
            "dmzbroker_diode_recent_gap_first", "First seq of a recent gap", labels=["slot"]
        )
        last = GaugeMetricFamily(
            "dmzbroker_diode_recent_gap_last", "Last seq of a recent gap", labels=["slot"]
        )
        for slot, gap in enumerate(reversed(r.recent)):  # slot 0: the newest
            first.add_metric([str(slot)], gap.first)
            last.add_metric([str(slot)], gap.last)
        yield from (first, last)

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


class SenderStats(Collector):
    def __init__(self, sender: SenderCounters) -> None:
        self._s = sender

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._s
        yield CounterMetricFamily(
            "dmzbroker_diode_datagrams_sent", "Datagrams sent, copies included", value=s.sent
        )
        yield CounterMetricFamily(
            "dmzbroker_diode_records_sent", "Records sent (live)", value=s.records_sent
        )
        yield CounterMetricFamily(
            "dmzbroker_diode_resync_records_sent", "Records sent again", value=s.resync_records
        )
        yield CounterMetricFamily(
            "dmzbroker_diode_resync_rounds_deferred",
            "Resync rounds not started: the previous one was still being sent",
            value=s.resync_deferred,
        )
        errors = CounterMetricFamily(
            "dmzbroker_diode_send_errors", "Datagrams the kernel refused", labels=["error"]
        )
        for reason, count in sorted(s.send_errors.items()):
            errors.add_metric([reason], count)
        yield errors
        yield GaugeMetricFamily(
            "dmzbroker_diode_sent_seq", "seq of the last record sent", value=s.last_record_seq
        )


class ReceiverStats(Collector):
    def __init__(self, receiver: ReceiverCounters) -> None:
        self._r = receiver

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        r = self._r
        yield CounterMetricFamily(
            "dmzbroker_diode_datagrams_received",
            "Valid datagrams received, duplicates included",
            value=r.received,
        )
        yield CounterMetricFamily(
            "dmzbroker_diode_datagrams_lost", "Datagrams declared lost", value=r.lost
        )
        yield CounterMetricFamily("dmzbroker_diode_gaps", "Lost datagram ranges", value=r.gaps)
        yield CounterMetricFamily(
            "dmzbroker_diode_records_lost",
            "Record seqs never written: lost datagrams, or a sender session's lost tail",
            value=r.records_lost,
        )
        yield CounterMetricFamily(
            "dmzbroker_diode_records_repeated",
            "Records at or below the IT spool's last seq, left out",
            value=r.records_repeated,
        )
        yield CounterMetricFamily(
            "dmzbroker_diode_datagrams_duplicate", "Duplicates dropped", value=r.duplicates
        )
        refused = CounterMetricFamily(
            "dmzbroker_diode_datagrams_refused", "Datagrams refused", labels=["reason"]
        )
        for reason in sorted({"crc", "magic", "oversized", "session", "seq_jump", *r.refused}):
            refused.add_metric([reason], r.refused.get(reason, 0))
        yield refused
        yield CounterMetricFamily(
            "dmzbroker_diode_sessions", "Sender sessions adopted", value=r.sessions
        )
        yield CounterMetricFamily(
            "dmzbroker_diode_resync_records_written",
            "Resync records newer than what was written, written as b'DR' frames",
            value=r.resync_written,
        )
        yield GaugeMetricFamily(
            "dmzbroker_diode_link_up", "1 while heartbeats arrive", value=int(r.link_up)
        )
        yield GaugeMetricFamily(
            "dmzbroker_diode_announced_seq",
            "seq of the last record the sender announced in a heartbeat",
            value=r.last_record_seq,
        )
        yield GaugeMetricFamily(
            "dmzbroker_diode_seq_offset",
            "Added to the plant's record seqs since its spool was found behind the IT spool's",
            value=r.seq_offset,
        )
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

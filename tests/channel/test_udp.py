"""The diode channel over real UDP on 127.0.0.1, through a lossy relay, with real spools.

The relay (below) stands where the hardware diode is: seeded, it drops, duplicates and
reorders datagrams and records exactly which datagram seqs it dropped, so the gaps the
receiver reports can be compared with the truth.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import structlog
import yaml
from structlog.testing import capture_logs

from broker import config as broker_config
from broker import policy
from broker.channel import datagrams as dg
from broker.channel.spool import SpoolReceiver, SpoolSender
from broker.channel.udp import SENDER_METRICS, DiodeSender
from broker.channel.udp_receiver import (
    AHEAD_BEATS,
    RECEIVER_METRICS,
    RECEIVER_STATE,
    DiodeReceiver,
)
from broker.channel.udp_socket import enlarge_receive_buffer
from broker.config import DiodeConfig, SpoolConfig
from broker.records import Context, Record
from broker.trust import tls
from tests.harness import (
    DEMO_POLICY,
    REPO,
    BrokerProcess,
    Owners,
    Pki,
    consumer_ssl,
    demo_policy,
    dmzbroker,
    eventually,
    free_port,
    get_json,
    sign_policy,
    stop_process,
    write_config,
)

SIGNALS = [f"site/area/asset-{i}/measure" for i in range(40)]
HEARTBEAT_S = 0.1


class Relay(asyncio.DatagramProtocol):
    """Forwards datagrams from the sender to the receiver; seeded loss, duplication and
    reordering; records every datagram seq it dropped and how many copies it forwarded."""

    def __init__(self, target: tuple[str, int], seed: int) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.drop = self.duplicate = self.reorder = 0.0
        self.blackout = False  # drop everything (not counted as a test drop)
        self.blacked: set[int] = set()  # seqs dropped by a blackout
        self.dropped: Counter[int] = Counter()  # seq -> copies dropped
        self.forwarded: Counter[int] = Counter()  # seq -> copies forwarded
        self._held: bytes | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        seq = dg.HEADER.unpack_from(data)[4]
        if self.blackout:
            self.blacked.add(seq)
            return
        if self.rng.random() < self.drop:
            self.dropped[seq] += 1
            return
        self.forwarded[seq] += 1
        if self.rng.random() < self.reorder and self._held is None:
            self._held = data  # goes after the next one
            return
        self._send(data)
        if self.rng.random() < self.duplicate:
            self._send(data)
        if self._held is not None:
            held, self._held = self._held, None
            self._send(held)

    def calm(self) -> None:
        """No more loss, duplication or reordering (whatever is held goes now)."""
        self.drop = self.duplicate = self.reorder = 0.0
        if self._held is not None:
            held, self._held = self._held, None
            self._send(held)

    def error_received(self, exc: Exception) -> None:  # the receiver is down: ICMP
        pass

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.target)

    def lost(self) -> set[int]:
        """Seqs of which no copy got through."""
        return {seq for seq in self.dropped if not self.forwarded[seq]}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def record(signal: str, value: float) -> Record:
    now = datetime.now(UTC)
    return Record(
        signal=signal, value=value, unit="bar", quality="good", source_time=now,
        broker_time=now, policy_version=1, context=Context(),
    )  # fmt: skip


def numbered(signal: str, value: float, seq: int) -> Record:
    r = record(signal, value)
    r.seq = seq
    return r


def spool_contents(directory: Path, tmp: Path) -> tuple[list[Record], list[Record], list[bytes]]:
    """Everything in a spool: records in order, resync records, checkpoint entries."""
    reader = SpoolReceiver(directory, tmp / "reader", reader=str(time.time_ns()))
    try:
        records: list[Record] = []
        resync: list[Record] = []
        checkpoints: list[bytes] = []
        for _ in range(1000):
            batch = reader.receive(resync=resync, checkpoints=checkpoints)
            if not batch:
                return records, resync, checkpoints
            records += batch
        raise AssertionError("the spool did not end")
    finally:
        reader.close()


@dataclass
class Link:
    """An OT spool, a sender, the relay, a receiver and its IT spool, in this event loop."""

    tmp: Path
    relay: Relay
    sender: DiodeSender
    receiver: DiodeReceiver
    ot_spool: SpoolConfig
    it_spool: SpoolConfig
    receiver_config: DiodeConfig
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    written: dict[str, Record] = field(default_factory=dict)  # OT side: latest per signal

    def write(self, rounds: int) -> int:
        """`rounds` records of every signal into the OT spool; the last seq."""
        plant = SpoolSender(self.ot_spool.dir, 1 << 20, 1 << 30)
        try:
            for r in range(rounds):
                batch = [record(s, r + i / 100) for i, s in enumerate(SIGNALS)]
                plant.send(batch)
                self.written.update((b.signal, b) for b in batch)
            return plant.next_seq - 1
        finally:
            plant.close()

    def start_receiver(self) -> None:
        self.receiver = DiodeReceiver(self.it_spool, self.receiver_config)
        self.tasks["receiver"] = asyncio.create_task(self.receiver.run())

    async def stop(self, name: str) -> None:
        task = self.tasks.pop(name)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    def it_records(self) -> tuple[list[Record], list[Record]]:
        """Everything in the IT spool: records in order, and resync records."""
        records, resync, _ = spool_contents(self.it_spool.dir, self.tmp)
        return records, resync

    def it_latest(self) -> dict[str, tuple[int, object]]:
        records, resync = self.it_records()
        latest: dict[str, Record] = {}
        for r in [*records, *resync]:
            if r.signal not in latest or r.seq > latest[r.signal].seq:
                latest[r.signal] = r
        return {s: (r.seq, r.value) for s, r in latest.items()}

    def ot_latest(self) -> dict[str, tuple[int, object]]:
        return {s: (r.seq, r.value) for s, r in self.written.items()}


@pytest.fixture
async def link(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Link]:
    options = getattr(request, "param", {})
    loop = asyncio.get_running_loop()
    receive_port = free_udp_port()
    relay = Relay(("127.0.0.1", receive_port), seed=options.get("seed", 14))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    enlarge_receive_buffer(
        sock
    )  # what the kernel dropped before the relay would be loss it did not count
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, sock=sock)
    relay_port = transport.get_extra_info("sockname")[1]
    common = {
        "heartbeat_s": HEARTBEAT_S,
        "heartbeat_alarm_after": 3,
        "resync_s": options.get("resync_s", 60.0),
        "copies": options.get("copies", 1),
        "datagram_bytes": 1400,
        "max_datagrams_s": options.get("max_datagrams_s", 4000),  # the relay keeps up
    }
    sender_config = DiodeConfig(
        host="127.0.0.1", port=relay_port, state_dir=tmp_path / "ot-diode", **common
    )
    receiver_config = DiodeConfig(
        host="127.0.0.1", port=receive_port, state_dir=tmp_path / "it-diode", **common
    )
    ot_spool = SpoolConfig(dir=tmp_path / "ot-spool", segment_mib=1, retention_mib=64)
    it_spool = SpoolConfig(dir=tmp_path / "it-spool", segment_mib=1, retention_mib=64)
    ot_spool.dir.mkdir()
    sender = DiodeSender(ot_spool, sender_config)
    receiver = DiodeReceiver(it_spool, receiver_config)
    link = Link(tmp_path, relay, sender, receiver, ot_spool, it_spool, receiver_config)
    link.tasks["receiver"] = asyncio.create_task(receiver.run())
    try:
        await eventually(lambda: receiver.listening, timeout=5)  # no datagram before it is
        link.tasks["sender"] = asyncio.create_task(sender.run())
        yield link
    finally:
        for task in link.tasks.values():
            task.cancel()
        await asyncio.gather(*link.tasks.values(), return_exceptions=True)
        transport.close()


def reported(logs: list[dict[str, Any]]) -> set[int]:
    """Every datagram seq the receiver's diode_gap_detected events declared lost."""
    lost: set[int] = set()
    for entry in logs:
        if entry["event"] == "diode_gap_detected":
            for first, last in entry["ranges"]:
                assert not lost & set(range(first, last + 1)), "a seq reported twice"
                lost |= set(range(first, last + 1))
    return lost


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    structlog.reset_defaults()  # a cached logger of an earlier test would not be captured
    with capture_logs() as captured:
        yield captured


async def sent_everything(link: Link, last_seq: int) -> None:
    await eventually(lambda: link.sender.last_record_seq == last_seq, timeout=15)
    await eventually(lambda: not link.sender._live, timeout=15)


@pytest.mark.parametrize("link", [{"resync_s": 1.0}], indirect=True)
async def test_gaps_reported_equal_the_drops_and_a_resync_converges(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    link.relay.drop, link.relay.duplicate, link.relay.reorder = 0.08, 0.05, 0.1
    await sent_everything(link, link.write(rounds=149))
    link.relay.drop = 1.0  # the last values of every signal are lost
    last_seq = link.write(rounds=1)
    await sent_everything(link, last_seq)
    link.relay.calm()  # heartbeats now reveal a loss at the end too
    drops = link.relay.lost()
    assert len(drops) > 10  # the test induced loss
    await eventually(lambda: reported(logs) == drops, timeout=10)
    assert link.receiver.lost == len(drops) and link.receiver.duplicates > 0

    records, _ = link.it_records()
    seqs = [r.seq for r in records]
    assert seqs == sorted(set(seqs)), "a record twice or out of order"
    assert 0 < len(seqs) < last_seq - len(SIGNALS) and max(seqs) <= last_seq - len(SIGNALS)
    # The resync fills the loss: the IT side's latest value of every signal is the OT side's.
    await eventually(lambda: link.it_latest() == link.ot_latest(), timeout=10)
    # The count follows the write: the receiver adds it once its spool write (in a thread)
    # returns, so the spool may show the last resync batch before the count does.
    await eventually(lambda: link.receiver.resync_written >= len(SIGNALS), timeout=10)
    metrics = (link.it_spool.dir / RECEIVER_METRICS).read_text()
    assert "dmzbroker_diode_datagrams_lost_total" in metrics
    assert 'dmzbroker_diode_recent_gap_first{slot="0"}' in metrics


@pytest.mark.parametrize("link", [{"copies": 2, "seed": 7}], indirect=True)
async def test_with_two_copies_only_seqs_whose_every_copy_dropped_are_lost(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    link.relay.drop = 0.2  # each copy independently
    last_seq = link.write(rounds=30)
    await sent_everything(link, last_seq)
    link.relay.calm()
    drops = link.relay.lost()
    assert drops and len(link.relay.dropped) > 3 * len(drops)  # most losses were covered
    await eventually(lambda: reported(logs) == drops, timeout=10)
    assert link.receiver.lost == len(drops)


async def test_duplicates_and_reordering_alone_lose_nothing(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    link.relay.duplicate, link.relay.reorder = 0.3, 0.3
    last_seq = link.write(rounds=20)
    await sent_everything(link, last_seq)
    await eventually(lambda: len(link.it_records()[0]) == last_seq, timeout=10)
    assert [r.seq for r in link.it_records()[0]] == list(range(1, last_seq + 1))
    assert reported(logs) == set() and link.receiver.lost == 0
    assert link.receiver.duplicates > 0


async def test_missing_heartbeats_raise_an_alarm_within_k_intervals_and_clear(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    await eventually(lambda: link.receiver.link_up, timeout=5)
    link.relay.blackout = True
    cut = time.monotonic()
    await eventually(lambda: not link.receiver.link_up, timeout=5)
    # 3 intervals of 0.1 s, checked every 10 ms; generous for a loaded machine
    assert time.monotonic() - cut < 3 * HEARTBEAT_S + 1.0
    assert any(e["event"] == "diode_heartbeat_missed" for e in logs)
    link.relay.blackout = False
    await eventually(lambda: link.receiver.link_up, timeout=5)
    assert any(e["event"] == "diode_link_restored" for e in logs)
    metrics = (link.it_spool.dir / RECEIVER_METRICS).read_text()
    assert "dmzbroker_diode_link_up" in metrics


async def test_a_receiver_restart_goes_unnoticed_by_the_sender(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    link.write(rounds=5)
    await eventually(lambda: link.receiver.received > 0, timeout=5)
    session = link.sender.session
    await link.stop("receiver")
    sent = link.sender.sent
    last_seq = link.write(rounds=5)  # sent while nobody listens
    await eventually(lambda: link.sender.sent > sent + 10, timeout=5)
    link.start_receiver()
    last_seq = link.write(rounds=5)
    await eventually(
        lambda: link.it_latest() and max(s for s, _ in link.it_latest().values()) == last_seq,
        timeout=10,
    )
    assert link.sender.session == session and not link.sender.send_errors
    assert link.receiver.lost > 0  # what was sent meanwhile, reported as a gap
    assert (link.sender._cfg.state_dir / SENDER_METRICS).exists()


async def test_a_restarted_sender_is_a_new_session_the_receiver_adopts_and_audits(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    link.write(rounds=3)
    await eventually(lambda: link.receiver.sessions == 1 and link.receiver.received > 3)
    first = link.sender.session
    await link.stop("sender")
    link.sender = DiodeSender(link.ot_spool, link.sender._cfg)  # resumes from its position
    link.tasks["sender"] = asyncio.create_task(link.sender.run())
    last_seq = link.write(rounds=3)
    await eventually(lambda: link.it_latest() == link.ot_latest(), timeout=10)
    adopted = [e for e in logs if e["event"] == "diode_session_adopted"]
    assert [e["previous"] for e in adopted] == [None, f"{first:016x}"]
    assert adopted[-1]["session"] == f"{link.sender.session:016x}" != f"{first:016x}"
    assert [r.seq for r in link.it_records()[0]] == list(range(1, last_seq + 1))


async def test_hostile_datagrams_are_counted_and_dropped(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    link.write(rounds=2)
    await eventually(lambda: link.receiver.received > 0, timeout=5)
    target = ("127.0.0.1", link.receiver_config.port)
    rng = random.Random(3)
    forged = record(SIGNALS[0], -1.0)
    forged.seq = 10**9
    hostile = [
        *(rng.randbytes(rng.randrange(0, 1400)) for _ in range(50)),  # random bytes
        dg.encode(dg.HEARTBEAT, link.sender.session, 5, bytes(16))[:-1] + b"\x01",  # bad CRC
        os.urandom(1400) * 0,
        rng.randbytes(60_000),  # oversized
        *dg.Framer(link.sender.session ^ 1, 1400).records([forged]),  # another session
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in hostile:
            s.sendto(data, target)
    await eventually(lambda: link.receiver.refused["session"] >= 1, timeout=5)
    refused = link.receiver.refused
    assert refused["oversized"] == 1 and refused["crc"] >= 1
    assert sum(refused.values()) == len(hostile)
    last_seq = link.write(rounds=2)  # and it goes on receiving
    await eventually(lambda: max(s for s, _ in link.it_latest().values()) == last_seq, timeout=5)
    assert all(r.value != -1.0 for r in link.it_records()[0])


@pytest.mark.parametrize("link", [{"max_datagrams_s": 300}], indirect=True)
async def test_a_slow_link_with_a_backlog_reports_no_false_gap(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    """Each datagram is numbered when it is sent: heartbeats never overtake queued data,
    so a backlog that takes seconds to drain is not mistaken for loss."""
    last_seq = link.write(rounds=60)  # about 300 datagrams: a second at 300/s
    await sent_everything(link, last_seq)
    await eventually(lambda: len(link.it_records()[0]) == last_seq, timeout=10)
    assert [r.seq for r in link.it_records()[0]] == list(range(1, last_seq + 1))
    assert link.receiver.lost == 0 and reported(logs) == set()
    assert link.receiver.duplicates == 0 and not link.relay.dropped


@pytest.mark.parametrize("link", [{"resync_s": 1.0}], indirect=True)
async def test_a_restarted_sender_resyncs_a_signal_lost_before_it_restarted(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    """Every signal's last update is lost, the sender commits its position and restarts;
    only one signal changes afterwards: the resync still brings every other one across."""
    link.relay.blackout = True
    last_seq = link.write(rounds=1)
    position = link.sender._cfg.state_dir / "spool-position-diode.json"
    await eventually(
        lambda: position.exists() and msgspec.json.decode(position.read_bytes())["seq"] == last_seq,
        timeout=10,
    )
    await link.stop("sender")
    link.relay.blackout = False
    link.sender = DiodeSender(link.ot_spool, link.sender._cfg)
    link.tasks["sender"] = asyncio.create_task(link.sender.run())
    plant = SpoolSender(link.ot_spool.dir, 1 << 20, 1 << 30)
    try:
        update = record(SIGNALS[0], 99.0)
        plant.send([update])
        link.written[update.signal] = update
    finally:
        plant.close()
    await eventually(lambda: link.it_latest() == link.ot_latest(), timeout=10)
    assert len(link.it_latest()) == len(SIGNALS)


@pytest.mark.parametrize("link", [{"resync_s": 1.0, "max_datagrams_s": 150}], indirect=True)
async def test_a_resync_round_never_starts_while_the_last_one_is_queued(link: Link) -> None:
    """2,500 signals at 150 datagrams/s: a round takes about 2 s, longer than resync_s;
    the queue stays at most one record per signal, and live data still crosses."""
    signals = [f"site/wide/asset-{i}/measure" for i in range(2500)]
    plant = SpoolSender(link.ot_spool.dir, 1 << 20, 1 << 30)
    try:
        plant.send([record(signal, 1.0) for signal in signals])
        last_seq = plant.next_seq - 1
    finally:
        plant.close()
    await eventually(lambda: link.sender.last_record_seq == last_seq, timeout=15)
    deadline = time.monotonic() + 2.0
    largest = 0
    while time.monotonic() < deadline:
        largest = max(largest, len(link.sender._resync))
        await asyncio.sleep(0.02)
    assert 0 < largest <= len(signals)
    assert link.sender.resync_deferred >= 1
    # Live data still crosses while rounds are being sent: it has at least half the rate.
    last_seq = link.write(rounds=1)
    await eventually(lambda: link.sender.last_record_seq == last_seq, timeout=5)


async def test_a_receiver_restart_after_an_idle_period_reports_no_false_gap(
    link: Link, logs: list[dict[str, Any]]
) -> None:
    """Only heartbeats come; the receiver restarts: the gap it reports is exactly what was
    sent while it was down, not what it had received before."""
    await eventually(lambda: link.receiver.received >= 5, timeout=5)
    link.relay.blackout = True
    highest = max(link.relay.forwarded)
    await eventually(lambda: link.receiver._order.highest >= highest, timeout=5)
    await link.stop("receiver")
    assert msgspec.json.decode((link.receiver_config.state_dir / RECEIVER_STATE).read_bytes())
    link.start_receiver()
    await eventually(lambda: link.receiver.listening, timeout=5)
    await eventually(lambda: len(link.relay.blacked) >= 2, timeout=5)
    link.relay.blackout = False
    await eventually(lambda: link.receiver.received >= 3, timeout=5)
    await eventually(lambda: reported(logs) == link.relay.blacked, timeout=5)
    assert link.receiver.lost == len(link.relay.blacked)


async def test_audit_checkpoints_cross_as_checkpoint_frames_fragmented_or_not(
    link: Link,
) -> None:
    small = b'{"event":"audit_checkpoint","seq":7}'
    large = b'{"event":"audit_checkpoint","pad":"' + b"x" * 5000 + b'"}'  # 4 datagrams
    plant = SpoolSender(link.ot_spool.dir, 1 << 20, 1 << 30)
    try:
        plant.send([record(SIGNALS[0], 1.0)], checkpoints=[small, large])
    finally:
        plant.close()

    def crossed() -> list[bytes]:
        return spool_contents(link.it_spool.dir, link.tmp)[2]

    await eventually(lambda: crossed() == [small, large], timeout=10)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[DiodeReceiver]:
    """A receiver fed by hand (`datagram_received`, `step`), no socket: sans-io cases."""
    config = DiodeConfig(
        host="127.0.0.1", port=free_udp_port(), state_dir=tmp_path / "it-diode",
        heartbeat_s=HEARTBEAT_S, max_datagrams_s=4000,
    )  # fmt: skip
    spool = SpoolConfig(dir=tmp_path / "it-spool", segment_mib=1, retention_mib=64)
    receiver = DiodeReceiver(spool, config)
    try:
        yield receiver
    finally:
        receiver._spool.close()


async def feed(receiver: DiodeReceiver, datagrams: list[bytes], later_s: float = 0.0) -> None:
    for data in datagrams:
        receiver.datagram_received(data, None)
    await receiver.step(time.monotonic() + later_s)


def it_seqs(receiver: DiodeReceiver, tmp: Path) -> list[int]:
    return [r.seq for r in spool_contents(receiver._spool_dir, tmp)[0]]


async def test_a_far_future_seq_is_refused_and_the_link_goes_on(
    receiver: DiodeReceiver, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    framer = dg.Framer(5, 1400)
    await feed(receiver, framer.records([numbered("s/a", 1.0, seq) for seq in range(1, 11)]))
    forged = dg.encode(dg.HEARTBEAT, 5, 2**63, bytes(16))  # a valid CRC, the current session
    await feed(receiver, [forged], later_s=1.0)
    assert receiver.refused["seq_jump"] == 1 and receiver.lost == 0
    await feed(receiver, framer.records([numbered("s/a", 2.0, seq) for seq in range(11, 61)]))
    assert it_seqs(receiver, tmp_path) == list(range(1, 61))
    assert receiver.lost == 0 and receiver.duplicates == 0 and reported(logs) == set()
    # A real outage: after 30 s of silence, a jump of 100,000 datagrams is plausible at
    # 4,000/s; it is one gap, reported exactly.
    receiver._advanced_at -= 30
    highest = framer.seq
    framer.seq += 100_000
    await feed(receiver, framer.records([numbered("s/a", 3.0, 61)]), later_s=1.0)
    assert reported(logs) == set(range(highest + 1, highest + 100_001))
    assert it_seqs(receiver, tmp_path)[-1] == 61


async def test_a_record_far_ahead_of_the_plant_does_not_block_the_it_spool(
    receiver: DiodeReceiver, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    framer = dg.Framer(6, 1400)
    await feed(receiver, framer.records([numbered("s/a", 1.0, 1), numbered("s/b", 1.0, 2)]))
    await feed(receiver, framer.records([numbered("s/a", -1.0, 2**62)]))  # past any bound
    assert receiver.refused["record_seq"] == 1
    # Within the bound (forged, or the plant's spool reset): what follows is left out,
    # counted, until the heartbeats have shown the IT spool ahead of the plant long enough.
    await feed(receiver, framer.records([numbered("s/a", -2.0, 1000)]))
    await feed(receiver, framer.records([numbered("s/a", 3.0, seq) for seq in range(3, 8)]))
    assert receiver.records_repeated == 5
    for _ in range(AHEAD_BEATS):
        await feed(receiver, [framer.heartbeat(7, 0)])
    realigned = [e for e in logs if e["event"] == "diode_seq_realigned"]
    assert [(e["it_last_seq"], e["announced_seq"], e["offset"]) for e in realigned] == [
        (1000, 7, 993)
    ]
    # The plant's 8.. follow, written above 1000: the IT spool's seq never goes back, so its
    # readers take them; the offset survives a restart.
    await feed(receiver, framer.records([numbered("s/a", 4.0, seq) for seq in range(8, 12)]))
    assert it_seqs(receiver, tmp_path) == [1, 2, 1000, 1001, 1002, 1003, 1004]
    state = msgspec.json.decode((receiver._cfg.state_dir / RECEIVER_STATE).read_bytes())
    assert state["offset"] == 993
    receiver._log_refused()
    assert any(e["event"] == "diode_records_repeated" and e["count"] == 5 for e in logs)


async def test_a_sender_sessions_lost_tail_is_reported_as_records_lost(
    receiver: DiodeReceiver, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Session A: records 1..50 arrive; 51..60 are lost but its heartbeat announcing 60
    arrives; 61..70 and every later heartbeat are lost; A stops. Session B resumes after
    70: the records lost are exactly 51..70, each reported once."""
    a = dg.Framer(1, 1400)
    await feed(receiver, a.records([numbered("s/a", 1.0, seq) for seq in range(1, 51)]))
    a.records([numbered("s/a", 1.0, seq) for seq in range(51, 61)])  # lost
    await feed(receiver, [a.heartbeat(60, 0)])
    a.records([numbered("s/a", 1.0, seq) for seq in range(61, 71)])  # lost, and A stops
    receiver._last_heard -= 10 * HEARTBEAT_S
    b = dg.Framer(2, 1400)
    await feed(
        receiver, b.records([numbered("s/a", 2.0, seq) for seq in range(71, 81)]), later_s=1.0
    )
    lost = [e for e in logs if e["event"] == "diode_records_lost"]
    ranges = [tuple(r) for e in lost for r in e["ranges"]]
    assert ranges == [(51, 60), (61, 70)] and receiver.records_lost == 20
    assert it_seqs(receiver, tmp_path) == [*range(1, 51), *range(71, 81)]
    metrics_file = receiver._spool_dir / RECEIVER_METRICS
    receiver._write_metrics()
    assert "dmzbroker_diode_records_lost_total 20.0" in metrics_file.read_text()


async def test_a_fast_sender_restart_with_a_backlog_loses_nothing(
    receiver: DiodeReceiver, tmp_path: Path
) -> None:
    """A new session sends 6,000 datagrams while the old one may still be talking (less
    than two heartbeats since it was heard): all are held, then adopted."""
    a = dg.Framer(1, 1400)
    await feed(receiver, a.records([numbered("s/a", 1.0, 1)]))
    b = dg.Framer(2, 1400)
    backlog = [b.heartbeat(1, n) for n in range(6000)]
    backlog += b.records([numbered("s/a", 2.0, seq) for seq in range(2, 12)])
    for data in backlog:
        receiver.datagram_received(data, None)
    assert receiver.refused["session"] == 0
    receiver._last_heard -= 10 * HEARTBEAT_S  # A is silent: B is a restarted sender
    await feed(receiver, [b.heartbeat(11, 6001)], later_s=1.0)
    assert receiver.refused["session"] == 0 and receiver.lost == 0
    assert it_seqs(receiver, tmp_path) == list(range(1, 12))


@pytest.mark.skipif(os.geteuid() != 0, reason="sniffing the loopback interface needs root")
async def test_not_one_packet_leaves_the_receivers_port(link: Link) -> None:
    from scapy.all import UDP, AsyncSniffer  # noqa: PLC0415 - only this test, as root

    port = link.receiver_config.port
    started = threading.Event()
    towards: list[Any] = []  # appended by the sniffer's thread as it processes packets
    back: list[Any] = []
    sniffer = AsyncSniffer(
        iface="lo",
        store=False,
        lfilter=lambda p: UDP in p and port in (p[UDP].sport, p[UDP].dport),
        prn=lambda p: (towards if p[UDP].dport == port else back).append(p),
        started_callback=started.set,
    )
    sniffer.start()
    try:
        await eventually(started.is_set, timeout=10)  # its socket is open: nothing missed
        received = link.receiver.received
        last_seq = link.write(rounds=10)
        await sent_everything(link, last_seq)
        await eventually(lambda: link.receiver.received > received + 20, timeout=5)
        # The capture has processed the traffic (a packet back would be among it).
        await eventually(lambda: len(towards) > 20, timeout=15)
    finally:
        sniffer.stop()
    assert back == []


def diode_process(end: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "broker", "diode", end, "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, start_new_session=True,
        )  # fmt: skip


def host_config(
    directory: Path, policy: Path, pki: Pki, owners: Owners, diode: dict[str, Any]
) -> Path:
    """One host's broker.yaml (write_config's), with a `diode:` section."""
    directory.mkdir()
    config = write_config(directory, policy, pki, free_port(), owners)
    document = yaml.safe_load(config.read_text())
    document["diode"] = {"state_dir": "diode-state", "heartbeat_s": HEARTBEAT_S, **diode}
    config.write_text(yaml.safe_dump(document))
    return config


async def test_end_to_end_plant_spool_to_a_consumer_across_the_diode_processes(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    """A spool on the OT host → `diode send` → the relay (loss, duplicates, reordering) →
    `diode receive` → the IT host's spool → the enterprise half → a consumer over mTLS."""
    policy_file = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key, owners.it_key])
    # Those the consumer is served: a `proposed` signal never crosses, so none is written.
    signals = [s.path for s in policy.load(DEMO_POLICY).signals if s.lifecycle != "proposed"]
    receive_port = free_udp_port()
    relay = Relay(("127.0.0.1", receive_port), seed=5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    enlarge_receive_buffer(sock)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: relay, sock=sock
    )
    relay_port = sock.getsockname()[1]
    ot = host_config(tmp_path / "ot", policy_file, pki, owners,
                     {"host": "127.0.0.1", "port": relay_port, "resync_s": 1.0,
                      "max_datagrams_s": 4000})  # fmt: skip
    it = host_config(tmp_path / "it", policy_file, pki, owners,
                     {"host": "127.0.0.1", "port": receive_port})  # fmt: skip
    it_cfg = broker_config.load(it)
    api_port = it_cfg.enterprise.listen.port
    processes: list[subprocess.Popen[bytes]] = []
    enterprise: BrokerProcess | None = None
    try:
        processes.append(diode_process("receive", it, tmp_path / "receive.log"))
        await eventually(lambda: "diode_receiving" in (tmp_path / "receive.log").read_text())
        processes.append(diode_process("send", ot, tmp_path / "send.log"))
        enterprise = BrokerProcess("enterprise", it, tmp_path / "enterprise.log")
        relay.drop, relay.duplicate, relay.reorder = 0.02, 0.05, 0.05
        plant = SpoolSender(tmp_path / "ot" / "spool", 1 << 20, 1 << 30)
        try:
            for round_ in range(30):
                plant.send([record(s, round_ + i / 100) for i, s in enumerate(signals)])
        finally:
            plant.close()
        await eventually(lambda: "diode_session_started" in (tmp_path / "send.log").read_text())
        relay.calm()  # a resync fills whatever was lost

        async def served() -> bool:
            try:
                status, body = await get_json(
                    f"https://localhost:{api_port}/v1/snapshot", consumer_ssl(pki)
                )
            except (aiohttp.ClientError, OSError):
                return False
            values = {r["signal"]: r["value"] for r in body["records"]} if status == 200 else {}
            return values == {s: 29 + i / 100 for i, s in enumerate(signals)}

        await eventually(served, timeout=20, interval=0.2)
        monitoring = tls.client_context(pki.ca, pki.monitoring_cert, pki.monitoring_key)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://localhost:{api_port}/metrics", ssl=monitoring) as response,
        ):
            metrics = await response.text()
        assert "dmzbroker_diode_link_up 1.0" in metrics
        assert "dmzbroker_diode_datagrams_lost_total" in metrics
        assert all(p.poll() is None for p in processes)
    finally:
        if enterprise is not None:
            enterprise.stop()
        for process in processes:
            stop_process(process)
        transport.close()
    assert all(p.returncode == 0 for p in processes)
    audit = (tmp_path / "it" / "audit" / "diode-receive").glob("*")
    assert any(b"diode_session_adopted" in f.read_bytes() for f in audit if f.is_file())


def test_without_a_diode_section_both_ends_refuse_to_start(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    config = write_config(tmp_path, tmp_path / "policy.dsse.json", pki, free_port(), owners)
    for end in ("send", "receive"):
        done = dmzbroker("diode", end, "--config", str(config), check=False)
        assert done.returncode == 2, done.stderr
        assert "no `diode:` section" in done.stderr and "Traceback" not in done.stderr


def test_the_commented_example_in_deploy_broker_yaml_parses() -> None:
    text = (REPO / "deploy" / "broker.yaml").read_text()
    start = text.index("# diode:")
    block = [line.removeprefix("# ") for line in text[start:].splitlines() if line.startswith("# ")]
    example = yaml.safe_load("\n".join(block))["diode"]
    parsed = msgspec.convert(example, DiodeConfig, dec_hook=lambda t, v: t(v))
    assert parsed.port == 7600 and parsed.copies == 1

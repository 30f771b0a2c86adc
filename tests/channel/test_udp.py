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
from broker.channel.udp import (
    RECEIVER_METRICS,
    SENDER_METRICS,
    DiodeReceiver,
    DiodeSender,
    enlarge_receive_buffer,
)
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
        self.dropped: Counter[int] = Counter()  # seq -> copies dropped
        self.forwarded: Counter[int] = Counter()  # seq -> copies forwarded
        self._held: bytes | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.blackout:
            return
        seq = dg.HEADER.unpack_from(data)[4]
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
        reader = SpoolReceiver(self.it_spool.dir, self.tmp / "reader", reader=str(time.time_ns()))
        try:
            records: list[Record] = []
            resync: list[Record] = []
            for _ in range(1000):
                batch = reader.receive(resync=resync)
                if not batch:
                    return records, resync
                records += batch
            raise AssertionError("the IT spool did not end")
        finally:
            reader.close()

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
        "max_datagrams_s": 4000,  # the relay, in this loop, keeps up with it
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
    assert link.receiver.resync_written >= len(SIGNALS)
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


@pytest.mark.skipif(os.geteuid() != 0, reason="sniffing the loopback interface needs root")
async def test_not_one_packet_leaves_the_receivers_port(link: Link) -> None:
    from scapy.all import UDP, AsyncSniffer  # noqa: PLC0415 - only this test, as root

    port = link.receiver_config.port
    sniffer = AsyncSniffer(
        iface="lo", store=True, lfilter=lambda p: UDP in p and port in (p[UDP].sport, p[UDP].dport)
    )
    sniffer.start()
    try:
        await asyncio.sleep(0.3)  # the sniffer's socket is open
        last_seq = link.write(rounds=10)
        await sent_everything(link, last_seq)
        await eventually(lambda: link.receiver.received > 20, timeout=5)
    finally:
        packets = sniffer.stop()
    towards = [p for p in packets if p[UDP].dport == port]
    back = [p for p in packets if p[UDP].sport == port]
    assert towards, "the capture saw the diode's traffic"
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

"""Audit entries reach a real syslog collector (rsyslog, RFC 5425 over mutual TLS), and a
collector outage loses nothing: every seq arrives at least once, in order per connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import structlog
import yaml

from broker.audit.export import IDLE_S, SiemExporter
from broker.audit.segments import read_entries, segment_numbers
from broker.sim.refrigeration import RefrigerationPlant
from broker.trust import tls
from tests.harness import BrokerProcess, Daemon, Deployment, Pki, dmzbroker, eventually, free_port

pytestmark = pytest.mark.timeout(180)

RSYSLOG_CONF = """
global(
  DefaultNetstreamDriver="ossl"
  DefaultNetstreamDriverCAFile="{pki}/ca.crt"
  DefaultNetstreamDriverCertFile="{pki}/collector.crt"
  DefaultNetstreamDriverKeyFile="{pki}/collector.key"
  workDirectory="{work}"
)
module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{received}" template="raw")
"""
ENTRY = re.compile(rb'writer="(\w+)" seq="(\d+)"')


@dataclass
class Collector(Daemon):
    """rsyslogd with the config in `directory`, writing what it receives to `received`."""

    directory: Path = Path()
    port: int = 0
    received: Path = Path()

    def seqs(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        if self.received.exists():
            for writer, seq in ENTRY.findall(self.received.read_bytes()):
                found.setdefault(writer.decode(), []).append(int(seq))
        return found


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    assert shutil.which("rsyslogd"), "rsyslogd is not installed: `make test` installs rsyslog"
    pki, work = tmp_path / "siem-pki", tmp_path / "siem-work"
    work.mkdir()
    dmzbroker("certs", "init-ca", "--out", str(pki), "--name", "SIEM CA")
    dmzbroker("certs", "issue", "server", "--ca", str(pki), "--out", str(pki), "--name", "collector",
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    dmzbroker("certs", "issue", "client", "--ca", str(pki), "--out", str(pki),
              "--uri", "spiffe://demo/audit-exporter")  # fmt: skip
    found = Collector(
        ["rsyslogd", "-n", "-f", str(tmp_path / "rsyslog.conf"), "-i", str(tmp_path / "rsyslog.pid")],
        directory=tmp_path, port=free_port(), received=tmp_path / "received.log",
    )  # fmt: skip
    (tmp_path / "rsyslog.conf").write_text(
        RSYSLOG_CONF.format(pki=pki, work=work, port=found.port, received=found.received)
    )
    found.start()
    try:
        yield found
    finally:
        found.stop()


def on_disk(audit_dir: Path) -> dict[str, int]:
    """The highest seq each writer has written."""
    last = {}
    for writer in sorted(p for p in audit_dir.iterdir() if p.is_dir()):
        seqs = [
            e["seq"]
            for n in segment_numbers(writer)
            for e in read_entries(writer / f"{n:010d}.jsonl")[0]
        ]
        last[writer.name] = max(seqs, default=0)
    return last


async def deny_once(deployment: Deployment, pki: Pki) -> None:
    """A request by a consumer the policy does not name: one `consumer_denied` entry."""
    context = tls.client_context(pki.ca, pki.stranger_cert, pki.stranger_key)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(deployment.base_url + "/v1/snapshot", ssl=context) as response,
        ):
            await response.read()
    except aiohttp.ClientConnectionError:
        pass


async def test_every_entry_reaches_the_collector_at_least_once_across_an_outage(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, collector: Collector,
    start_broker,
) -> None:  # fmt: skip
    siem_config(deployment, collector)
    broker: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: "enterprise" in collector.seqs(), timeout=30)

    # One identity's first 10 denials a minute are written in full, the rest counted (ADR
    # 0015): 7 of its budget are left for the outage.
    for _ in range(3):
        await deny_once(deployment, pki)
    collector.stop()  # the collector goes away mid-stream
    before_outage = on_disk(deployment.directory / "audit")["enterprise"]
    outage_ends = time.monotonic() + 4
    while time.monotonic() < outage_ends:
        await deny_once(deployment, pki)
    during_outage = on_disk(deployment.directory / "audit")["enterprise"] - before_outage
    collector.start()
    for _ in range(3):
        await deny_once(deployment, pki)

    written = on_disk(deployment.directory / "audit")

    def all_arrived() -> bool:
        got = collector.seqs()
        return all(set(range(1, last + 1)) <= set(got.get(w, [])) for w, last in written.items())

    await eventually(all_arrived, timeout=40)
    got = collector.seqs()
    assert during_outage >= 7  # the denials really were audited while it was away
    assert "plant" in got  # the plant half's log crosses through the enterprise half
    assert broker.stop() == 0


def siem_config(deployment: Deployment, collector: Collector, **audit: object) -> None:
    """Point the deployment's audit export at the collector (and set other audit keys)."""
    pki_dir = collector.directory / "siem-pki"
    document = yaml.safe_load(deployment.config.read_text())
    document["audit"]["siem"] = {
        "host": "127.0.0.1", "port": collector.port, "server_name": "localhost",
        "ca": str(pki_dir / "ca.crt"), "cert": str(pki_dir / "audit-exporter.crt"),
        "key": str(pki_dir / "audit-exporter.key"),
    }  # fmt: skip
    document["audit"].update(audit)
    deployment.config.write_text(yaml.safe_dump(document))


def received_checkpoints(collector: Collector, arrived: dict[tuple[str, int], float]) -> None:
    """Note the wall-clock time each checkpoint entry is first seen in the collector's file."""
    if not collector.received.exists():
        return
    now = time.time()
    for line in collector.received.read_bytes().splitlines():
        start = line.find(b"{")
        try:
            entry = json.loads(line[start:]) if start >= 0 else None
        except ValueError:
            continue  # a line rsyslog is still writing
        if isinstance(entry, dict) and entry.get("event") == "audit_checkpoint":
            arrived.setdefault((entry["writer"], entry["seq"]), now)


def plant_notices(audit_dir: Path, event: str, since: float) -> float:
    """The seq of the plant's latest `event` entry made after `since` (epoch seconds); inf
    when there is none yet."""
    folder = audit_dir / "plant"
    found = -1
    for n in segment_numbers(folder) if folder.is_dir() else []:
        for e in read_entries(folder / f"{n:010d}.jsonl")[0]:
            at = datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            if e["event"] == event and at.timestamp() > since:
                found = max(found, e["seq"])
    return float("inf") if found < 0 else found


def checkpoints_made(audit_dir: Path, since: float) -> dict[tuple[str, int], float]:
    """Every writer's checkpoints made after `since` (epoch seconds), with when."""
    made = {}
    for folder in (p for p in audit_dir.iterdir() if p.is_dir()):
        for n in segment_numbers(folder):
            for e in read_entries(folder / f"{n:010d}.jsonl")[0]:
                at = datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                if e["event"] == "audit_checkpoint" and at.timestamp() > since:
                    made[(e["writer"], e["seq"])] = at.timestamp()
    return made


async def test_each_writers_checkpoints_reach_the_collector_within_seconds_of_being_made(
    deployment: Deployment, collector: Collector, start_broker
) -> None:  # fmt: skip
    """Checkpoints are witnesses kept outside the appliance (`audit verify --witness`): each
    one must reach the collector soon after it is made, not with some later batch."""
    siem_config(deployment, collector, checkpoint_s=2)  # a time checkpoint 2 s after an entry
    audit_dir = deployment.directory / "audit"
    broker: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: "plant" in collector.seqs(), timeout=30)  # the export is running
    since = time.time()
    arrived: dict[tuple[str, int], float] = {}  # watched all along: first seen, when

    def signed_round(state: str, after: float) -> bool:
        """The plant audited noticing this switch (made after `after`) and signed it, and the
        enterprise signed after that (it witnesses the plant's checkpoint, then signs)."""
        received_checkpoints(collector, arrived)
        noticed = plant_notices(audit_dir, f"island_mode_{state}", after)
        made = checkpoints_made(audit_dir, since)
        plant_signed = [at for (w, seq), at in made.items() if w == "plant" and seq > noticed]
        return bool(plant_signed) and any(
            w == "enterprise" and at >= min(plant_signed) for (w, _), at in made.items()
        )

    for state in ("on", "off", "on", "off"):
        # The `cli` writer seals its start and stop; the plant audits noticing the flag and
        # signs that within 2 s; the enterprise witnesses the plant's checkpoint, and signs.
        # Each round waits for its own plant notice: a switch made before the plant noticed
        # the one before would flip the flag back unseen.
        switched = time.time()
        cli = asyncio.ensure_future(
            asyncio.to_thread(dmzbroker, "island", state, "--config", str(deployment.config))
        )
        try:
            await eventually(
                lambda cli=cli, state=state, at=switched: cli.done() and signed_round(state, at),
                timeout=30,
                interval=0.1,
            )
        except AssertionError:  # say what was missing: which writer did not sign in time
            so_far = sorted(checkpoints_made(audit_dir, since).items(), key=lambda kv: kv[1])
            ran = cli.result() if cli.done() else "still running"
            raise AssertionError(
                f"island {state}: plant notice seq "
                f"{plant_notices(audit_dir, f'island_mode_{state}', switched)}; checkpoints made "
                f"{so_far}; cli {ran}; broker events {broker.events()[-20:]}"
            ) from None
        assert any(
            w == "cli" and at >= switched
            for (w, _), at in checkpoints_made(audit_dir, since).items()
        )
        cli.result()

    def all_arrived() -> bool:
        received_checkpoints(collector, arrived)
        return set(checkpoints_made(audit_dir, since)) <= set(arrived)

    await eventually(all_arrived, timeout=30, interval=0.1)
    made = checkpoints_made(audit_dir, since)
    assert broker.stop() == 0
    assert {writer for writer, _ in made} >= {"cli", "plant", "enterprise"}
    lags = {key: arrived[key] - at for key, at in made.items()}
    # The exporter looks for new lines every IDLE_S (0.5 s); the bound leaves room for a
    # loaded two-core machine.
    assert max(lags.values()) < IDLE_S + 5, sorted(lags.items(), key=lambda kv: -kv[1])[:5]


async def test_a_collector_that_drops_every_connection_is_retried_with_backoff_logged_once(
    tmp_path: Path,
) -> None:
    """A real mTLS server that completes each handshake and closes at once: the exporter
    used to reconnect at once, over and over, logging (and auditing) every attempt."""
    pki = tmp_path / "pki"
    dmzbroker("certs", "init-ca", "--out", str(pki), "--name", "SIEM CA")
    dmzbroker("certs", "issue", "server", "--ca", str(pki), "--out", str(pki), "--name", "collector",
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    dmzbroker("certs", "issue", "client", "--ca", str(pki), "--out", str(pki),
              "--uri", "spiffe://demo/audit-exporter")  # fmt: skip
    loop = asyncio.get_running_loop()
    connects: list[float] = []

    async def drop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connects.append(loop.time())
        writer.close()

    context = tls.server_context(pki / "collector.crt", pki / "collector.key", pki / "ca.crt")
    server = await asyncio.start_server(drop, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "audit").mkdir()
    exporter = SiemExporter(
        tmp_path / "audit", tmp_path, ("127.0.0.1", port),
        tls.client_context(pki / "ca.crt", pki / "audit-exporter.crt", pki / "audit-exporter.key"),
        server_name="localhost", hostname="site-1",
    )  # fmt: skip
    try:
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(exporter.run())
            try:
                await eventually(lambda: len(connects) >= 4, timeout=40)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        server.close()
        await server.wait_closed()
    gaps = [later - earlier for earlier, later in itertools.pairwise(connects[:4])]
    # Waits of 1, 2 and 4 s, each with jitter down to half of it (less the time to connect).
    assert [round(g, 1) >= floor for g, floor in zip(gaps, (0.4, 0.9, 1.9), strict=True)] == [
        True, True, True,
    ], gaps  # fmt: skip
    events = [e["event"] for e in logs]
    assert events.count("siem_connection_lost") == 1  # one episode, logged once
    assert events.count("siem_connected") == 2  # the first connection, and the episode's
    assert "siem_unreachable" not in events

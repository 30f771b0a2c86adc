"""Benchmark: two appliances on one machine into one Mosquitto and one PostgreSQL (issue 19).

What docs/scaling.md says a fleet looks like, run small: two appliances (broker.sim.appliance,
each with its own folder, deployment id, policy, trust root, audit key, API port and Modbus
device in a child process), both running as deployed (`python -m broker run`), each with its
MQTT sink and its PostgreSQL sink configured. IT's side is shared: one Mosquitto (mutual TLS,
an ACL letting each appliance's sink write under its own topic prefix only) and one
PostgreSQL 15 (the tests' server: a schema and an INSERT-only role per appliance, one owner
that creates both schemas), with client certificates from IT's own CA.

After `--seconds` the appliances are stopped and the bench checks and prints, per appliance:
- MQTT: every message under its prefix carries only its own signals; no topic holds both's;
- PostgreSQL: its schema holds every (signal, seq) of its spool up to the sink's saved
  position, and no row that is not a record of its own spool;
- `dmzbroker audit verify` of its audit folder with its own audit.pub: INTACT.
Exits 1 if a check fails. Run: `.venv/bin/python bench/two_appliances.py` (--help).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import paho.mqtt.client as paho
import psutil
import psycopg
import yaml
from footprint import CONSUMER_URI, policy_document, serve_device
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pipeline import wait_ready
from support import REPO, device_process, free_port

from broker.channel.spool import SpoolReceiver
from broker.policy import parse as policy_parse
from broker.sim.appliance import DAYS, provision
from broker.trust import certs, tls
from tests.enterprise.postgres_server import PG_BIN, PostgresServer, make_pki

ROOT_PREFIX = "dmzbroker"
DATABASE = "historian"
STOP_S = 30.0  # a broker that has not stopped by then is killed
MOSQUITTO = """listener {port} 127.0.0.1
cafile {it}/ca.crt
certfile {it}/mqtt-broker.crt
keyfile {it}/mqtt-broker.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
persistence false
set_tcp_nodelay true
user root
acl_file {acl}
"""


@dataclass(frozen=True)
class Area:
    """One appliance: its name is its deployment id, path root, topic prefix and schema."""

    name: str
    workdir: Path
    api: int
    device: int

    @property
    def prefix(self) -> str:
        return f"{ROOT_PREFIX}/{self.name}"

    @property
    def schema(self) -> str:
        return self.name.replace("-", "_")

    @property
    def root(self) -> str:
        return f"site/{self.name}/"


class _Signal(msgspec.Struct):
    signal: str


class MqttProbe:
    """Subscribes to every appliance's prefix; tallies the signals seen on each topic."""

    def __init__(self, port: int, context: Any) -> None:
        self.signals: dict[str, set[str]] = defaultdict(set)
        self.messages = 0
        self._lock = threading.Lock()
        self._decode = msgspec.json.Decoder(list[_Signal]).decode
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self._client.tls_set_context(context)
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(f"{ROOT_PREFIX}/#", qos=1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, _client: Any, _data: Any, message: paho.MQTTMessage) -> None:
        seen = {r.signal for r in self._decode(message.payload)}
        with self._lock:
            self.messages += 1
            self.signals[message.topic] |= seen

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def it_side(workdir: Path, areas: list[Area], mqtt: int) -> Path:
    """IT's CA, Mosquitto's certificate, a client certificate per sink and for the probe,
    Mosquitto's config and ACL. Returns IT's certificate folder."""
    it = workdir / "it-certs"
    certs.init_ca(it, "IT services CA", days=DAYS)
    certs.issue_server(it, it, name="mqtt-broker", dns=["localhost"], ips=["127.0.0.1"], days=DAYS)
    certs.issue_client(it, it, name="probe", uri="spiffe://it/probe", days=DAYS)
    acl = ["user probe", f"topic read {ROOT_PREFIX}/#"]
    for area in areas:
        sink = f"sink-{area.name}"
        certs.issue_client(it, it, name=sink, uri=f"spiffe://{area.name}/sink", days=DAYS)
        acl += ["", f"user {sink}", f"topic write {area.prefix}/#"]
    (workdir / "mosquitto.acl").write_text("\n".join(acl) + "\n")
    conf = MOSQUITTO.format(port=mqtt, it=it, acl=workdir / "mosquitto.acl")
    (workdir / "mosquitto.conf").write_text(conf)
    return it


def appliance(
    area: Area, args: argparse.Namespace, it: Path, mqtt: int, pg: dict[str, Any]
) -> Path:
    """Provisions `area` with its MQTT and PostgreSQL sinks; returns its config file."""
    document = policy_document(area.device, args.registers, args.poll_ms / 1000)
    document["deployment_id"] = area.name
    for signal in document["signals"]:
        signal["path"] = area.root + signal["path"].removeprefix("bench/line/")
    policy = policy_parse.from_payload(msgspec.json.encode(document), f"{area.name} policy")
    made = provision(area.workdir, policy, port=area.api, consumer_uri=CONSUMER_URI)
    config = yaml.safe_load(made.config.read_text())
    sink = f"sink-{area.name}"
    config["enterprise"]["mqtt"] = {
        "host": "127.0.0.1", "port": mqtt, "server_name": "localhost", "ca": str(it / "ca.crt"),
        "cert": str(it / f"{sink}.crt"), "key": str(it / f"{sink}.key"),
        "identity": CONSUMER_URI, "topic_prefix": area.prefix, "client_id": sink,
    }  # fmt: skip
    config["enterprise"]["postgres"] = {**pg[area.name], "schema": area.schema}
    made.config.write_text(yaml.safe_dump(config, sort_keys=False))
    return made.config


def postgres_sections(server: PostgresServer, areas: list[Area]) -> dict[str, Any]:
    """One owner for the database; an INSERT-only role (client certificate) per appliance."""
    owner = server.create_role("historian_owner", password="bench owner")
    server.create_database(DATABASE, owner=owner.user)
    sections = {}
    for area in areas:
        login = server.create_role(f"sink_{area.schema}")
        config = server.sink_config(CONSUMER_URI, login, owner=owner, database=DATABASE)
        sections[area.name] = _without_none(msgspec.to_builtins(config, enc_hook=str))
    return sections


def _without_none(value: Any) -> Any:
    """A config section as YAML would give it: unset keys left out."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


async def run_brokers(areas: list[Area], configs: list[Path], args: argparse.Namespace) -> None:
    """Both appliances from start until `args.seconds` after both answer; then stopped."""
    brokers = []
    try:
        for area, config in zip(areas, configs, strict=True):
            with (area.workdir / "broker.log").open("wb") as out:
                brokers.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "broker", "run", "--config", str(config),
                    "--same-user", "--reset-state", "--log-format", "json",
                    stdout=out, stderr=out, cwd=REPO,
                ))  # fmt: skip
        for area, broker in zip(areas, brokers, strict=True):
            made = area.workdir / "certs"
            context = tls.client_context(made / "ca.crt", made / "probe.crt", made / "probe.key")
            async with aiohttp.ClientSession(
                f"https://127.0.0.1:{area.api}", connector=aiohttp.TCPConnector(ssl=context)
            ) as session:
                await wait_ready(session, "/v1/snapshot", broker, area.workdir / "broker.log")  # type: ignore[arg-type]
        print(f"both appliances answer; running {args.seconds:g} s "
              f"(load average {psutil.getloadavg()[0]:.2f})")  # fmt: skip
        await asyncio.sleep(args.seconds)
    finally:
        for broker in brokers:
            if broker.returncode is None:
                broker.terminate()
        for broker in brokers:
            try:
                await asyncio.wait_for(broker.wait(), STOP_S)
            except TimeoutError:
                broker.kill()
                await broker.wait()


def spooled(area: Area) -> set[tuple[str, int]]:
    """(signal, seq) of every record in `area`'s spool, read with a throwaway position (the
    appliance's own positions are left as they are)."""
    with tempfile.TemporaryDirectory() as state:
        receiver = SpoolReceiver(area.workdir / "spool", Path(state), "bench")
        found: set[tuple[str, int]] = set()
        while batch := receiver.receive():
            found |= {(r.signal, r.seq) for r in batch}
        receiver.close()
    return found


def check(area: Area, server: PostgresServer, probe: MqttProbe) -> bool:
    """Prints and judges `area`'s topics, rows and audit log."""
    topics = {t: s for t, s in probe.signals.items() if t.startswith(area.prefix + "/")}
    records = sum(len(s) for s in topics.values())
    foreign = sorted(
        s for signals in topics.values() for s in signals if not s.startswith(area.root)
    )
    topics_ok = bool(topics) and not foreign
    print(f"  MQTT: {len(topics)} topics under {area.prefix}/, {records:,} signals seen, "
          f"{len(foreign)} of another appliance: {'OK' if topics_ok else 'COLLISION'}")  # fmt: skip
    position = area.workdir / "enterprise-state" / "spool-position-postgres.json"
    committed = int(json.loads(position.read_bytes())["seq"]) if position.exists() else 0
    rows = {(s, int(q)) for s, q in server.sql(
        f"SELECT signal, seq FROM {area.schema}.records", database=DATABASE)}  # fmt: skip
    # At least once: rows committed after the sink last saved its position are there too
    # (a restart writes them again, as conflicts). So: every record up to the position is a
    # row, and every row is a record of this spool.
    spool = spooled(area)
    missing = {r for r in spool if r[1] <= committed} - rows
    extra = rows - spool
    rows_ok = committed > 0 and not missing and not extra
    print(f"  PostgreSQL: {len(rows):,} rows in {area.schema}.records, {len(spool):,} records "
          f"in the spool, the sink's position {committed:,}; missing up to the position "
          f"{len(missing):,}, not from this spool {len(extra):,}: "
          f"{'OK' if rows_ok else 'MISMATCH'}")  # fmt: skip
    code, said = audit_verify(area, area)
    audit_ok = code == 0 and said[-1:] == ["INTACT"]
    print(f"  audit verify {area.name}/audit --pubkey its audit.pub (exit {code}): "
          + " | ".join(line.strip() for line in said))  # fmt: skip
    return topics_ok and rows_ok and audit_ok


def audit_verify(area: Area, key_of: Area) -> tuple[int, list[str]]:
    """`dmzbroker audit verify` of `area`'s audit folder with `key_of`'s audit.pub: its exit
    code and what it said."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify", str(area.workdir / "audit"),
         "--pubkey", str(key_of.workdir / "audit-key" / "audit.pub")],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()


def refused(area: Area, other: Area, server: PostgresServer, it: Path, mqtt: int) -> bool:
    """`area`'s sinks try to write into `other`'s topics and schema, and `area`'s audit log
    is checked with `other`'s key: all three refused."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"trespass-{area.name}",
                         protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
    sink = it / f"sink-{area.name}"
    client.tls_set_context(tls.client_context(it / "ca.crt", sink.with_suffix(".crt"),
                                              sink.with_suffix(".key")))  # fmt: skip
    acked = threading.Event()
    codes: list[str] = []
    client.on_publish = lambda _c, _d, _mid, code, _p: (codes.append(str(code)), acked.set())
    client.connect("127.0.0.1", mqtt)
    client.loop_start()
    try:
        client.publish(f"{other.prefix}/site/{other.name}/spoofed", b"[]", qos=1)
        acked.wait(30)
    finally:
        client.disconnect()
        client.loop_stop()
    mqtt_ok = bool(codes) and codes[0] == "Not authorized"
    print(f"  MQTT publish as sink-{area.name} under {other.prefix}/: "
          f"{codes[0] if codes else 'no PUBACK within 30 s'}: {'REFUSED' if mqtt_ok else 'ACCEPTED'}")  # fmt: skip
    try:
        server.sql(f'SET ROLE "sink_{area.schema}"; INSERT INTO {other.schema}.records '
                   "(signal, seq, broker_time) VALUES ('spoofed', 0, now())", database=DATABASE)  # fmt: skip
        pg_said, pg_ok = "inserted", False
    except psycopg.errors.InsufficientPrivilege as e:
        pg_said, pg_ok = str(e).splitlines()[0], True
    print(f"  INSERT as sink_{area.schema} into {other.schema}.records: {pg_said}: "
          f"{'REFUSED' if pg_ok else 'ACCEPTED'}")  # fmt: skip
    code, said = audit_verify(area, other)
    key_ok = code != 0
    print(f"  audit verify {area.name}/audit with {other.name}'s audit.pub: exit "
          f"{code}, {said[-1] if said else 'nothing'!r}: {'REFUSED' if key_ok else 'ACCEPTED'}")  # fmt: skip
    return mqtt_ok and pg_ok and key_ok


def measure(workdir: Path, args: argparse.Namespace) -> bool:
    names = ["area-a", "area-b"]
    areas = [Area(n, workdir / n, free_port(), free_port()) for n in names]
    mqtt = free_port()
    it = it_side(workdir, areas, mqtt)
    server = PostgresServer(make_pki(workdir / "pg-pki"))
    with contextlib.ExitStack() as stack:
        server.start()
        stack.callback(server.close)
        pg = postgres_sections(server, areas)
        configs = [appliance(area, args, it, mqtt, pg) for area in areas]
        mosquitto = subprocess.Popen(["mosquitto", "-c", str(workdir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        stack.callback(mosquitto.wait, 10)
        stack.callback(mosquitto.terminate)
        for area in areas:
            stack.enter_context(device_process(f"{area.name} device", serve_device,
                                               area.device, args.registers))  # fmt: skip
        time.sleep(0.5)  # Mosquitto listening (checked: the probe's connect raises otherwise)
        probe = MqttProbe(
            mqtt, tls.client_context(it / "ca.crt", it / "probe.crt", it / "probe.key")
        )
        stack.callback(probe.close)
        asyncio.run(run_brokers(areas, configs, args))
        time.sleep(1.0)  # the last acknowledged publishes reach the probe
        print(f"MQTT probe: {probe.messages:,} messages on {len(probe.signals)} topics")
        shared = [t for t in probe.signals if not any(t.startswith(a.prefix + "/") for a in areas)]
        passed = not shared
        for area, other in zip(areas, areas[::-1], strict=True):
            print(f"{area.name} (deployment {area.name}, schema {area.schema}):")
            passed &= check(area, server, probe)
            passed &= refused(area, other, server, it, mqtt)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registers", type=int, default=200, help="per appliance")
    parser.add_argument("--poll-ms", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="after both answer")
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    if not (PG_BIN / "postgres").exists():
        raise SystemExit(f"{PG_BIN}/postgres not found: install postgresql-15 (`make test` does)")
    print(f"two appliances, each {args.registers} int16 registers every {args.poll_ms:g} ms "
          f"({args.registers * 1000 / args.poll_ms:,.0f} points/s each)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dmzbroker-two-", dir=args.tmpdir) as tmp:
        passed = measure(Path(tmp), args)
    print(f"no collision, rows match the spools, each audit INTACT: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

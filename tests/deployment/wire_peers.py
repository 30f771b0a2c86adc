"""The programs tests/deployment/test_wire.py runs inside its network namespaces: the OT
servers, the capture on the OT link, and the IT side (a consumer, and two attackers: one with
ordinary sockets, one with hand-made packets).

    python -m tests.deployment.wire_peers ot --opcua ADDR --pki JSON --stats FILE
    python -m tests.deployment.wire_peers sniff --iface NAME --pcap FILE
    python -m tests.deployment.wire_peers probe --target ADDR:PORT…
    python -m tests.deployment.wire_peers consume --api URL --tls JSON --signal PATH…
    python -m tests.deployment.wire_peers attack --api URL --tls JSON --ot ADDR:PORT…
        [--appliance-ot ADDR…]
    python -m tests.deployment.wire_peers craft --source ADDR… --spoof ADDR…
        --consumer ADDR:PORT… --routed ADDR:PORT… --appliance-ot ADDR… [--quote JSON…]

An IPv6 address with a port is written `[ADDR]:PORT`. `ot` and `sniff` print `ready` once
serving (capturing) and write what they saw when stopped with SIGTERM; the others print one
JSON report. Every loop is bounded in time and in count; the attackers never send a packet
anywhere but the appliance and the OT addresses they are given (routed through the
appliance).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import ssl
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pymodbus.pdu import ModbusPDU

from broker.sim.refrigeration import RefrigerationPlant
from broker.trust import tls
from tests.plant.connectors.opcua_server import OpcUaPki, OpcUaTestServer

MODBUS_PORT, OPCUA_PORT = 502, 4840
OPCUA_PATH = "/dmzbroker-test"
CONNECT_TIMEOUT_S = 0.5  # a dropped SYN is never answered: this is how long an attempt waits
SCANNED = range(1, 1025)
FLOOD_HELD = 300  # idle connections the flood keeps open at once
FLOOD_MAX_ATTEMPTS = 20_000
UDP_SPRAY = 2_000


def modbus_writes() -> list[bytes]:
    """Modbus/TCP ADUs for unit 1: write the setpoint (FC 6), two registers (FC 16), a coil
    (FC 5)."""
    return [
        struct.pack(">HHHBBHH", 1, 0, 6, 1, 6, 0, 999),
        struct.pack(">HHHBBHHBHH", 2, 0, 11, 1, 16, 0, 2, 4, 1, 2),
        struct.pack(">HHHBBHH", 3, 0, 6, 1, 5, 0, 0xFF00),
    ]


def opcua_hello(endpoint: str) -> bytes:
    """An OPC UA Hello message (OPC 10000-6 7.1.2.3), the first bytes a client sends."""
    url = endpoint.encode()
    body = struct.pack("<IIIIIi", 0, 65536, 65536, 0, 0, len(url)) + url
    return b"HELF" + struct.pack("<I", 8 + len(body)) + body


# --- OT ------------------------------------------------------------------------------------


class CountedPlant(RefrigerationPlant):
    """The refrigeration simulator, also noting when each request arrived (monotonic s)."""

    def __init__(self) -> None:
        # every address of the namespace, both families: a routed write that got through to
        # any of them would be counted
        super().__init__("", MODBUS_PORT, tick_s=0.1)
        self.arrivals: list[tuple[float, int]] = []

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.arrivals.append((time.monotonic(), pdu.function_code))
        return super()._trace(sending, pdu)


async def ot(args: argparse.Namespace) -> None:
    plant = CountedPlant()
    pki = OpcUaPki(**{name: Path(path) for name, path in json.loads(args.pki).items()})
    server = OpcUaTestServer(pki, {"Power": 2.5})
    server.port = OPCUA_PORT  # a fixed address in a namespace of its own, not a free one
    server.endpoint = f"opc.tcp://{args.opcua}:{OPCUA_PORT}{OPCUA_PATH}"
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await plant.start()
    await server.start()
    try:
        print("ready", flush=True)
        await stopping.wait()
    finally:
        seen = {"modbus": plant.arrivals, "opcua": dict(server.services)}
        Path(args.stats).write_text(json.dumps(seen))
        await server.stop()
        await plant.stop()


def sniff(args: argparse.Namespace) -> None:
    from scapy.all import AsyncSniffer, wrpcap  # noqa: PLC0415 - slow import, only here

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    sniffer = AsyncSniffer(
        iface=args.iface, store=True, started_callback=lambda: print("ready", flush=True)
    )
    sniffer.start()
    while not stopping.wait(0.1):
        pass
    wrpcap(args.pcap, sniffer.stop() or [])


# --- IT ------------------------------------------------------------------------------------


def _tls(args: argparse.Namespace) -> ssl.SSLContext:
    files = json.loads(args.tls)
    return tls.client_context(Path(files["ca"]), Path(files["cert"]), Path(files["key"]))


def _address(text: str) -> tuple[str, int]:
    """`ADDR:PORT` or `[ADDR]:PORT` (IPv6)."""
    host, port = text.rsplit(":", 1)
    return host.removeprefix("[").removesuffix("]"), int(port)


async def attempt(host: str, port: int, payload: bytes = b"") -> str:
    """One TCP connection attempt: `timeout`, `refused`, `unreachable` or `connected`
    (then `payload` is sent and the connection closed)."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout=CONNECT_TIMEOUT_S
        )
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "unreachable"
    with contextlib.suppress(OSError):
        writer.write(payload)
        await writer.drain()
    writer.close()
    return "connected"


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    return {target: await attempt(*_address(target)) for target in args.target}


async def snapshot_quality(api: str, context: ssl.SSLContext) -> dict[str, str]:
    """Signal → quality from `/v1/snapshot`; empty when it cannot be had."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{api}/v1/snapshot", ssl=context) as response,
        ):
            if response.status != 200:
                return {}
            body = await response.json()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return {}
    return {record["signal"]: record["quality"] for record in body["records"]}


async def consume(args: argparse.Namespace) -> dict[str, Any]:
    """Reads the snapshot until every `--signal` is good, for at most `--timeout` s."""
    context, wanted = _tls(args), set(args.signal)
    deadline = time.monotonic() + args.timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = await snapshot_quality(args.api, context)
        if all(seen.get(path) == "good" for path in wanted):
            break
        await asyncio.sleep(0.2)
    return {"quality": {path: seen.get(path) for path in sorted(wanted)}, "records": len(seen)}


async def write_shaped(api: str, context: ssl.SSLContext) -> dict[str, int]:
    """Every method but GET, with a body, at the routes that carry values: status by request."""
    statuses = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for path in ("/v1/snapshot", "/v1/signals/coldstore/storage/cold-room-1/setpoint"):
                async with session.request(
                    method, f"{api}{path}", json={"value": 99}, ssl=context
                ) as response:
                    statuses[f"{method} {path}"] = response.status
    return statuses


async def answer(host: str, port: int, payload: bytes, context: ssl.SSLContext | None) -> str:
    """The first line of what the API answers to `payload` (over TLS with `context`), or
    `closed` when it closes the connection without an answer."""
    kwargs: dict[str, Any] = {"ssl": context, "server_hostname": host} if context else {}
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, **kwargs), timeout=5
    )
    try:
        writer.write(payload)
        line = await asyncio.wait_for(reader.readline(), timeout=5)
    except (OSError, ssl.SSLError, TimeoutError):
        line = b""
    finally:
        writer.close()
    return line.decode(errors="replace").strip() or "closed"


async def malformed(host: str, port: int, context: ssl.SSLContext) -> dict[str, str]:
    cases = {
        "header without colon": b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        "binary request line": b"\x00\x01\x02\xff garbage\r\n\r\n",
        "request line over 8190 bytes": b"GET /" + b"A" * 10_000 + b" HTTP/1.1\r\n\r\n",
        "bad version": b"GET /v1/snapshot HTTP/9.9\r\nHost: x\r\n\r\n",
    }
    answers = {name: await answer(host, port, payload, context) for name, payload in cases.items()}
    answers["plain HTTP to the TLS port"] = await answer(
        host, port, b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\n\r\n", None
    )
    return answers


async def scan(host: str, ports: list[int]) -> list[int]:
    """The ports that accept a TCP connection, tried 256 at a time."""
    gate = asyncio.Semaphore(256)

    async def one(port: int) -> str:
        async with gate:
            return await attempt(host, port)

    results = await asyncio.gather(*(one(port) for port in ports))
    return [port for port, result in zip(ports, results, strict=True) if result == "connected"]


def udp_spray(targets: list[tuple[str, int]]) -> int:
    sent = 0
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6,
    ):
        for i in range(UDP_SPRAY):
            target = targets[i % len(targets)]
            with contextlib.suppress(OSError):
                (v6 if ":" in target[0] else v4).sendto(modbus_writes()[i % 3], target)
                sent += 1
    return sent


async def flood(
    host: str, port: int, api: str, context: ssl.SSLContext, seconds: float
) -> dict[str, Any]:
    """For `seconds`: connections opened as fast as they go (FLOOD_HELD kept open, each with
    half a request line), consumers fetching the snapshot over new TLS connections, and a
    UDP spray at the appliance. Returns its window (monotonic s) and counts."""
    counts = {"attempts": 0, "opened": 0, "snapshots": 0}
    held: deque[asyncio.StreamWriter] = deque()
    start = time.monotonic()
    end = start + seconds

    async def churn() -> None:
        while time.monotonic() < end and counts["attempts"] < FLOOD_MAX_ATTEMPTS:
            counts["attempts"] += 1
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            except (OSError, TimeoutError):
                continue
            counts["opened"] += 1
            with contextlib.suppress(OSError):
                writer.write(b"GET /v1/snapshot HT")
            held.append(writer)
            while len(held) > FLOOD_HELD:
                held.popleft().close()

    async def fetch() -> None:
        while time.monotonic() < end and counts["snapshots"] < FLOOD_MAX_ATTEMPTS:
            if await snapshot_quality(api, context):
                counts["snapshots"] += 1
            else:
                await asyncio.sleep(0.05)  # refused for now: retry, as a consumer would

    spray = asyncio.to_thread(udp_spray, [(host, p) for p in (MODBUS_PORT, OPCUA_PORT, 161)])
    results = await asyncio.gather(churn(), churn(), churn(), fetch(), fetch(), spray)
    finished = time.monotonic()
    while held:
        held.popleft().close()
    return {"window": [start, finished], "udp_sent": results[-1], **counts}


async def attack(args: argparse.Namespace) -> dict[str, Any]:
    """A quiet baseline window, then every kind of hostile traffic, the flood last."""
    context = _tls(args)
    host = urlsplit(args.api).hostname
    port = urlsplit(args.api).port
    assert host is not None and port is not None
    baseline_start = time.monotonic()
    await asyncio.sleep(args.baseline)  # a measurement window: nothing hostile yet
    report: dict[str, Any] = {"baseline": [baseline_start, time.monotonic()]}
    report["hostile_start"] = time.monotonic()
    report["write_shaped"] = await write_shaped(args.api, context)
    report["malformed"] = await malformed(host, port, context)
    writes = b"".join(modbus_writes())
    at_appliance: dict[str, tuple[str, int, bytes]] = {}
    # its IT address, and its OT addresses reached through the IT NIC (the consumer port
    # too: it is open on the IT NIC's own addresses only)
    for address in (host, *args.appliance_ot):
        at_appliance[f"modbus write to {address}:{MODBUS_PORT}"] = (address, MODBUS_PORT, writes)
        at_appliance[f"OPC UA Hello to {address}:{OPCUA_PORT}"] = (
            address, OPCUA_PORT, opcua_hello(f"opc.tcp://{address}:{OPCUA_PORT}"),
        )  # fmt: skip
        if address != host:
            at_appliance[f"consumer port at {address}"] = (address, port, b"GET / HTTP/1.1\r\n")
    routed = {}
    for target in args.ot:
        ot_host, ot_port = _address(target)
        payload = writes if ot_port == MODBUS_PORT else opcua_hello(f"opc.tcp://{target}")
        routed[f"routed to {target}"] = (ot_host, ot_port, payload)
    report["at_appliance"], report["routed"] = len(at_appliance), len(routed)
    attempts = at_appliance | routed  # all at once: each dropped SYN waits CONNECT_TIMEOUT_S
    results = await asyncio.gather(*(attempt(*destination) for destination in attempts.values()))
    report["attempts"] = dict(zip(attempts, results, strict=True))
    report["udp_sent"] = await asyncio.to_thread(
        udp_spray, [_address(target) for target in args.ot]
    )
    scanned = sorted({*SCANNED, port, OPCUA_PORT, 5020, 8080})
    report["scanned"], report["open_ports"] = len(scanned), await scan(host, scanned)
    report["flood"] = await flood(host, port, args.api, context, args.flood)
    report["hostile_end"] = time.monotonic()
    return report


NOT_SYN = ("A", "F", "R", "FA", "PA", "SA", "SR", "SF", "FPU", "")  # TCP flags, no plain SYN
# Below the kernel's ephemeral range (32768-60999): a crafted segment must never fall into a
# connection the consumer or the flood left in the connection tracking table (TIME_WAIT
# entries live 120 s), where it would be `established` and not counted.
CRAFTED_PORT = 20000


def craft(args: argparse.Namespace) -> dict[str, int]:
    """Packets no socket sends, each of which the ruleset must drop and count: SYNs with OT
    source addresses (at the consumer port, where an answer would go out on the OT link, and
    routed at OT hosts); segments without a plain SYN; fragmented SYNs and UDP; SYNs at the
    appliance's OT addresses through the IT NIC; and ICMP errors (fragmentation needed,
    redirect, IPv6 packet too big) quoting the plant's own OT connections (`--quote`:
    [appliance address, its port, device address, device port]). Counts what it sent by
    the counter that should see it: `spoofed`, `routed`, `at_appliance`."""
    from scapy.all import (  # noqa: PLC0415 - slow import, only here
        ICMP,
        IP,
        TCP,
        UDP,
        ICMPv6PacketTooBig,
        IPv6,
        IPv6ExtHdrFragment,
        Packet,
        Raw,
        conf,
        fragment,
        fragment6,
        send,
    )

    conf.verb = 0

    def ip(src: str, dst: str) -> Packet:
        return IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)

    def own(dst: str) -> str:  # the attacker's real address in dst's family
        return next(a for a in args.source if (":" in a) == (":" in dst))

    sent = {"spoofed": 0, "routed": 0, "at_appliance": 0}
    packets: list[Packet] = []

    def add(counter: str, *made: Packet) -> None:
        sent[counter] += 1  # several fragments are one packet once reassembled
        packets.extend(made)

    consumers, routed = [_address(a) for a in args.consumer], [_address(a) for a in args.routed]
    for dst, dport in (*consumers, *routed):
        for src in (a for a in args.spoof if (":" in a) == (":" in dst)):
            add("spoofed", ip(src, dst) / TCP(sport=4444, dport=dport, flags="S", seq=1000))
        counter = "at_appliance" if (dst, dport) in consumers else "routed"
        for n, flags in enumerate(NOT_SYN):
            add(counter, ip(own(dst), dst) / TCP(sport=CRAFTED_PORT + n, dport=dport, flags=flags))
    for dst, dport in routed:
        syn = TCP(sport=CRAFTED_PORT + 100, dport=dport, flags="S")
        if ":" in dst:
            whole = IPv6(src=own(dst), dst=dst) / IPv6ExtHdrFragment() / syn / Raw(b"S" * 1400)
            add("routed", *fragment6(whole, 600))
        else:
            add("routed", *fragment(IP(src=own(dst), dst=dst) / syn / Raw(b"S" * 64), 16))
    for dst, dport in routed[:1]:
        udp = (
            ip(own(dst), dst)
            / UDP(sport=CRAFTED_PORT + 101, dport=dport)
            / Raw(modbus_writes()[0] * 8)
        )
        add("routed", *fragment(udp, fragsize=16))
    for address in args.appliance_ot:
        for dport in (MODBUS_PORT, OPCUA_PORT, 22):
            add(
                "at_appliance",
                ip(own(address), address) / TCP(sport=CRAFTED_PORT + 102, dport=dport),
            )
    for quoted in map(json.loads, args.quote):
        ours, sport, device, dport = quoted
        inner = bytes(ip(ours, device) / TCP(sport=sport, dport=dport, flags="A", seq=1))
        src = own(ours)
        if ":" in ours:
            add("at_appliance", IPv6(src=src, dst=ours) / ICMPv6PacketTooBig(mtu=1280) / inner)
        else:
            add("at_appliance", IP(src=src, dst=ours) / ICMP(type=3, code=4, nexthopmtu=552)
                / inner[:28])  # fmt: skip
            add("at_appliance", IP(src=src, dst=ours) / ICMP(type=5, code=1, gw=src) / inner[:28])
    for v6 in (False, True):  # one socket per family; the routes pick the IT NIC
        send([p for p in packets if (IPv6 in p) == v6])
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(prog="wire_peers")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("ot")
    p.add_argument("--opcua", required=True)
    p.add_argument("--pki", required=True, help="OpcUaPki as JSON")
    p.add_argument("--stats", required=True)
    p = commands.add_parser("sniff")
    p.add_argument("--iface", required=True)
    p.add_argument("--pcap", required=True)
    p = commands.add_parser("probe")
    p.add_argument("--target", action="append", required=True)
    p = commands.add_parser("craft")
    for name in ("--source", "--spoof", "--consumer", "--routed", "--appliance-ot"):
        p.add_argument(name, action="append", required=True)
    p.add_argument("--quote", action="append", default=[], help="[ours, port, device, port]")
    for name in ("consume", "attack"):
        p = commands.add_parser(name)
        p.add_argument("--api", required=True)
        p.add_argument("--tls", required=True, help='{"ca", "cert", "key"} as JSON')
    commands.choices["consume"].add_argument("--signal", action="append", required=True)
    commands.choices["consume"].add_argument("--timeout", type=float, default=30)
    commands.choices["attack"].add_argument("--ot", action="append", required=True)
    commands.choices["attack"].add_argument("--appliance-ot", action="append", default=[])
    commands.choices["attack"].add_argument("--baseline", type=float, default=3)
    commands.choices["attack"].add_argument("--flood", type=float, default=5)
    args = parser.parse_args()
    if args.command == "ot":
        asyncio.run(ot(args))
    elif args.command == "sniff":
        sniff(args)
    elif args.command == "craft":
        print(json.dumps(craft(args)), flush=True)
    else:
        report = asyncio.run(
            {"probe": probe, "consume": consume, "attack": attack}[args.command](args)
        )
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

"""Proof on the wire: with the ruleset `dmzbroker deploy nftables` writes, no packet from the
IT side reaches the OT network, whatever the IT side sends, and the plant is polled at the
pace its policy allows.

Topology (three network namespaces this module creates and removes; names carry the pid):

    OT namespace                      appliance namespace                   IT namespace
    192.0.2.10 Modbus (simulator)     plant + enterprise halves             198.51.100.10
    192.0.2.11 OPC UA (asyncua)       ip_forward on, nftables loaded        consumer, attacker
         plc<pid> ───── veth ───── ot<pid> 192.0.2.1                        route to 192.0.2.0/24
                                           198.51.100.1 it<pid> ─── veth ─── con<pid>  via .1

The OT servers' default route points at the appliance too, so nothing but the ruleset
stops a forwarded connection (the first control shows one getting through without it).
A capture (scapy, inside the OT namespace) covers the consumer's reads and the whole hostile
phase: write-shaped API requests, malformed HTTP, a Modbus write frame and an OPC UA Hello at
the appliance's IT address, the same routed at the OT servers, UDP, a port scan, and a
connection flood while the Modbus server times every request it gets. The halves run as
root with `plant` and `enterprise` (each half's own user is test_install's subject); root
is needed for the namespaces, and the module is skipped, saying so, without it or without
`ip`, `nft` or `sysctl`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.policy.schema import DEFAULT_MAX_REQUESTS_PER_S
from tests.deployment.netns import MISSING_TOOLS, Namespace, namespaces, veth
from tests.deployment.wire_peers import MODBUS_PORT, OPCUA_PATH, OPCUA_PORT
from tests.harness import (
    Owners,
    Pki,
    demo_policy,
    dmzbroker,
    sign_policy,
    stop_process,
    write_config,
)
from tests.plant.connectors.opcua_server import OpcUaPki, make_pki

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
    pytest.mark.skipif(bool(MISSING_TOOLS), reason=f"not installed: {', '.join(MISSING_TOOLS)}"),
    pytest.mark.timeout(180),  # one fixture builds it all; slow when other tests load the cores
]

PID = os.getpid()
APPLIANCE_OT, PLC, UA_SERVER = "192.0.2.1", "192.0.2.10", "192.0.2.11"
APPLIANCE_IT, CONSUMER = "198.51.100.1", "198.51.100.10"
IT_NET = ipaddress.ip_network("198.51.100.0/24")
OT_IFACE, IT_IFACE = f"ot{PID}", f"it{PID}"  # the appliance's two NICs
API_PORT = 8443  # the shipped default; the namespace's ports are its own
API = f"https://{APPLIANCE_IT}:{API_PORT}"
MODBUS_SIGNAL = "coldstore/machine-room/compressor-1/suction_pressure"
UA_SIGNAL = "coldstore/ua/plc/power"
POLL_INTERVAL_S = 0.5  # the demo's 8 requests a scan: 16 requests/s, inside the default budget
WRITE_CODES = {5, 6, 15, 16, 22, 23}
PEERS = ("-m", "tests.deployment.wire_peers")


@dataclass
class Wire:
    """What one run saw: the controls, the attacker's report, the counters, the capture and
    what the OT servers received."""

    forwarded_without_ruleset: str
    forwarded_with_ruleset: str
    consumed: dict[str, Any]
    consumed_after: dict[str, Any]
    attack: dict[str, Any]
    counters_before: dict[str, int]
    counters_after: dict[str, int]
    packets: list[Any]
    modbus: list[tuple[float, int]]  # (monotonic arrival, function code)
    opcua: dict[str, int]  # service requests by name
    halves_running: bool


def policy_document() -> dict[str, Any]:
    """The demo policy at the OT Modbus server, at the default budget, plus one OPC UA device."""
    document = demo_policy(MODBUS_PORT, poll_interval_s=POLL_INTERVAL_S)
    document["devices"][0].update(host=PLC, max_requests_per_s=DEFAULT_MAX_REQUESTS_PER_S)
    document["devices"].append(
        {"name": "ua-plc", "protocol": "opcua", "poll_interval_s": POLL_INTERVAL_S,
         "endpoint": f"opc.tcp://{UA_SERVER}:{OPCUA_PORT}{OPCUA_PATH}", "timeout_s": 2.0}
    )  # fmt: skip
    document["signals"].append(
        {"path": UA_SIGNAL, "device": "ua-plc",
         "source": {"protocol": "opcua", "node": "ns=2;s=Power"}}
    )  # fmt: skip
    return document


def appliance_config(directory: Path, pki: Pki, owners: Owners, opcua: OpcUaPki) -> Path:
    envelope = sign_policy(directory, policy_document(), [owners.ot_key, owners.it_key])
    config = write_config(directory, envelope, pki, API_PORT, owners)
    dmzbroker("certs", "issue", "server", "--ca", str(pki.ca.parent), "--out", str(directory),
              "--name", "appliance", "--ip", APPLIANCE_IT)  # fmt: skip
    settings = yaml.safe_load(config.read_text())
    settings["enterprise"]["listen"]["host"] = APPLIANCE_IT
    settings["enterprise"]["tls"].update(
        cert=str(directory / "appliance.crt"), key=str(directory / "appliance.key")
    )
    settings["plant"]["opcua"] = {
        "certificate": str(opcua.client_cert),
        "private_key": str(opcua.client_key),
        "trust_list": [str(opcua.ca)],
    }
    config.write_text(yaml.safe_dump(settings))
    return config


def counters(appliance: Namespace) -> dict[str, int]:
    listed = json.loads(appliance.run("nft", "-j", "list", "counters"))["nftables"]
    return {c["counter"]["name"]: c["counter"]["packets"] for c in listed if "counter" in c}


def peer(space: Namespace, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Runs a wire_peers command inside `space` to its end; its JSON report."""
    output: dict[str, Any] = json.loads(
        space.run(sys.executable, *PEERS, *args, timeout=timeout).splitlines()[-1]
    )
    return output


def build(ot: Namespace, appliance: Namespace, it: Namespace) -> None:
    veth(appliance, OT_IFACE, ot, f"plc{PID}")
    veth(appliance, IT_IFACE, it, f"con{PID}")
    appliance.up(OT_IFACE, f"{APPLIANCE_OT}/24")
    appliance.up(IT_IFACE, f"{APPLIANCE_IT}/24")
    ot.up(f"plc{PID}", f"{PLC}/24", f"{UA_SERVER}/24")
    it.up(f"con{PID}", f"{CONSUMER}/24")
    ot.route("default", APPLIANCE_OT)
    it.route("192.0.2.0/24", APPLIANCE_IT)  # as an attacker would
    appliance.sysctl("net.ipv4.ip_forward=1")  # so that only the ruleset stops forwarding


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory, pki: Pki, owners: Owners) -> Wire:
    from scapy.all import rdpcap  # noqa: PLC0415 - slow import, root-only module

    directory = tmp_path_factory.mktemp("wire")
    opcua = make_pki(directory / "opcua-pki")
    config = appliance_config(directory, pki, owners, opcua)
    ruleset = directory / "ruleset.nft"
    dmzbroker("deploy", "nftables", "--config", str(config), "--ot-interface", OT_IFACE,
              "--it-interface", IT_IFACE, "--out", str(ruleset))  # fmt: skip
    client = json.dumps({"ca": str(pki.ca), "cert": str(pki.client_cert),
                         "key": str(pki.client_key)})  # fmt: skip
    consume = ("consume", "--api", API, "--tls", client, "--signal", MODBUS_SIGNAL,
               "--signal", UA_SIGNAL)  # fmt: skip
    stats, pcap = directory / "ot-stats.json", directory / "ot.pcap"
    names = (f"dmzw{PID}-ot", f"dmzw{PID}-app", f"dmzw{PID}-it")
    with namespaces(*names) as (ot, appliance, it):
        build(ot, appliance, it)
        servers = ot.python(*PEERS, "ot", "--modbus", PLC, "--opcua", UA_SERVER,
                            "--pki", json.dumps({k: str(v) for k, v in asdict(opcua).items()}),
                            "--stats", str(stats), log=directory / "ot.log")  # fmt: skip
        target = f"{PLC}:{MODBUS_PORT}"
        without = peer(it, "probe", "--target", target)["result"]
        appliance.run("nft", "-f", str(ruleset))
        with_ruleset = peer(it, "probe", "--target", target)["result"]
        # from here on, all the OT link carries
        sniffer = ot.python(*PEERS, "sniff", "--iface", f"plc{PID}", "--pcap", str(pcap),
                            log=directory / "sniff.log")  # fmt: skip
        halves = [
            appliance.python("-m", "broker", half, "--config", str(config), "--reset-state",
                             log=directory / f"{half}.log", ready=False)
            for half in ("plant", "enterprise")
        ]  # fmt: skip
        consumed = peer(it, *consume, "--timeout", "45")
        before = counters(appliance)
        attack = peer(it, "attack", "--api", API, "--tls", client,
                      "--ot", target, "--ot", f"{UA_SERVER}:{OPCUA_PORT}")  # fmt: skip
        after = counters(appliance)
        consumed_after = peer(it, *consume, "--timeout", "20")
        running = all(half.poll() is None for half in halves)
        stop_process(sniffer)
        stop_process(servers)
    seen = json.loads(stats.read_text())
    return Wire(
        forwarded_without_ruleset=without,
        forwarded_with_ruleset=with_ruleset,
        consumed=consumed,
        consumed_after=consumed_after,
        attack=attack,
        counters_before=before,
        counters_after=after,
        packets=list(rdpcap(str(pcap))),
        modbus=[(t, fc) for t, fc in seen["modbus"]],
        opcua=seen["opcua"],
        halves_running=running,
    )


def test_only_the_ruleset_stops_forwarding(wire: Wire) -> None:
    """The control: the appliance forwards IT to OT until the ruleset is loaded."""
    assert wire.forwarded_without_ruleset == "connected"
    assert wire.forwarded_with_ruleset == "timeout"


def test_the_consumer_gets_good_records_from_both_devices_before_and_after(wire: Wire) -> None:
    good = {MODBUS_SIGNAL: "good", UA_SIGNAL: "good"}
    assert wire.consumed["quality"] == good, wire.consumed
    assert wire.consumed_after["quality"] == good, wire.consumed_after
    assert wire.halves_running


def test_no_packet_from_the_it_side_reaches_the_ot_link(wire: Wire) -> None:
    from scapy.layers.inet import IP, TCP  # noqa: PLC0415
    from scapy.layers.l2 import ARP  # noqa: PLC0415

    ot_side = {APPLIANCE_OT, PLC, UA_SERVER}
    strays, polls = [], {PLC: 0, UA_SERVER: 0}
    for packet in wire.packets:
        if IP in packet:
            ends = {packet[IP].src, packet[IP].dst}
            if ipaddress.ip_address(packet[IP].src) in IT_NET or not (
                APPLIANCE_OT in ends and ends <= ot_side
            ):
                strays.append(packet.summary())
            elif packet[IP].src == APPLIANCE_OT and TCP in packet and bytes(packet[TCP].payload):
                polls[packet[IP].dst] += 1
        elif ARP not in packet or not {packet[ARP].psrc, packet[ARP].pdst} <= ot_side:
            strays.append(packet.summary())
    assert strays == []
    # the capture saw the appliance polling both servers: it was looking at the right link
    assert polls[PLC] > 20 and polls[UA_SERVER] > 2, polls


def test_the_ot_servers_count_zero_writes(wire: Wire) -> None:
    codes = {fc for _, fc in wire.modbus}
    assert codes and codes <= {1, 2, 3, 4}  # the counting saw the polls: reads only
    assert not codes & WRITE_CODES
    changing = {"Write", "Call", "AddNodes", "DeleteNodes", "AddReferences", "HistoryUpdate"}
    assert not {f"{name}Request" for name in changing} & set(wire.opcua), wire.opcua
    assert wire.opcua.get("ReadRequest", 0) + wire.opcua.get("PublishRequest", 0) > 0


def test_the_hostile_requests_get_nothing(wire: Wire) -> None:
    attack = wire.attack
    assert set(attack["write_shaped"].values()) == {405}, attack["write_shaped"]
    for name, first_line in attack["malformed"].items():
        assert first_line == "closed" or re.fullmatch(r"HTTP/1\.[01] 4\d\d .*", first_line), (
            name, first_line,
        )  # fmt: skip
    assert set(attack["attempts"].values()) == {"timeout"}, attack["attempts"]
    assert attack["open_ports"] == [API_PORT]  # the scan finds what is open: only the API
    assert attack["flood"]["snapshots"] > 0  # a consumer was served all through the flood


def test_the_ruleset_counts_the_hostile_attempts_dropped(wire: Wire) -> None:
    attack, before, after = wire.attack, wire.counters_before, wire.counters_after
    rose = {name: after[name] - before[name] for name in after}
    # at the appliance: a SYN for each closed port scanned, the Modbus write and the OPC UA
    # Hello's SYNs, the flood's UDP spray
    at_appliance = attack["scanned"] - len(attack["open_ports"]) + 2 + attack["flood"]["udp_sent"]
    assert rose["it_dropped"] >= at_appliance, (rose, at_appliance)
    # routed at the OT servers: two SYNs and the UDP spray
    assert rose["forward_dropped"] >= 2 + attack["udp_sent"], rose
    # and the plant half itself sent nothing to the OT side that the ruleset refused
    assert after["ot_dropped"] == 0, after


def test_the_ot_poll_rate_stays_within_the_budget_during_the_flood(wire: Wire) -> None:
    def rate(window: list[float]) -> tuple[int, float]:
        start, end = window
        return sum(start <= t <= end for t, _ in wire.modbus), end - start

    base_count, base_s = rate(wire.attack["baseline"])
    flood_count, flood_s = rate(wire.attack["flood"]["window"])
    assert wire.attack["flood"]["opened"] > 100, wire.attack["flood"]  # it was a flood
    # request starts are spaced 1/budget apart: never more than budget x window + 1
    assert flood_count <= DEFAULT_MAX_REQUESTS_PER_S * flood_s + 1
    assert base_count <= DEFAULT_MAX_REQUESTS_PER_S * base_s + 1
    # and the flood did not slow the polls either (16/s expected; generous for 2 busy cores)
    assert 0.6 <= (flood_count / flood_s) / (base_count / base_s) <= 1.4, (
        base_count, base_s, flood_count, flood_s,
    )  # fmt: skip

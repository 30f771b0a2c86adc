"""Proof on the wire: with the ruleset `dmzbroker deploy nftables` writes, no packet from the
IT side reaches the OT network, whatever the IT side sends, and the plant is polled at the
pace its policy allows.

Topology (three network namespaces this module creates and removes; names carry the pid;
IPv6 on everywhere):

    OT namespace                        appliance namespace              IT namespace
    2001:db8:0:1::10 Modbus, polled     plant + enterprise halves        198.51.100.10
    192.0.2.10  the same simulator      forwarding on (both families),   2001:db8:2::10
    192.0.2.11  OPC UA (asyncua)        rp_filter off, nftables loaded   consumer, attackers
    192.0.2.20, 2001:db8:0:1::20        192.0.2.1 2001:db8:0:1::1        routes to the OT
      an OT host in no policy           198.51.100.1 2001:db8:2::1       networks via the
         plc<pid> ───── veth ───── ot<pid>        it<pid> ───── veth ───── con<pid> appliance

The OT servers' default routes point at the appliance too, so nothing but the ruleset
stops a forwarded connection (the first control shows one getting through without it, in
both families). A capture (scapy, inside the OT namespace) covers the consumer's reads and
the whole hostile phase: write-shaped API requests, malformed HTTP, Modbus write frames and
OPC UA Hellos at the appliance's addresses (its OT ones through the IT NIC too) and routed at
the OT hosts over IPv4 and IPv6, UDP, a port scan, a connection flood while the Modbus server
times every request it gets; then hand-made packets (scapy): SYNs with OT source addresses,
segments without a plain SYN, fragments, and ICMP errors quoting the plant's own OT
connections. The capture classifier accepts only the flows the appliance opened to a policy
device's address and port, and ARP/ND among OT addresses. The ruleset is the generator's
default (consumers from any source), which is the one an attacker meets first.

The halves run as root with `plant` and `enterprise` (each half's own user is
test_install's subject; hence `--ot-user root`); root is needed for the namespaces, and the
module is skipped, saying so, without it or without `ip`, `nft` or `sysctl`.
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

from broker.policy.device_schema import DEFAULT_MAX_REQUESTS_PER_S
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
APPLIANCE_OT, PLC, UA_SERVER, OT_HOST = "192.0.2.1", "192.0.2.10", "192.0.2.11", "192.0.2.20"
APPLIANCE_OT6, PLC6, OT_HOST6 = "2001:db8:0:1::1", "2001:db8:0:1::10", "2001:db8:0:1::20"
APPLIANCE_IT, CONSUMER = "198.51.100.1", "198.51.100.10"
APPLIANCE_IT6, CONSUMER6 = "2001:db8:2::1", "2001:db8:2::10"
OT_ADDRESSES = {APPLIANCE_OT, PLC, UA_SERVER, OT_HOST}  # who may ARP on the OT link
OT_ADDRESSES6 = {APPLIANCE_OT6, PLC6, OT_HOST6}
# the policy's devices: the Modbus one polled over IPv6, the OPC UA one over IPv4
DEVICES = {(PLC6, 502), (UA_SERVER, 4840)}
OT_IFACE, IT_IFACE = f"ot{PID}", f"it{PID}"  # the appliance's two NICs
API_PORT = 8443  # the shipped default; the namespace's ports are its own
API = f"https://{APPLIANCE_IT}:{API_PORT}"
MODBUS_SIGNAL = "coldstore/machine-room/compressor-1/suction_pressure"
UA_SIGNAL = "coldstore/ua/plc/power"
CHILL_ROOM = "coldstore/storage/cold-room-2"  # the demo room controller's asset, left out
POLL_INTERVAL_S = 0.5  # the demo's 8 requests a scan: 16 requests/s, inside the default budget
WRITE_CODES = {5, 6, 15, 16, 22, 23}
PEERS = ("-m", "tests.deployment.wire_peers")


@dataclass
class Wire:
    """What one run saw: the controls, the attacker's report, the counters, the capture and
    what the OT servers received."""

    forwarded_without_ruleset: dict[str, str]  # target -> result
    forwarded_with_ruleset: dict[str, str]
    consumed: dict[str, Any]
    consumed_after: dict[str, Any]
    attack: dict[str, Any]
    crafted: dict[str, int]  # packets sent by the counter that should see them
    counters_before: dict[str, int]
    counters_after: dict[str, int]  # after the attack, before the crafted packets
    counters_crafted: dict[str, int]  # after the crafted packets
    icmp_received: dict[str, int]  # the appliance's ICMP input while the crafted ones came
    packets: list[Any]
    modbus: list[tuple[float, int]]  # (monotonic arrival, function code)
    opcua: dict[str, int]  # service requests by name
    halves_running: bool


def policy_document() -> dict[str, Any]:
    """The demo policy at the OT Modbus server, at the default budget, plus one OPC UA device.
    Without the demo's BACnet room controller (on loopback, not on this OT link): its chill
    room asset and signals go with it (tests/deployment/test_nftables.py covers BACnet's UDP)."""
    document = demo_policy(MODBUS_PORT, poll_interval_s=POLL_INTERVAL_S)
    document["devices"] = [d for d in document["devices"] if d["protocol"] != "bacnet"]
    document["signals"] = [s for s in document["signals"] if s.get("device") != "room-controller"]
    document["assets"] = [a for a in document["assets"] if a["path"] != CHILL_ROOM]
    document["devices"][0].update(host=PLC6, max_requests_per_s=DEFAULT_MAX_REQUESTS_PER_S)
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


ICMP_IN = ("InDestUnreachs", "InRedirects", "Icmp6InPktTooBigs")


def icmp_in(appliance: Namespace) -> dict[str, int]:
    """The appliance's ICMP input counters (its own /proc/net/snmp{,6}): what got past the
    ruleset into the stack."""
    v4 = appliance.run("cat", "/proc/net/snmp").splitlines()
    names, values = (line.split()[1:] for line in v4 if line.startswith("Icmp:"))
    seen = dict(zip(names, map(int, values), strict=True))
    for line in appliance.run("cat", "/proc/net/snmp6").splitlines():
        name, value = line.split()
        seen[name] = int(value)
    return {name: seen[name] for name in ICMP_IN}


def plant_connections(appliance: Namespace) -> list[str]:
    """The plant's established connection to each device, as `--quote` JSON."""
    found = {}
    for line in appliance.run("ss", "-Htn", "state", "established").splitlines():
        local, remote = (_split(text) for text in line.split()[2:4])
        if remote in DEVICES:
            found[remote] = json.dumps([*local, *remote])
    assert found.keys() == DEVICES, f"the plant is not connected to every device: {found}"
    return list(found.values())


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def peer(space: Namespace, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Runs a wire_peers command inside `space` to its end; its JSON report."""
    output: dict[str, Any] = json.loads(
        space.run(sys.executable, *PEERS, *args, timeout=timeout).splitlines()[-1]
    )
    return output


def build(ot: Namespace, appliance: Namespace, it: Namespace) -> None:
    # so that only the ruleset stops forwarding, spoofed sources included
    appliance.sysctl(
        "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
    )  # fmt: skip
    veth(appliance, OT_IFACE, ot, f"plc{PID}")
    veth(appliance, IT_IFACE, it, f"con{PID}")
    appliance.up(OT_IFACE, f"{APPLIANCE_OT}/24", f"{APPLIANCE_OT6}/64")
    appliance.up(IT_IFACE, f"{APPLIANCE_IT}/24", f"{APPLIANCE_IT6}/64")
    ot.up(f"plc{PID}", *(f"{a}/24" for a in (PLC, UA_SERVER, OT_HOST)),
          *(f"{a}/64" for a in (PLC6, OT_HOST6)))  # fmt: skip
    it.up(f"con{PID}", f"{CONSUMER}/24", f"{CONSUMER6}/64")
    ot.route("default", APPLIANCE_OT)
    ot.route("default", APPLIANCE_OT6)
    it.route("192.0.2.0/24", APPLIANCE_IT)  # as an attacker would
    it.route("2001:db8:0:1::/64", APPLIANCE_IT6)


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory, pki: Pki, owners: Owners) -> Wire:
    from scapy.all import rdpcap  # noqa: PLC0415 - slow import, root-only module

    directory = tmp_path_factory.mktemp("wire")
    opcua = make_pki(directory / "opcua-pki")
    config = appliance_config(directory, pki, owners, opcua)
    ruleset = directory / "ruleset.nft"
    dmzbroker("deploy", "nftables", "--config", str(config), "--ot-interface", OT_IFACE,
              "--it-interface", IT_IFACE, "--ot-user", "root", "--out", str(ruleset))  # fmt: skip
    client = json.dumps({"ca": str(pki.ca), "cert": str(pki.client_cert),
                         "key": str(pki.client_key)})  # fmt: skip
    consume = ("consume", "--api", API, "--tls", client, "--signal", MODBUS_SIGNAL,
               "--signal", UA_SIGNAL)  # fmt: skip
    stats, pcap = directory / "ot-stats.json", directory / "ot.pcap"
    names = (f"dmzw{PID}-ot", f"dmzw{PID}-app", f"dmzw{PID}-it")
    with namespaces(*names) as (ot, appliance, it):
        build(ot, appliance, it)
        servers = ot.python(*PEERS, "ot", "--opcua", UA_SERVER,
                            "--pki", json.dumps({k: str(v) for k, v in asdict(opcua).items()}),
                            "--stats", str(stats), log=directory / "ot.log")  # fmt: skip
        targets = ("--target", f"{PLC}:{MODBUS_PORT}", "--target", f"[{PLC6}]:{MODBUS_PORT}")
        without = peer(it, "probe", *targets)
        appliance.run("nft", "-f", str(ruleset))
        with_ruleset = peer(it, "probe", *targets)
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
        routed = (f"{PLC}:{MODBUS_PORT}", f"{UA_SERVER}:{OPCUA_PORT}", f"[{PLC6}]:{MODBUS_PORT}",
                  f"{OT_HOST}:{MODBUS_PORT}", f"[{OT_HOST6}]:{MODBUS_PORT}")  # fmt: skip
        attack = peer(it, "attack", "--api", API, "--tls", client,
                      *(f"--ot={target}" for target in routed),
                      "--appliance-ot", APPLIANCE_OT, "--appliance-ot", APPLIANCE_OT6)  # fmt: skip
        after = counters(appliance)
        quotes = plant_connections(appliance)
        icmp_before = icmp_in(appliance)
        crafted = peer(it, "craft",
                       "--source", CONSUMER, "--source", CONSUMER6,
                       "--spoof", PLC, "--spoof", OT_HOST, "--spoof", PLC6, "--spoof", OT_HOST6,
                       *(f"--consumer={a}:{API_PORT}" for a in (APPLIANCE_IT, APPLIANCE_OT)),
                       *(f"--consumer=[{a}]:{API_PORT}" for a in (APPLIANCE_IT6, APPLIANCE_OT6)),
                       *(f"--routed={target}" for target in routed),
                       "--appliance-ot", APPLIANCE_OT, "--appliance-ot", APPLIANCE_OT6,
                       *(f"--quote={quote}" for quote in quotes))  # fmt: skip
        icmp_after = icmp_in(appliance)
        crafted_counters = counters(appliance)
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
        crafted=crafted,
        counters_before=before,
        counters_after=after,
        counters_crafted=crafted_counters,
        icmp_received={name: icmp_after[name] - icmp_before[name] for name in ICMP_IN},
        packets=list(rdpcap(str(pcap))),
        modbus=[(t, fc) for t, fc in seen["modbus"]],
        opcua=seen["opcua"],
        halves_running=running,
    )


def test_only_the_ruleset_stops_forwarding(wire: Wire) -> None:
    """The control: the appliance forwards IT to OT, IPv4 and IPv6, until the ruleset is
    loaded."""
    assert set(wire.forwarded_without_ruleset.values()) == {"connected"}, wire
    assert set(wire.forwarded_with_ruleset.values()) == {"timeout"}, wire


def test_the_consumer_gets_good_records_from_both_devices_before_and_after(wire: Wire) -> None:
    good = {MODBUS_SIGNAL: "good", UA_SIGNAL: "good"}
    assert wire.consumed["quality"] == good, wire.consumed
    assert wire.consumed_after["quality"] == good, wire.consumed_after
    assert wire.halves_running


def link_chatter(packet: Any) -> bool:
    """ARP among OT addresses, or IPv6 neighbour discovery / multicast listener messages
    that only the OT link's own hosts can send (link-local or OT sources, hop limit 255 or
    1, which no forwarded packet has)."""
    from scapy.layers import inet6  # noqa: PLC0415
    from scapy.layers.l2 import ARP  # noqa: PLC0415

    if ARP in packet:
        return {packet[ARP].psrc, packet[ARP].pdst} <= OT_ADDRESSES
    kinds = (inet6.ICMPv6ND_RS, inet6.ICMPv6ND_RA, inet6.ICMPv6ND_NS, inet6.ICMPv6ND_NA,
             inet6.ICMPv6MLQuery, inet6.ICMPv6MLReport, inet6.ICMPv6MLDone,
             inet6.ICMPv6MLQuery2, inet6.ICMPv6MLReport2)  # fmt: skip
    if inet6.IPv6 not in packet or not any(kind in packet for kind in kinds):
        return False
    ip6 = packet[inet6.IPv6]

    def on_link(address: str, multicast: bool) -> bool:
        a = ipaddress.ip_address(address)
        return address in OT_ADDRESSES6 or a.is_link_local or (
            a.is_multicast and multicast and a in ipaddress.ip_network("ff02::/16")
        ) or (a.is_unspecified and not multicast)  # fmt: skip

    return ip6.hlim in (1, 255) and on_link(ip6.src, False) and on_link(ip6.dst, True)


def classify(packets: list[Any]) -> tuple[list[str], dict[str, int]]:
    """Strays (packet summaries) and, per device address, the appliance's segments with a
    payload. Legitimate: a TCP flow the appliance opened (its SYN seen) from an OT address of
    its own to a policy device's address and port, both directions, never a SYN-ACK from the
    appliance; and link chatter. Everything else is a stray: anything from an IT address, a
    reflection of a spoofed SYN, the consumer port, a host in no policy."""
    from scapy.layers.inet import IP, TCP  # noqa: PLC0415
    from scapy.layers.inet6 import IPv6  # noqa: PLC0415

    ours = {APPLIANCE_OT, APPLIANCE_OT6}
    opened: set[tuple[str, int, str, int]] = set()
    strays, polls = [], {address: 0 for address, _ in DEVICES}
    for packet in packets:
        if link_chatter(packet):
            continue
        ip, tcp = packet.getlayer(IP) or packet.getlayer(IPv6), packet.getlayer(TCP)
        if ip is not None and tcp is not None:
            outbound = (ip.src, tcp.sport, ip.dst, tcp.dport)
            if ip.src in ours and not (tcp.flags.S and tcp.flags.A):
                if tcp.flags == "S" and (ip.dst, tcp.dport) in DEVICES:
                    opened.add(outbound)
                if outbound in opened:
                    polls[ip.dst] += bool(bytes(tcp.payload))
                    continue
            if (ip.dst, tcp.dport, ip.src, tcp.sport) in opened:  # the device's answers
                continue
        strays.append(packet.summary())
    return strays, polls


def test_no_packet_from_the_it_side_reaches_the_ot_link(wire: Wire) -> None:
    strays, polls = classify(wire.packets)
    assert strays == []
    # the capture saw the appliance polling both devices: it was looking at the right link
    assert polls[PLC6] > 20 and polls[UA_SERVER] > 2, polls


def test_the_classifier_calls_reflections_and_it_traffic_strays() -> None:
    """The classifier itself, on packets the wire must never carry."""
    from scapy.layers.inet import IP, TCP  # noqa: PLC0415
    from scapy.layers.inet6 import IPv6  # noqa: PLC0415
    from scapy.layers.l2 import Ether  # noqa: PLC0415

    good = [Ether() / IPv6(src=APPLIANCE_OT6, dst=PLC6) / TCP(sport=40000, dport=502, flags=f)
            for f in ("S", "A")]  # fmt: skip
    bad = [
        IP(src=APPLIANCE_IT, dst=PLC) / TCP(sport=API_PORT, dport=4444, flags="SA"),
        IP(src=APPLIANCE_OT, dst=OT_HOST) / TCP(sport=API_PORT, dport=4444, flags="SA"),
        IP(src=APPLIANCE_OT, dst=UA_SERVER) / TCP(sport=40001, dport=4840, flags="A"),
        IP(src=CONSUMER, dst=PLC) / TCP(sport=40002, dport=502, flags="A"),
        IP(src=OT_HOST, dst=PLC) / TCP(sport=40003, dport=502, flags="S"),
        IPv6(src=CONSUMER6, dst=PLC6, hlim=63) / TCP(sport=40000, dport=502, flags="S"),
        IPv6(src=APPLIANCE_OT6, dst=PLC6) / TCP(sport=40000, dport=502, flags="SA"),
    ]
    strays, _ = classify([*good, *(Ether() / packet for packet in bad)])
    assert len(strays) == len(bad), strays


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
    # at the appliance: a SYN for each closed port scanned, the Modbus writes' and the OPC UA
    # Hellos' SYNs, the flood's UDP spray
    at_appliance = (
        attack["scanned"] - len(attack["open_ports"]) + attack["at_appliance"]
        + attack["flood"]["udp_sent"]
    )  # fmt: skip
    assert rose["it_dropped"] >= at_appliance, (rose, at_appliance)
    # routed at the OT hosts, IPv4 and IPv6: a SYN each, and the UDP spray
    assert rose["forward_dropped"] >= attack["routed"] + attack["udp_sent"], rose


def test_the_ruleset_drops_and_counts_every_crafted_packet(wire: Wire) -> None:
    """Spoofed OT sources are refused where they enter (reverse path), before anything can
    answer them onto the OT link; the rest is counted by where it was going."""
    crafted, before, after = wire.crafted, wire.counters_after, wire.counters_crafted
    assert "spoofed_dropped" in after, f"the ruleset counts no reverse-path drops: {after}"
    rose = {name: after[name] - before.get(name, 0) for name in after}
    assert crafted["spoofed"] > 0 and rose["spoofed_dropped"] >= crafted["spoofed"], rose
    assert rose["it_dropped"] >= crafted["at_appliance"], (rose, crafted)
    assert rose["forward_dropped"] >= crafted["routed"], (rose, crafted)


def test_icmp_errors_from_the_it_side_never_reach_the_plants_connections(wire: Wire) -> None:
    """Fragmentation needed, a redirect and IPv6 packet-too-big quoting the plant's own OT
    connections, sent into the IT NIC: none got past the ruleset (a shared connection
    tracking table would call them `related` and let them change the OT route's MTU)."""
    assert wire.icmp_received == dict.fromkeys(ICMP_IN, 0), wire.icmp_received


def test_the_plant_half_sends_nothing_the_ruleset_refuses(wire: Wire) -> None:
    """With IPv6 on, the appliance's own neighbour discovery and multicast listener reports
    included."""
    assert wire.counters_crafted["ot_dropped"] == 0, wire.counters_crafted


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

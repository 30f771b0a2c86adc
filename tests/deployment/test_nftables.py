"""The two-NIC ruleset: what it allows, that nft accepts it, that the shipped example is the
generator's output, the CLI's errors, and, as root, real packets through it in namespaces."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import config, policy
from broker.deployment import nftables
from broker.errors import ConfigError
from tests.deployment import netns
from tests.harness import (
    REPO,
    Owners,
    Pki,
    demo_policy,
    dmzbroker,
    sign_policy,
    stop_process,
    write_config,
    write_policy_yaml,
)

EXAMPLE = REPO / "deploy" / "nftables"
EXAMPLE_ALLOW = "198.51.100.0/24"  # the --it-allow the example was written with (README)
NFT = shutil.which("nft")
needs_nft = pytest.mark.skipif(NFT is None, reason="nft (Debian nftables) is not installed")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or bool(netns.MISSING_TOOLS),
    reason=f"network namespaces need root and {', '.join(netns.MISSING_TOOLS) or 'ip, nft'}",
)


def _devices() -> list[dict[str, Any]]:
    return [
        {"name": "plc-1", "protocol": "modbus", "host": "192.0.2.10", "port": 502},
        # glibc's inet_aton form of 192.0.2.11: a name to getaddrinfo, resolved without DNS
        {"name": "plc-2", "protocol": "modbus", "host": "3221225995", "port": 5020},
        {"name": "scada", "protocol": "opcua", "endpoint": "opc.tcp://[2001:db8::20]:4841/ua"},
        {"name": "historian", "protocol": "opcua", "endpoint": "opc.tcp://192.0.2.30"},
    ]


def _policy(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The demo policy's signals, all on the first device (Modbus), with these devices: its
    BACnet room controller's values become coils (binary objects) and registers."""
    document = demo_policy(502, devices=devices)
    first = devices[0]["name"]
    for address, signal in enumerate(document["signals"], start=1000):
        if signal.get("device") is not None:
            signal["device"] = first
            source = signal["source"]
            if "object_type" in source:
                binary = source["object_type"].startswith("binary")
                table, type_ = ("coil", "bool") if binary else ("input_register", "int16")
                signal["source"] = {"table": table, "address": address, "type": type_}
    return document


def _config(directory: Path, envelope: Path, pki: Pki, owners: Owners, **extra: Any) -> Path:
    path = write_config(directory, envelope, pki, 8443, owners)
    document = yaml.safe_load(path.read_text())
    tls = {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}
    document["enterprise"]["mqtt"] = {"host": "198.51.100.20", "identity": "x", **tls}
    document["audit"]["siem"] = {"host": "2001:db8:1::30", "port": 6514, **tls}
    for section, changes in extra.items():
        document.setdefault(section, {}).update(changes)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def signed(tmp_path: Path, pki: Pki, owners: Owners) -> Path:
    """A config naming an MQTT broker, a SIEM and a diode receiver, and a co-signed policy
    with four devices."""
    envelope = sign_policy(tmp_path, _policy(_devices()), [owners.ot_key, owners.it_key])
    diode = {"host": "198.51.100.40", "port": 7600, "state_dir": "diode"}
    listen = {"listen": {"host": "0.0.0.0", "port": 8443}}
    return _config(tmp_path, envelope, pki, owners, diode=diode, enterprise=listen)


def _rules(text: str, chain: str) -> list[str]:
    """The rules of one chain, without comments."""
    body = text.split(f"\tchain {chain} {{\n", 1)[1].split("\n\t}", 1)[0]
    return [line.strip() for line in body.splitlines() if not line.strip().startswith("#")]


def test_each_side_allows_only_what_the_config_and_policy_name(signed: Path) -> None:
    cfg = config.load(signed)
    loaded = policy.load(signed.parent / "policy.yaml")
    text = nftables.write(cfg, loaded, ot_interface="enp1s0", it_interface="enp2s0").text

    owner = 'meta skuid "dmzbroker-plant"'
    assert _rules(text, "ot_out") == [
        "jump link_out",
        "ct state established,related accept",
        f"{owner} ip daddr 192.0.2.10 tcp dport 502 ct state new accept "
        'comment "policy devices[plc-1].host"',
        f"{owner} ip daddr 192.0.2.11 tcp dport 5020 ct state new accept "
        'comment "policy devices[plc-2].host"',
        f"{owner} ip6 daddr 2001:db8::20 tcp dport 4841 ct state new accept "
        'comment "policy devices[scada].endpoint"',
        f"{owner} ip daddr 192.0.2.30 tcp dport 4840 ct state new accept "  # OPC UA's default
        'comment "policy devices[historian].endpoint"',
        'counter name "ot_dropped" drop',
    ]
    assert "# policy devices[plc-2].host: 3221225995, resolved to 192.0.2.11" in text
    # the diode receiver's address is never this host's on the OT host: the rule opens
    # nothing there, and lets the datagrams in on the IT host of a diode pair
    assert _rules(text, "ot_in") == [
        'icmp type redirect counter name "ot_dropped" drop',
        'icmpv6 type nd-redirect counter name "ot_dropped" drop',
        "jump link_in",
        "ct state established,related accept",
        'ip daddr 198.51.100.40 udp dport 7600 ct state new accept comment "config diode.host"',
        'counter name "ot_dropped" drop',
    ]
    assert _rules(text, "it_in") == [
        'icmp type redirect counter name "it_dropped" drop',
        'icmpv6 type nd-redirect counter name "it_dropped" drop',
        "jump link_in",
        "ct state established,related accept",
        # listen.host is 0.0.0.0: only this NIC's own addresses, not the OT NIC's
        "fib daddr . iif type local tcp dport 8443 tcp flags & (fin|syn|rst|ack) == syn "
        'ct state new accept comment "consumer port"',
        'counter name "it_dropped" drop',
    ]
    assert _rules(text, "it_out") == [
        "jump link_out",
        "ct state established,related accept",
        "ip daddr 198.51.100.20 tcp dport 8883 ct state new accept "
        'comment "config enterprise.mqtt.host"',
        'ip6 daddr 2001:db8:1::30 tcp dport 6514 ct state new accept comment "config audit.siem.host"',
        'ip daddr 198.51.100.40 udp dport 7600 ct state new accept comment "config diode.host"',
        'counter name "it_dropped" drop',
    ]
    assert _rules(text, "forward") == [
        "type filter hook forward priority filter; policy drop;",
        'counter name "forward_dropped" drop',
    ]
    for hook, match, side in (("input", "iif", "in"), ("output", "oif", "out")):
        assert _rules(text, hook) == [
            f"type filter hook {hook} priority filter; policy drop;",
            f'{match} "lo" accept comment "the two halves and local tools"',
            f'{match}name vmap {{ "enp1s0" : jump ot_{side}, "enp2s0" : jump it_{side} }}',
            'counter name "other_dropped" drop',
        ]
    assert _rules(text, "raw_prerouting") == [
        "type filter hook prerouting priority raw; policy accept;",
        'iifname "enp1s0" ct zone set 1',
        'iifname "enp2s0" ct zone set 2',
        'fib saddr . iif oif missing counter name "spoofed_dropped" drop',
    ]
    assert _rules(text, "raw_output") == [
        "type filter hook output priority raw; policy accept;",
        'oifname "enp1s0" ct zone set 1',
        'oifname "enp2s0" ct zone set 2',
    ]
    # nothing accepted without a connection state, loopback or a link-only hop limit
    rules = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    accepts = [rule for rule in rules if " accept" in rule and "policy accept" not in rule]
    assert len(accepts) == 19
    assert all("ct state" in r or '"lo"' in r or "hoplimit" in r for r in accepts)


def _ot_protocols_ruleset(tmp_path: Path, pki: Pki, owners: Owners, **write: Any) -> str:
    """The ruleset of a policy with a Modbus device, a DNP3 outstation and two BACnet/IP
    devices (one IPv6, on another port), a signal on each."""
    devices = [
        {"name": "plc-1", "protocol": "modbus", "host": "192.0.2.10", "port": 502},
        {"name": "rtu", "protocol": "dnp3", "host": "192.0.2.50", "outstation_address": 10},
        {"name": "ahu", "protocol": "bacnet", "host": "192.0.2.60", "device_instance": 1},
        {"name": "vav", "protocol": "bacnet", "host": "2001:db8::61", "port": 47809,
         "device_instance": 2},
    ]  # fmt: skip
    sources: list[dict[str, Any]] = [
        {"table": "input_register", "address": 0, "type": "int16"},
        {"group": 30, "index": 0},
        {"object_type": "analog-input", "instance": 1},
        {"object_type": "binary-input", "instance": 1},
    ]
    signals = [
        {"path": f"coldstore/plant/{d['name']}/value", "device": d["name"], "source": source}
        for d, source in zip(devices, sources, strict=True)
    ]
    document = demo_policy(502, devices=devices, signals=signals, assets=[])
    document["roles"] = [{"name": "historian", "signals": ["coldstore/**"]}]
    document["consumers"] = document["consumers"][:1]
    envelope = sign_policy(tmp_path, document, [owners.ot_key, owners.it_key])
    cfg = config.load(_config(tmp_path, envelope, pki, owners))
    return nftables.write(cfg, policy.load(tmp_path / "policy.yaml"), **write).text


def test_a_dnp3_device_is_reached_over_tcp_and_a_bacnet_device_over_udp(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    text = _ot_protocols_ruleset(tmp_path, pki, owners)

    owner = 'meta skuid "dmzbroker-plant"'
    assert _rules(text, "ot_out")[2:-1] == [
        f"{owner} ip daddr 192.0.2.10 tcp dport 502 ct state new accept "
        'comment "policy devices[plc-1].host"',
        f"{owner} ip daddr 192.0.2.50 tcp dport 20000 ct state new accept "
        'comment "policy devices[rtu].host"',
        f"{owner} ip daddr 192.0.2.60 udp dport 47808 ct state new accept "
        'comment "policy devices[ahu].host"',
        f"{owner} ip6 daddr 2001:db8::61 udp dport 47809 ct state new accept "
        'comment "policy devices[vav].host"',
    ]
    # a BACnet device's answers and notifications come back as replies of the plant's own
    # datagrams (conntrack): nothing from the OT network is let in as new
    assert not [rule for rule in _rules(text, "ot_in") if "47808" in rule or "20000" in rule]


@needs_nft
def test_nft_accepts_the_ruleset_with_dnp3_and_bacnet_devices(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    ruleset = tmp_path / "dmzbroker.nft"
    ruleset.write_text(_ot_protocols_ruleset(tmp_path, pki, owners, ot_users=["root"]))
    netns.run([str(NFT), "-c", "-f", str(ruleset)])


HEAD_IN = [
    'icmp type redirect counter name "it_dropped" drop',
    'icmpv6 type nd-redirect counter name "it_dropped" drop',
    "jump link_in",
    "ct state established,related accept",
]
SYN = "tcp flags & (fin|syn|rst|ack) == syn ct state new accept"


def test_it_allow_narrows_the_consumer_port_per_family(signed: Path) -> None:
    cfg = config.load(signed)
    loaded = policy.load(signed.parent / "policy.yaml")
    allow = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "2001:db8:2::/48", "10.1.2.3")]
    rules = _rules(nftables.write(cfg, loaded, it_allow=allow).text, "it_in")
    own = "fib daddr . iif type local tcp dport 8443"
    assert rules == [
        *HEAD_IN,
        f'ip saddr {{ 198.51.100.0/24, 10.1.2.3/32 }} {own} {SYN} comment "consumer port"',
        f'ip6 saddr 2001:db8:2::/48 {own} {SYN} comment "consumer port"',
        'counter name "it_dropped" drop',
    ]


def test_a_specific_listen_address_is_the_only_consumer_destination(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    envelope = sign_policy(tmp_path, _policy(_devices()), [owners.ot_key, owners.it_key])
    listen = {"listen": {"host": "198.51.100.1", "port": 8443}}
    cfg = config.load(_config(tmp_path, envelope, pki, owners, enterprise=listen))
    loaded = policy.load(tmp_path / "policy.yaml")
    allow = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "2001:db8:2::/48")]
    rules = _rules(nftables.write(cfg, loaded, it_allow=allow).text, "it_in")
    assert rules == [  # an IPv6 source can never reach an IPv4 listen address: no rule
        *HEAD_IN,
        f'ip saddr 198.51.100.0/24 ip daddr 198.51.100.1 tcp dport 8443 {SYN} comment "consumer port"',
        'counter name "it_dropped" drop',
    ]


def _with_outputs(
    tmp_path: Path, pki: Pki, owners: Owners, opcua_host: str, **postgres: Any
) -> config.BrokerConfig:
    """The `signed` appliance with a PostgreSQL historian and an OPC UA server as well."""
    envelope = sign_policy(tmp_path, _policy(_devices()), [owners.ot_key, owners.it_key])
    login = {"user": "dmzbroker_sink", "cert": str(pki.client_cert), "key": str(pki.client_key)}
    historian = {"host": "198.51.100.25", "database": "historian", "ca": str(pki.ca),
                 "identity": "x", **login, **postgres}  # fmt: skip
    opcua = {"host": opcua_host, "port": 4850, "certificate": str(pki.server_cert),
             "private_key": str(pki.server_key)}  # fmt: skip
    enterprise = {"listen": {"host": "0.0.0.0", "port": 8443}, "postgres": historian,
                  "opcua": opcua}  # fmt: skip
    return config.load(_config(tmp_path, envelope, pki, owners, enterprise=enterprise))


def test_the_historian_is_reached_and_the_opcua_port_admitted_like_the_consumer_port(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    cfg = _with_outputs(tmp_path, pki, owners, "0.0.0.0", port=5433)
    loaded = policy.load(tmp_path / "policy.yaml")
    allow = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "2001:db8:2::/48")]
    text = nftables.write(cfg, loaded, it_allow=allow).text
    assert _rules(text, "it_out") == [
        "jump link_out",
        "ct state established,related accept",
        "ip daddr 198.51.100.20 tcp dport 8883 ct state new accept "
        'comment "config enterprise.mqtt.host"',
        "ip daddr 198.51.100.25 tcp dport 5433 ct state new accept "
        'comment "config enterprise.postgres.host"',
        'ip6 daddr 2001:db8:1::30 tcp dport 6514 ct state new accept comment "config audit.siem.host"',
        'counter name "it_dropped" drop',
    ]
    own = "fib daddr . iif type local tcp dport"
    assert _rules(text, "it_in") == [
        *HEAD_IN,
        f'ip saddr 198.51.100.0/24 {own} 8443 {SYN} comment "consumer port"',
        f'ip6 saddr 2001:db8:2::/48 {own} 8443 {SYN} comment "consumer port"',
        f'ip saddr 198.51.100.0/24 {own} 4850 {SYN} comment "OPC UA port"',
        f'ip6 saddr 2001:db8:2::/48 {own} 4850 {SYN} comment "OPC UA port"',
        'counter name "it_dropped" drop',
    ]
    # the historian is an IT-side sink: no device may claim its address
    devices = _devices()
    devices[1]["host"] = "198.51.100.25"
    bad = policy.load(write_policy_yaml(tmp_path, _policy(devices), "historian-address"))
    with pytest.raises(ConfigError, match=r"is the address of config enterprise\.postgres\.host"):
        nftables.write(cfg, bad)


def test_a_specific_opcua_address_is_its_only_destination(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    cfg = _with_outputs(tmp_path, pki, owners, "2001:db8:2::1")
    loaded = policy.load(tmp_path / "policy.yaml")
    rules = _rules(nftables.write(cfg, loaded).text, "it_in")
    assert [rule for rule in rules if "4850" in rule] == [
        f'ip6 daddr 2001:db8:2::1 tcp dport 4850 {SYN} comment "OPC UA port"'
    ]


def test_a_loopback_opcua_server_opens_nothing_on_the_it_side(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    cfg = _with_outputs(tmp_path, pki, owners, "127.0.0.1")  # the config's default
    text = nftables.write(cfg, policy.load(tmp_path / "policy.yaml")).text
    assert "dport 4850" not in text
    assert "# No rule for the OPC UA port: config enterprise.opcua.host is 127.0.0.1" in text
    assert [rule for rule in _rules(text, "it_in") if "accept" in rule] == [
        "ct state established,related accept",
        f'fib daddr . iif type local tcp dport 8443 {SYN} comment "consumer port"',
    ]


@needs_nft
def test_nft_accepts_the_ruleset_with_the_historian_and_the_opcua_port(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    for host in ("0.0.0.0", "198.51.100.1", "::"):
        cfg = _with_outputs(tmp_path, pki, owners, host)
        allow = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:2::/48")]
        text = nftables.write(cfg, policy.load(tmp_path / "policy.yaml"), it_allow=allow,
                              ot_users=["root"]).text  # fmt: skip
        assert 'comment "OPC UA port"' in text
        ruleset = tmp_path / "dmzbroker.nft"
        ruleset.write_text(text)
        netns.run([str(NFT), "-c", "-f", str(ruleset)])


def test_only_the_ot_users_open_connections_to_the_devices(signed: Path) -> None:
    cfg = config.load(signed)
    loaded = policy.load(signed.parent / "policy.yaml")
    users = ["dmzbroker-plant", "0", "dmzbroker-diode", "0"]
    rules = _rules(nftables.write(cfg, loaded, ot_users=users).text, "ot_out")
    devices = [rule for rule in rules if "daddr" in rule]
    assert len(devices) == 4
    assert all(
        r.startswith('meta skuid { "dmzbroker-plant", 0, "dmzbroker-diode" } ') for r in devices
    )
    # the sinks and the diode's datagrams in are not the plant's: no user match there
    assert "skuid" not in "".join(_rules(nftables.write(cfg, loaded).text, "it_out"))


@pytest.mark.parametrize(
    "value", ["", "-x", "1x", "a b", 'a"b', "a" * 33, "4294967295", "x;drop", "\u0661"]
)
def test_bad_users_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        nftables.user(value)


def test_users_and_uids_are_accepted() -> None:
    assert [nftables.user(v) for v in ("dmzbroker-plant", "_x.y", "0", "007", "4294967294")] == [
        "dmzbroker-plant",
        "_x.y",
        "0",
        "7",
        "4294967294",
    ]


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("0.0.0.0", "'0.0.0.0' is the unspecified address"),
        ("::", "'::' is the unspecified address"),
        ("127.0.0.1", "'127.0.0.1' is a loopback address"),
        ("localhost", "'localhost' (127.0.0.1) is a loopback address"),
        ("::1", "'::1' is a loopback address"),
        ("224.0.0.1", "is a multicast or broadcast address"),
        ("ff02::1", "is a multicast or broadcast address"),
        ("255.255.255.255", "is a multicast or broadcast address"),
        ("169.254.1.1", "is link-local only"),
        ("fe80::1", "is link-local only"),
        ("198.51.100.7", "'198.51.100.7' is inside --it-allow 198.51.100.0/24, the IT side"),
        ("198.51.100.20", "is the address of config enterprise.mqtt.host, an IT-side sink"),
        ("2001:db8:1::30", "is the address of config audit.siem.host, an IT-side sink"),
        ("198.51.100.40", "is the address of config diode.host, an IT-side sink"),
    ],
)
def test_a_device_address_that_cannot_be_on_the_ot_network_is_refused(
    signed: Path, host: str, reason: str
) -> None:
    cfg = config.load(signed)
    devices = _devices()
    devices[1]["host"] = host
    loaded = policy.load(write_policy_yaml(signed.parent, _policy(devices), "bad-address"))
    allow = [ipaddress.ip_network("198.51.100.0/24")] if host == "198.51.100.7" else []
    with pytest.raises(ConfigError) as raised:
        nftables.write(cfg, loaded, it_allow=allow)
    assert str(raised.value).startswith(f"policy devices[plc-2].host: {host!r}")
    assert reason in str(raised.value)
    assert "a device must have a unicast address on the OT network" in str(raised.value)


def test_an_ipv4_mapped_device_address_is_matched_as_ipv4(signed: Path) -> None:
    cfg = config.load(signed)
    devices = _devices()
    devices[0]["host"] = "::ffff:192.0.2.10"
    devices[2]["endpoint"] = "opc.tcp://[::ffff:192.0.2.20]:4841/ua"
    loaded = policy.load(write_policy_yaml(signed.parent, _policy(devices), "mapped"))
    rules = _rules(nftables.write(cfg, loaded).text, "ot_out")
    assert (
        'ip daddr 192.0.2.10 tcp dport 502 ct state new accept comment "policy devices[plc-1].host"'
        in " ".join(rules).replace('meta skuid "dmzbroker-plant" ', "")
    )
    assert any("ip daddr 192.0.2.20 tcp dport 4841" in r for r in rules)
    assert not any("::ffff" in r for r in rules)


@pytest.mark.parametrize(
    "host", ["192.0.2.10\n}", "plc 1", 'plc"1', "plc;1", "plc\x00", "-plc", "plc..x", "a" * 64]
)
def test_host_text_that_is_no_address_or_host_name_never_reaches_the_ruleset(
    signed: Path, host: str
) -> None:
    cfg = config.load(signed)
    devices = _devices()
    devices[0]["host"] = host
    loaded = policy.load(write_policy_yaml(signed.parent, _policy(devices), "bad-text"))
    with pytest.raises(ConfigError, match="is neither an IP address nor a host name"):
        nftables.write(cfg, loaded)


def test_a_host_that_does_not_resolve_is_named_with_its_key(signed: Path) -> None:
    cfg = config.load(signed)
    devices = _devices()
    devices[1]["host"] = "plc1.invalid"  # RFC 6761: never resolves
    loaded = policy.load(write_policy_yaml(signed.parent, _policy(devices), "unresolvable"))
    with pytest.raises(ConfigError, match=r"policy devices\[plc-2\]\.host: cannot resolve "):
        nftables.write(cfg, loaded)


@pytest.mark.parametrize("name", ["", "a" * 16, "eth 0", "eth/0", 'it0"', "-x", "lo", "it0;drop"])
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        nftables.interface_name(name)


def test_fifteen_byte_interface_names_and_vlans_are_accepted() -> None:
    for name in ("a" * 15, "enp0s31f6", "eth0.100", "br-lan", "wg_0"):
        assert nftables.interface_name(name) == name


@needs_nft
def test_nft_accepts_the_ruleset(signed: Path, tmp_path: Path) -> None:
    cfg = config.load(signed)
    loaded = policy.load(signed.parent / "policy.yaml")
    allow = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:2::/48")]
    ruleset = tmp_path / "dmzbroker.nft"
    # nft resolves a user name when it reads the file: name users this machine has
    ruleset.write_text(nftables.write(cfg, loaded, it_allow=allow, ot_users=["root", "65534"]).text)
    netns.run([str(NFT), "-c", "-f", str(ruleset)])
    broken = tmp_path / "broken.nft"  # the check can fail: it is no rubber stamp
    broken.write_text(ruleset.read_text().replace('"root"', '"no-such-user-14"', 1))
    with pytest.raises(AssertionError, match="User does not exist"):
        netns.run([str(NFT), "-c", "-f", str(broken)])
    # the shipped example names dmzbroker-plant, which deploy/install.sh creates
    shipped = tmp_path / "shipped.nft"
    shipped.write_text((EXAMPLE / "dmzbroker.nft").read_text().replace('"dmzbroker-plant"', "0"))
    netns.run([str(NFT), "-c", "-f", str(shipped)])


def test_the_shipped_example_is_the_generators_output() -> None:
    """deploy/nftables/dmzbroker.nft from example/broker.yaml and example/policy.yaml, as
    the README's command writes it (the example policy is unsigned: its devices are what
    counts here, and signing is tested through the CLI)."""
    cfg = config.load(EXAMPLE / "example" / "broker.yaml")
    loaded = policy.load(EXAMPLE / "example" / "policy.yaml")
    expected = nftables.write(cfg, loaded, it_allow=[ipaddress.ip_network(EXAMPLE_ALLOW)]).text
    assert (EXAMPLE / "dmzbroker.nft").read_text() == expected, (
        "regenerate deploy/nftables/dmzbroker.nft (deploy/nftables/README.md)"
    )


def test_the_cli_writes_the_ruleset_of_the_signed_policy(signed: Path, tmp_path: Path) -> None:
    out = tmp_path / "rules" / "dmzbroker.nft"
    args = ("deploy", "nftables", "--config", str(signed), "--ot-interface", "enp1s0")
    written = dmzbroker(*args, "--it-allow", "198.51.100.0/24", "--out", str(out))
    assert written.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    printed = dmzbroker(*args, "--it-allow", "198.51.100.0/24")
    assert printed.stdout == out.read_text()
    assert 'meta skuid "dmzbroker-plant" ip daddr 192.0.2.10 tcp dport 502 ct' in printed.stdout
    assert "ip saddr 198.51.100.0/24 fib daddr . iif type local tcp dport 8443" in printed.stdout
    assert '"enp1s0" : jump ot_in, "it0" : jump it_in' in printed.stdout
    # plc-2 is named by a host name, the others by address: one warning, naming it
    for done in (written, printed):
        warnings = [line for line in done.stderr.splitlines() if "warning" in line]
        assert warnings == [
            "dmzbroker: warning: policy devices[plc-2].host: '3221225995' resolved to "
            "192.0.2.11 now; the ruleset allows no DNS, so the plant half cannot resolve it "
            "while the ruleset is loaded: name the device by address (or pin the name to "
            "these addresses in /etc/hosts)"
        ]
    users = dmzbroker(*args, "--ot-user", "dmzbroker-diode", "--ot-user", "0").stdout
    assert 'meta skuid { "dmzbroker-diode", 0 } ip daddr 192.0.2.10 tcp dport 502' in users


def test_the_cli_refuses_a_policy_the_owners_did_not_both_sign(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    """The ruleset follows only a verified policy: one signature short, nothing is written."""
    envelope = sign_policy(tmp_path, _policy(_devices()), [owners.ot_key])
    cfg = _config(tmp_path, envelope, pki, owners)
    out = tmp_path / "dmzbroker.nft"
    done = dmzbroker("deploy", "nftables", "--config", str(cfg), "--out", str(out), check=False)
    assert done.returncode == 2, done.stderr
    assert "dmzbroker: error:" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--it-allow", "198.51.100.7/24"], "--it-allow '198.51.100.7/24': not an IPv4 or IPv6"),
        (["--it-allow", "any"], "--it-allow 'any': not an IPv4 or IPv6"),
        (["--ot-interface", "a-much-too-long-name"], "--ot-interface 'a-much-too-long-name'"),
        (["--it-interface", "it 0"], "--it-interface 'it 0': an interface name is"),
        (["--it-interface", "ot0"], "--ot-interface and --it-interface are both 'ot0'"),
        (["--ot-user", "plant user"], "--ot-user 'plant user': a user is a uid or a name"),
        (
            ["--it-allow", "192.0.2.0/24"],
            "policy devices[plc-1].host: '192.0.2.10' is inside --it-allow 192.0.2.0/24",
        ),
    ],
)
def test_the_cli_names_a_bad_argument(signed: Path, flags: list[str], message: str) -> None:
    done = dmzbroker("deploy", "nftables", "--config", str(signed), *flags, check=False)
    assert done.returncode == 2, done.stderr
    assert f"dmzbroker: error: {message}" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_the_cli_names_a_host_that_does_not_resolve(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    devices = _devices()
    devices[0]["host"] = "plc1.invalid"
    envelope = sign_policy(tmp_path, _policy(devices), [owners.ot_key, owners.it_key])
    cfg = _config(tmp_path, envelope, pki, owners)
    done = dmzbroker("deploy", "nftables", "--config", str(cfg), check=False)
    assert done.returncode == 2, done.stderr
    assert "dmzbroker: error: policy devices[plc-1].host: cannot resolve 'plc1.invalid'" in (
        done.stderr
    )
    assert done.stdout == ""


SYSCTL = REPO / "deploy" / "sysctl" / "90-dmzbroker.conf"


@needs_root
def test_the_shipped_sysctls_apply_and_reach_every_nic() -> None:
    """`sysctl -p` (procps, as `sysctl --system` reads it) refuses a key the kernel lacks;
    in a fresh namespace with a NIC that existed before, every setting holds."""
    name = f"nft{os.getpid()}-sysctl"
    with netns.namespaces(name) as (space,):
        space.run("ip", "link", "add", "nic0", "type", "veth", "peer", "name", "nic1")
        space.run("sysctl", "-q", "-p", str(SYSCTL))
        for key, value in (
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv4.conf.nic0.rp_filter", "1"),
            ("net.ipv4.conf.nic0.accept_redirects", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv6.conf.nic0.accept_redirects", "0"),
            ("net.ipv4.conf.nic0.accept_source_route", "0"),
            ("net.ipv6.conf.nic0.accept_ra", "0"),
            ("net.ipv4.conf.nic0.arp_ignore", "1"),
            ("net.ipv4.conf.nic0.arp_announce", "2"),
        ):
            assert space.run("sysctl", "-n", key).strip() == value, key


# ---- real packets, as root, in namespaces this test creates and removes ----

LISTEN = """
import select, socket, sys
servers, held = [], []
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(port)))
    s.listen(16)
    servers.append(s)
print("ready", flush=True)
while True:
    for s in select.select(servers, [], [])[0]:
        held.append(s.accept()[0])  # kept open: the appliance may hold a connection
"""

CONNECT = """
import encodings.idna, os, socket, sys  # imported while root: nobody cannot read /root
os.setuid(int(sys.argv[4]))
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except OSError as e:
    print(type(e).__name__)
"""

# A BACnet/IP device as far as the ruleset goes: answers each datagram to its sender.
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

# The BACnet connector's socket: connected to the device, one datagram out, its answer back.
UDP_ASK = """
import encodings.idna, os, socket, sys
os.setuid(int(sys.argv[4]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.send(b"who-is")
    print("answered" if s.recv(64) == b"who-is" else "garbled")
except OSError as e:
    print(type(e).__name__)
"""

HOLD = """
import encodings.idna, os, select, socket, sys
os.setuid(int(sys.argv[3]))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("ready", flush=True)
print(s.getsockname()[1], flush=True)
while select.select([s], [], [], 30)[0]:
    data = s.recv(4096)
    if not data:
        break
    print("received", data, flush=True)
"""

# Counts the TCP segments on the link from the consumer port, until a file appears.
CAPTURE = """
import os, socket, struct, sys, time
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sock.bind((sys.argv[1], 0))
sock.settimeout(0.05)
print("ready", flush=True)
tcp = from_consumer_port = 0
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    try:
        frame = sock.recv(65535)
    except TimeoutError:
        continue
    kind = struct.unpack("!H", frame[12:14])[0]
    if kind == 0x0800 and frame[23] == 6:
        sport = struct.unpack("!H", frame[14 + (frame[14] & 15) * 4:][:2])[0]
    elif kind == 0x86DD and frame[20] == 6:
        sport = struct.unpack("!H", frame[54:56])[0]
    else:
        continue
    tcp += 1
    from_consumer_port += sport == int(sys.argv[3])
print(tcp, from_consumer_port, flush=True)
"""

# From the IT side, crafted with scapy: spoofed OT sources (v4 and v6) at the appliance's
# consumer port, a segment forged into the plant's held OT connection, ICMP errors from a
# genuine IT address quoting that connection (packet too big; redirect), and a redirect
# quoting the attacker's own consumer connection (`related` to it: only the redirect rule
# stops that one).
ATTACK = """
import socket, sys
from scapy.all import ICMP, IP, TCP, Ether, IPv6, Raw, conf, sendp
conf.verb = 0
mac, held = sys.argv[1], int(sys.argv[2])
ot_peer, ot_peer6, appl_ot, appl_it, appl_it6, it_peer = sys.argv[3:9]
quoted = bytes(IP(src=appl_ot, dst=ot_peer, flags="DF", len=1500) / TCP(sport=held, dport=502))
own = socket.create_connection((appl_it, 8443), timeout=10)
mine = bytes(IP(src=appl_it, dst=it_peer) / TCP(sport=8443, dport=own.getsockname()[1]))
sendp([
    Ether(dst=mac) / IP(src=ot_peer, dst=appl_it) / TCP(sport=502, dport=8443, flags="S"),
    Ether(dst=mac) / IP(src=ot_peer, dst=appl_ot) / TCP(sport=502, dport=8443, flags="S"),
    Ether(dst=mac) / IPv6(src=ot_peer6, dst=appl_it6) / TCP(sport=502, dport=8443, flags="S"),
    Ether(dst=mac) / IP(src=ot_peer, dst=appl_ot) / TCP(sport=502, dport=held, flags="PA")
    / Raw(b"FORGED-FROM-IT"),
    Ether(dst=mac) / IP(src=it_peer, dst=appl_ot) / ICMP(type=3, code=4, nexthopmtu=552)
    / quoted[:28],
    Ether(dst=mac) / IP(src=it_peer, dst=appl_ot) / ICMP(type=5, code=1, gw=it_peer)
    / quoted[:28],
    Ether(dst=mac) / IP(src=it_peer, dst=appl_it) / ICMP(type=5, code=1, gw=it_peer) / mine[:28],
], iface="eth0")
print("sent", flush=True)
"""

APPLIANCE_OT, OT_PEER = "192.0.2.1", "192.0.2.10"
APPLIANCE_IT, IT_PEER = "198.51.100.1", "198.51.100.10"
APPLIANCE_OT6, OT_PEER6 = "2001:db8:0:1::1", "2001:db8:0:1::10"
APPLIANCE_IT6, IT_PEER6 = "2001:db8:2::1", "2001:db8:2::10"
CONSUMER_PORT, DEVICE_PORT = 8443, 502
DNP3_PORT, BACNET_PORT = 20000, 47808
PLANT_UID = 65534  # `nobody`: the ruleset's --ot-user here, a name nft must resolve
SPOOFED, IT_ICMP = 4, 3  # what ATTACK sends of each kind


def _connect(
    space: netns.Namespace, host: str, port: int, timeout: float = 5.0, uid: int = 0
) -> str:
    return space.run(sys.executable, "-c", CONNECT, host, str(port), str(timeout), str(uid)).strip()


def _ask_udp(space: netns.Namespace, host: str, port: int, timeout: float, uid: int) -> str:
    return space.run(sys.executable, "-c", UDP_ASK, host, str(port), str(timeout), str(uid)).strip()


UNASKED = """
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"who-is", (sys.argv[1], int(sys.argv[2])))
"""


def _counters(appliance: netns.Namespace) -> dict[str, int]:
    listed = json.loads(appliance.run("nft", "-j", "list", "counters"))
    return {
        item["counter"]["name"]: item["counter"]["packets"]
        for item in listed["nftables"]
        if "counter" in item and item["counter"]["table"] == nftables.TABLE
    }


def _snmp6(space: netns.Namespace, name: str) -> int:
    for line in space.run("cat", "/proc/net/snmp6").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0  # the kernel lists a message type once it has counted one


def _until(condition: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[netns.Namespace, netns.Namespace, netns.Namespace]]:
    """appliance (ot0, it0, IPv4 and IPv6 forwarding on) between an OT and an IT namespace,
    with IPv6 on everywhere; the links are still down."""
    pid = os.getpid()
    with netns.namespaces(f"nft{pid}-appl", f"nft{pid}-ot", f"nft{pid}-it") as made:
        appliance, ot, it = made
        for space in made:  # netns.namespaces turns IPv6 off; this test wants it
            space.sysctl("net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0")
        netns.veth(appliance, "ot0", ot, "eth0")
        netns.veth(appliance, "it0", it, "eth0")
        for space, interface, addresses in (
            (appliance, "ot0", (f"{APPLIANCE_OT}/24", f"{APPLIANCE_OT6}/64")),
            (appliance, "it0", (f"{APPLIANCE_IT}/24", f"{APPLIANCE_IT6}/64")),
            (ot, "eth0", (f"{OT_PEER}/24", f"{OT_PEER6}/64")),
            (it, "eth0", (f"{IT_PEER}/24", f"{IT_PEER6}/64")),
        ):
            for address in addresses:
                space.run("ip", "address", "add", address, "dev", interface)
        # a router, as far as the kernel goes: only the ruleset stops forwarding
        appliance.sysctl("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        appliance.python("-c", LISTEN, str(CONSUMER_PORT), "8444", log=tmp_path / "appl.log")
        ot.python("-c", LISTEN, str(DEVICE_PORT), "503", str(DNP3_PORT), log=tmp_path / "ot.log")
        ot.python("-c", UDP_ECHO, str(BACNET_PORT), log=tmp_path / "ot-udp.log")
        yield appliance, ot, it


def _links_up(appliance: netns.Namespace, ot: netns.Namespace, it: netns.Namespace) -> None:
    for space, interface in ((appliance, "ot0"), (appliance, "it0"), (ot, "eth0"), (it, "eth0")):
        space.run("ip", "link", "set", interface, "up")
    ot.route("default", APPLIANCE_OT)
    ot.route("default", APPLIANCE_OT6)
    it.route("192.0.2.0/24", APPLIANCE_IT)
    it.route("2001:db8:0:1::/64", APPLIANCE_IT6)
    for space in (appliance, ot, it):  # duplicate address detection done (through the rules)
        _until(lambda s=space: not s.run("ip", "-6", "address", "show", "tentative").strip(), "DAD")


@needs_root
def test_real_packets_meet_the_ruleset(
    network: tuple[netns.Namespace, netns.Namespace, netns.Namespace],
    tmp_path: Path,
    pki: Pki,
    owners: Owners,
) -> None:
    appliance, ot, it = network
    devices = [
        {"name": "plc-1", "protocol": "modbus", "host": OT_PEER, "port": DEVICE_PORT},
        {"name": "plc-6", "protocol": "modbus", "host": OT_PEER6, "port": DEVICE_PORT},
        {"name": "rtu", "protocol": "dnp3", "host": OT_PEER, "outstation_address": 10},
        {"name": "ahu", "protocol": "bacnet", "host": OT_PEER, "device_instance": 1},
    ]
    envelope = sign_policy(tmp_path, _policy(devices), [owners.ot_key, owners.it_key])
    listen = {"listen": {"host": "::", "port": CONSUMER_PORT}}
    cfg = config.load(_config(tmp_path, envelope, pki, owners, enterprise=listen))
    ruleset = tmp_path / "dmzbroker.nft"
    loaded = policy.load(tmp_path / "policy.yaml")
    # the default: consumers from any source (what makes spoofing worth checking)
    ruleset.write_text(nftables.write(cfg, loaded, ot_users=["nobody"]).text)
    appliance.run("nft", "-f", str(ruleset))
    _links_up(appliance, ot, it)

    # Idle, with IPv6 on: the appliance's multicast listener reports leave (the kernel counts
    # only those the output hook passed), the peers' router solicitations are set apart, and
    # nothing lands in a hostile counter.
    _until(lambda: _snmp6(appliance, "Icmp6OutType143") >= 1, "an MLDv2 report sent")
    _until(lambda: _counters(appliance)["router_discovery_dropped"] >= 1, "a peer's RS seen")
    idle = _counters(appliance)
    assert {
        name: idle[name] for name in nftables.COUNTERS if name != "router_discovery_dropped"
    } == {
        "ot_dropped": 0,
        "it_dropped": 0,
        "forward_dropped": 0,
        "other_dropped": 0,
        "spoofed_dropped": 0,
    }

    # IT: the consumer port, on the IT NIC's own addresses only (IPv4 and IPv6)
    assert _connect(it, APPLIANCE_IT, CONSUMER_PORT) == "open"
    assert _connect(it, APPLIANCE_IT6, CONSUMER_PORT) == "open"
    before = _counters(appliance)["it_dropped"]
    assert _connect(it, APPLIANCE_IT, 8444, timeout=0.5) == "TimeoutError"  # it listens
    assert _connect(it, APPLIANCE_OT, CONSUMER_PORT, timeout=0.5) == "TimeoutError"  # OT NIC's
    assert _connect(it, APPLIANCE_OT6, CONSUMER_PORT, timeout=0.5) == "TimeoutError"
    assert _counters(appliance)["it_dropped"] >= before + 3

    # OT: only the plant's user reaches the devices, at their ports
    assert _connect(appliance, OT_PEER, DEVICE_PORT, uid=PLANT_UID) == "open"
    assert _connect(appliance, OT_PEER6, DEVICE_PORT, uid=PLANT_UID) == "open"  # ND works
    before = _counters(appliance)["ot_dropped"]
    for host, port, uid in (
        (OT_PEER, DEVICE_PORT, 0),
        (OT_PEER6, DEVICE_PORT, 0),
        (OT_PEER, 503, PLANT_UID),
    ):
        assert _connect(appliance, host, port, 0.5, uid) in ("TimeoutError", "PermissionError")
    assert _counters(appliance)["ot_dropped"] >= before + 3

    # DNP3 over TCP and BACnet/IP over UDP: the plant's user reaches each device at its port
    # and gets the BACnet device's answer back; root's datagram is dropped; a datagram the
    # OT network sends to the appliance unasked (a Who-Is, a forged answer) never gets in
    assert _connect(appliance, OT_PEER, DNP3_PORT, uid=PLANT_UID) == "open"
    assert _ask_udp(appliance, OT_PEER, BACNET_PORT, 5.0, PLANT_UID) == "answered"
    before = _counters(appliance)["ot_dropped"]
    assert _ask_udp(appliance, OT_PEER, BACNET_PORT, 0.5, 0) in ("TimeoutError", "PermissionError")
    ot.run(sys.executable, "-c", UNASKED, APPLIANCE_OT, str(BACNET_PORT))
    _until(lambda: _counters(appliance)["ot_dropped"] >= before + 2, "both datagrams dropped")

    # nothing forwarded, IPv4 or IPv6
    assert _connect(it, OT_PEER, DEVICE_PORT, timeout=0.5) == "TimeoutError"
    assert _connect(it, OT_PEER6, DEVICE_PORT, timeout=0.5) == "TimeoutError"
    assert _counters(appliance)["forward_dropped"] >= 2

    # Crafted from IT, while the plant holds a connection to the device and the OT link is
    # captured: spoofed sources are dropped before conntrack, ICMP errors quoting the OT
    # connection are no answers on the IT NIC (its own zone), and no packet of the consumer
    # port appears on the OT link.
    hold = appliance.python(
        "-c", HOLD, OT_PEER, str(DEVICE_PORT), str(PLANT_UID), log=tmp_path / "hold.log"
    )
    assert hold.stdout is not None
    held = int(hold.stdout.readline())
    stop = tmp_path / "capture.stop"
    capture = ot.python(
        "-c", CAPTURE, "eth0", str(stop), str(CONSUMER_PORT), log=tmp_path / "cap.log"
    )
    before = _counters(appliance)
    mac = json.loads(appliance.run("ip", "-j", "link", "show", "it0"))[0]["address"]
    sent = it.run(
        sys.executable,
        "-c",
        ATTACK,
        mac,
        str(held),
        OT_PEER,
        OT_PEER6,
        APPLIANCE_OT,
        APPLIANCE_IT,
        APPLIANCE_IT6,
        IT_PEER,
    )
    assert sent.strip() == "sent"
    _until(
        lambda: _counters(appliance)["spoofed_dropped"] >= before["spoofed_dropped"] + SPOOFED,
        "spoofed dropped",
    )
    # polls and consumers still work, and the capture sees them
    assert _connect(appliance, OT_PEER, DEVICE_PORT, uid=PLANT_UID) == "open"
    assert _connect(it, APPLIANCE_IT, CONSUMER_PORT) == "open"
    stop.touch()
    assert capture.stdout is not None
    segments, from_consumer_port = map(int, capture.stdout.readline().split())
    assert segments >= 3 and from_consumer_port == 0  # no SYN-ACK reflected into the plant
    after = _counters(appliance)
    assert after["spoofed_dropped"] - before["spoofed_dropped"] == SPOOFED
    assert after["it_dropped"] - before["it_dropped"] == IT_ICMP
    assert "mtu 552" not in appliance.run("ip", "route", "get", OT_PEER)  # the ICMP error
    assert "redirected" not in appliance.run("ip", "route", "get", OT_PEER)
    stop_process(hold)
    assert b"received" not in hold.stdout.read()  # the forged segment never reached it
    assert after["ot_dropped"] == before["ot_dropped"]
    assert after["other_dropped"] == 0

    # Without the ruleset, IT reaches the OT device through the appliance: the control.
    appliance.run("nft", "delete", "table", "inet", nftables.TABLE)
    assert _connect(it, OT_PEER, DEVICE_PORT) == "open"

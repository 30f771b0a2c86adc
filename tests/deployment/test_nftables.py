"""The two-NIC ruleset: what it allows, that nft accepts it, that the shipped example is the
generator's output, the CLI's errors, and, as root, real packets through it in namespaces."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import sys
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
        {"name": "plc-2", "protocol": "modbus", "host": "localhost", "port": 5020},
        {"name": "scada", "protocol": "opcua", "endpoint": "opc.tcp://[2001:db8::20]:4841/ua"},
        {"name": "historian", "protocol": "opcua", "endpoint": "opc.tcp://192.0.2.30"},
    ]


def _policy(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The demo policy's signals, all on the first device, with these devices."""
    document = demo_policy(502, devices=devices)
    first = devices[0]["name"]
    for signal in document["signals"]:
        if signal.get("device") is not None:
            signal["device"] = first
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
    return _config(tmp_path, envelope, pki, owners, diode=diode)


def _rules(text: str, chain: str) -> list[str]:
    """The rules of one chain, without comments."""
    body = text.split(f"\tchain {chain} {{\n", 1)[1].split("\n\t}", 1)[0]
    return [line.strip() for line in body.splitlines() if not line.strip().startswith("#")]


def test_each_side_allows_only_what_the_config_and_policy_name(signed: Path) -> None:
    cfg = config.load(signed)
    loaded = policy.load(signed.parent / "policy.yaml")
    text = nftables.ruleset(cfg, loaded, ot_interface="enp1s0", it_interface="enp2s0")

    assert _rules(text, "ot_out") == [
        'ip daddr 192.0.2.10 tcp dport 502 ct state new accept comment "policy devices[plc-1].host"',
        'ip daddr 127.0.0.1 tcp dport 5020 ct state new accept comment "policy devices[plc-2].host"',
        "ip6 daddr 2001:db8::20 tcp dport 4841 ct state new accept "
        'comment "policy devices[scada].endpoint"',
        "ip daddr 192.0.2.30 tcp dport 4840 ct state new accept "  # OPC UA's default port
        'comment "policy devices[historian].endpoint"',
        'counter name "ot_dropped" drop',
    ]
    assert "# policy devices[plc-2].host: localhost, resolved to 127.0.0.1" in text
    # the diode receiver's address is never this host's on the OT host: the rule opens
    # nothing there, and lets the datagrams in on the IT host of a diode pair
    assert _rules(text, "ot_in") == [
        'ip daddr 198.51.100.40 udp dport 7600 ct state new accept comment "config diode.host"',
        'counter name "ot_dropped" drop',
    ]
    assert _rules(text, "it_in") == [
        "tcp dport 8443 tcp flags & (fin|syn|rst|ack) == syn ct state new accept "
        'comment "consumer port"',
        'counter name "it_dropped" drop',
    ]
    assert _rules(text, "it_out") == [
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
        rules = _rules(text, hook)
        assert rules[0] == f"type filter hook {hook} priority filter; policy drop;"
        assert f'{match} "lo" accept comment "the two halves and local tools"' in rules
        assert "ct state established,related accept" in rules
        assert rules[-2:] == [
            f'{match}name vmap {{ "enp1s0" : jump ot_{side}, "enp2s0" : jump it_{side} }}',
            'counter name "other_dropped" drop',
        ]
    # nothing accepted without a connection state, an interface or a loopback match
    accepts = [line for line in text.splitlines() if line.strip().endswith("accept")]
    assert all("ct state" in r or '"lo"' in r or "hoplimit 255" in r for r in accepts)


def test_it_allow_narrows_the_consumer_port_per_family(signed: Path) -> None:
    cfg = config.load(signed)
    loaded = policy.load(signed.parent / "policy.yaml")
    allow = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "2001:db8:2::/48", "10.1.2.3")]
    rules = _rules(nftables.ruleset(cfg, loaded, it_allow=allow), "it_in")
    syn = "tcp flags & (fin|syn|rst|ack) == syn ct state new accept"
    assert rules == [
        f'ip saddr {{ 198.51.100.0/24, 10.1.2.3/32 }} tcp dport 8443 {syn} comment "consumer port"',
        f'ip6 saddr 2001:db8:2::/48 tcp dport 8443 {syn} comment "consumer port"',
        'counter name "it_dropped" drop',
    ]


def test_a_host_that_does_not_resolve_is_named_with_its_key(signed: Path) -> None:
    cfg = config.load(signed)
    devices = _devices()
    devices[1]["host"] = "plc1.invalid"  # RFC 6761: never resolves
    loaded = policy.load(write_policy_yaml(signed.parent, _policy(devices), "unresolvable"))
    with pytest.raises(ConfigError, match=r"policy devices\[plc-2\]\.host: cannot resolve "):
        nftables.ruleset(cfg, loaded)


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
    allow = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8::/32")]
    ruleset = tmp_path / "dmzbroker.nft"
    ruleset.write_text(nftables.ruleset(cfg, loaded, it_allow=allow))
    netns.run([str(NFT), "-c", "-f", str(ruleset)])
    broken = tmp_path / "broken.nft"  # the check can fail: it is no rubber stamp
    broken.write_text(ruleset.read_text().replace("policy drop;", "policy dropp;", 1))
    with pytest.raises(AssertionError, match="exited 1"):
        netns.run([str(NFT), "-c", "-f", str(broken)])


def test_the_shipped_example_is_the_generators_output() -> None:
    """deploy/nftables/dmzbroker.nft from example/broker.yaml and example/policy.yaml, as
    the README's command writes it (the example policy is unsigned: its devices are what
    counts here, and signing is tested through the CLI)."""
    cfg = config.load(EXAMPLE / "example" / "broker.yaml")
    loaded = policy.load(EXAMPLE / "example" / "policy.yaml")
    expected = nftables.ruleset(cfg, loaded, it_allow=[ipaddress.ip_network(EXAMPLE_ALLOW)])
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
    assert "ip daddr 192.0.2.10 tcp dport 502 ct state new accept" in printed.stdout
    assert "ip saddr 198.51.100.0/24 tcp dport 8443" in printed.stdout
    assert '"enp1s0" : jump ot_in, "it0" : jump it_in' in printed.stdout


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


# ---- real packets, as root, in namespaces this test creates and removes ----

LISTEN = """
import select, socket, sys
servers = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    servers.append(s)
print("ready", flush=True)
while True:
    for s in select.select(servers, [], [])[0]:
        s.accept()[0].close()
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except OSError as e:
    print(type(e).__name__)
"""

APPLIANCE_OT, OT_PEER = "192.0.2.1", "192.0.2.10"
APPLIANCE_IT, IT_PEER = "198.51.100.1", "198.51.100.10"
CONSUMER_PORT, DEVICE_PORT = 8443, 502


def _connect(space: netns.Namespace, host: str, port: int, timeout: float = 1.0) -> str:
    return space.run(sys.executable, "-c", CONNECT, host, str(port), str(timeout)).strip()


def _counters(appliance: netns.Namespace) -> dict[str, int]:
    listed = json.loads(appliance.run("nft", "-j", "list", "counters"))
    return {
        item["counter"]["name"]: item["counter"]["packets"]
        for item in listed["nftables"]
        if "counter" in item and item["counter"]["table"] == nftables.TABLE
    }


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[netns.Namespace, netns.Namespace, netns.Namespace]]:
    """appliance (ot0, it0, forwarding on) between an OT and an IT namespace."""
    pid = os.getpid()
    with netns.namespaces(f"nft{pid}-appl", f"nft{pid}-ot", f"nft{pid}-it") as made:
        appliance, ot, it = made
        netns.veth(appliance, "ot0", ot, "eth0")
        netns.veth(appliance, "it0", it, "eth0")
        appliance.up("ot0", f"{APPLIANCE_OT}/24")
        appliance.up("it0", f"{APPLIANCE_IT}/24")
        ot.up("eth0", f"{OT_PEER}/24")
        it.up("eth0", f"{IT_PEER}/24")
        ot.route("198.51.100.0/24", APPLIANCE_OT)
        it.route("192.0.2.0/24", APPLIANCE_IT)
        # a router, as far as the kernel goes: only the ruleset stops forwarding
        appliance.sysctl("net.ipv4.ip_forward=1")
        appliance.python("-c", LISTEN, str(CONSUMER_PORT), "8444", log=tmp_path / "appl.log")
        ot.python("-c", LISTEN, str(DEVICE_PORT), "503", log=tmp_path / "ot.log")
        yield appliance, ot, it


@needs_root
def test_real_packets_meet_the_ruleset(
    network: tuple[netns.Namespace, netns.Namespace, netns.Namespace],
    tmp_path: Path,
    pki: Pki,
    owners: Owners,
) -> None:
    appliance, _, it = network
    # Without the ruleset, IT reaches the OT device through the appliance: the control.
    assert _connect(it, OT_PEER, DEVICE_PORT) == "open"

    devices = [{"name": "plc-1", "protocol": "modbus", "host": OT_PEER, "port": DEVICE_PORT}]
    envelope = sign_policy(tmp_path, _policy(devices), [owners.ot_key, owners.it_key])
    cfg = config.load(_config(tmp_path, envelope, pki, owners))
    ruleset = tmp_path / "dmzbroker.nft"
    allow = [ipaddress.ip_network("198.51.100.0/24")]
    ruleset.write_text(nftables.ruleset(cfg, policy.load(tmp_path / "policy.yaml"), it_allow=allow))
    appliance.run("nft", "-f", str(ruleset))
    assert _counters(appliance) == dict.fromkeys(nftables.COUNTERS, 0)

    assert _connect(it, APPLIANCE_IT, CONSUMER_PORT) == "open"
    assert _connect(it, APPLIANCE_IT, 8444) == "TimeoutError"  # it listens: the rules stop it
    assert _counters(appliance)["it_dropped"] >= 1

    assert _connect(appliance, OT_PEER, DEVICE_PORT) == "open"
    # it listens too: the ruleset stops the SYN on its way out (the kernel retries, then gives up)
    assert _connect(appliance, OT_PEER, 503) in ("TimeoutError", "PermissionError")
    assert _counters(appliance)["ot_dropped"] >= 1

    assert _connect(it, OT_PEER, DEVICE_PORT) == "TimeoutError"
    after = _counters(appliance)
    assert after["forward_dropped"] >= 1
    assert after["other_dropped"] == 0

"""The appliance's two-NIC nftables ruleset, written from the configuration and the policy.

The OT interface may carry only connections the appliance opens to the devices the verified
policy names, at their ports; the IT interface only consumers' connections to the consumer
port and the appliance's own to the MQTT broker, the SIEM collector and a diode receiver.
Nothing is forwarded; everything else is dropped and counted (`ot_dropped`, `it_dropped`,
`forward_dropped`, and `other_dropped` for any other interface). Host names are resolved
here, when the ruleset is written, and the file names them next to their addresses.

This module only writes text: it never loads a ruleset, never reads a policy it was not
handed (the caller verifies it), and never allows a peer the config or policy does not name.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from broker.config import BrokerConfig
from broker.errors import ConfigError
from broker.policy import ModbusDevice, Policy

TABLE = "dmzbroker"
COUNTERS = ("ot_dropped", "it_dropped", "forward_dropped", "other_dropped")
OPCUA_DEFAULT_PORT = 4840  # an endpoint URL without a port (IEC 62541-6)
_IFNAMSIZ = 16  # the kernel's limit, with the terminating NUL
# Stricter than the kernel (which refuses only '/', ':', whitespace, "." and ".."): the name
# goes into the ruleset between quotes, and every real interface name fits this.
_INTERFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Peer:
    """One host the appliance talks to: where it is named, what it resolved to, its port."""

    key: str  # where the host is named: `policy devices[plc-1].host`, `config audit.siem.host`
    host: str
    addresses: tuple[Address, ...]
    port: int
    transport: Literal["tcp", "udp"] = "tcp"


def interface_name(value: str) -> str:
    """`value` if it can name a network interface, else ValueError saying why."""
    if len(value.encode()) >= _IFNAMSIZ:
        raise ValueError(f"{value!r}: longer than {_IFNAMSIZ - 1} bytes (IFNAMSIZ)")
    if not _INTERFACE.fullmatch(value):
        raise ValueError(
            f"{value!r}: an interface name is letters, digits, '_', '.', '@' and '-', "
            "starting with a letter or digit"
        )
    if value == "lo":
        raise ValueError("'lo' is the loopback interface, always accepted: name a NIC")
    return value


def source_network(value: str) -> Network:
    """A consumer source range (`--it-allow`): an address or a CIDR without host bits."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"{value!r}: not an IPv4 or IPv6 address or network ({e})") from e


def resolve(key: str, host: str) -> tuple[Address, ...]:
    """Every address `host` resolves to now, IPv4 first; ConfigError naming `key` if none."""
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise ConfigError(f"{key}: cannot resolve {host!r} ({reason})") from e
    # A link-local IPv6 answer carries its zone ("fe80::1%ot0"); the rule matches the address.
    addresses = {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in found}
    return tuple(sorted(addresses, key=lambda a: (a.version, int(a))))


def device_peers(policy: Policy) -> list[Peer]:
    """The policy's devices, each with its resolved addresses and port."""
    peers = []
    for device in policy.devices:
        if isinstance(device, ModbusDevice):
            key, host, port = f"policy devices[{device.name}].host", device.host, device.port
        else:
            key = f"policy devices[{device.name}].endpoint"
            host, port = _endpoint(key, device.endpoint)
        peers.append(Peer(key, host, resolve(key, host), port))
    return peers


def it_peers(cfg: BrokerConfig) -> list[Peer]:
    """The IT-side hosts the appliance connects to: MQTT broker, SIEM, diode receiver."""
    named: list[tuple[str, str, int, Literal["tcp", "udp"]]] = []
    if cfg.enterprise.mqtt is not None:
        mqtt = cfg.enterprise.mqtt
        named.append(("config enterprise.mqtt.host", mqtt.host, mqtt.port, "tcp"))
    if cfg.audit.siem is not None:
        siem = cfg.audit.siem
        named.append(("config audit.siem.host", siem.host, siem.port, "tcp"))
    if cfg.diode is not None:
        named.append(("config diode.host", cfg.diode.host, cfg.diode.port, "udp"))
    return [Peer(key, host, resolve(key, host), port, proto) for key, host, port, proto in named]


def ruleset(
    cfg: BrokerConfig,
    policy: Policy,
    *,
    ot_interface: str = "ot0",
    it_interface: str = "it0",
    it_allow: Sequence[Network] = (),
) -> str:
    """The ruleset text for `nft -f`: the config's and the verified policy's peers, resolved
    now. ValueError for a bad interface name, ConfigError for a host that does not resolve."""
    ot, it = interface_name(ot_interface), interface_name(it_interface)
    if ot == it:
        raise ValueError(f"the OT and the IT interface are both {ot!r}: they must differ")
    devices, sinks = device_peers(policy), it_peers(cfg)
    diode = [peer for peer in sinks if peer.transport == "udp"]
    lines = _header(policy, ot, it)
    lines += [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        "",
        f"table inet {TABLE} {{",
        *(f"\tcounter {name} {{}}" for name in COUNTERS),
        "",
        *_base_chain("input", "iif", ot, it),
        "",
        "\tchain ot_in {",
        "\t\t# Nothing starts on the OT side: only answers come in (accepted above).",
        *_peer_rules(diode, "datagrams to a diode receiver on this host (the IT host of a pair)"),
        '\t\tcounter name "ot_dropped" drop',
        "\t}",
        "",
        "\tchain it_in {",
        *_consumer_rules(cfg.enterprise.listen.port, it_allow),
        '\t\tcounter name "it_dropped" drop',
        "\t}",
        "",
        *_base_chain("output", "oif", ot, it),
        "",
        "\tchain ot_out {",
        *_peer_rules(devices, "the devices the verified policy names"),
        '\t\tcounter name "ot_dropped" drop',
        "\t}",
        "",
        "\tchain it_out {",
        *_peer_rules(sinks, "the sinks the config names"),
        '\t\tcounter name "it_dropped" drop',
        "\t}",
        "",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        "\t\t# The appliance is no router: nothing crosses between its interfaces.",
        '\t\tcounter name "forward_dropped" drop',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _endpoint(key: str, endpoint: str) -> tuple[str, int]:
    try:
        parts = urlsplit(endpoint)
        port = parts.port or OPCUA_DEFAULT_PORT
    except ValueError as e:
        raise ConfigError(f"{key}: {endpoint!r}: {e}") from e
    if not parts.hostname:
        raise ConfigError(f"{key}: {endpoint!r} names no host")
    return parts.hostname, port


def _header(policy: Policy, ot: str, it: str) -> list[str]:
    return [
        "#!/usr/sbin/nft -f",
        "# dmzbroker's two-NIC ruleset, written by `dmzbroker deploy nftables` from the",
        f"# appliance config and the verified policy {policy.deployment_id!r} version "
        f"{policy.version}.",
        "# Do not edit: write it again when the policy or the config changes (deploy/nftables/).",
        "#",
        f"# OT interface {ot!r}: only the appliance's connections to the policy's devices.",
        f"# IT interface {it!r}: only consumers to the consumer port, and the appliance's own",
        "# connections to its MQTT broker, SIEM collector and diode receiver.",
        "# Nothing is forwarded. Everything else is dropped and counted: `nft -j list counters`.",
        "#",
        "# Host names were resolved when this file was written; the addresses below are those",
        "# answers, and a changed address needs the ruleset written again.",
        "# Needed ICMP errors (unreachable, packet too big) are `related` to a connection and",
        "# accepted with it; IPv6 neighbour discovery is accepted; nothing else (no ping).",
        "# DNS, NTP and management (SSH) are not allowed: the appliance resolves nothing at run",
        "# time. To manage it through a third interface, load rules after this file, e.g.:",
        f'#   insert rule inet {TABLE} input iifname "mgmt0" tcp dport 22 ct state new accept',
        f'#   insert rule inet {TABLE} output oifname "mgmt0" udp dport {{ 53, 123 }} '
        "ct state new accept",
        "# (`insert` puts them first; `add` would put them after the counted drop).",
        "",
    ]


def _base_chain(hook: Literal["input", "output"], match: str, ot: str, it: str) -> list[str]:
    side = "in" if hook == "input" else "out"
    return [
        f"\tchain {hook} {{",
        f"\t\ttype filter hook {hook} priority filter; policy drop;",
        f'\t\t{match} "lo" accept comment "the two halves and local tools"',
        "\t\t# IPv6 neighbour discovery is never tracked (conntrack calls it invalid); a hop",
        "\t\t# limit of 255 proves it came from the link itself.",
        "\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
        "\t\tct state established,related accept",
        "\t\t# Invalid packets meet only `ct state new` accepts below: dropped and counted.",
        f'\t\t{match}name vmap {{ "{ot}" : jump ot_{side}, "{it}" : jump it_{side} }}',
        '\t\tcounter name "other_dropped" drop',
        "\t}",
    ]


def _peer_rules(peers: Sequence[Peer], what: str) -> list[str]:
    lines = [f"\t\t# Only {what}."] if peers else []
    for peer in peers:
        answers = ", ".join(str(address) for address in peer.addresses)
        named = peer.host if answers == peer.host else f"{peer.host}, resolved to {answers}"
        lines.append(f"\t\t# {peer.key}: {named}")
        for family, addresses in _by_family(peer.addresses):
            lines.append(
                f"\t\t{family} daddr {_set(addresses)} {peer.transport} dport {peer.port} "
                f'ct state new accept comment "{peer.key}"'
            )
    return lines


def _consumer_rules(port: int, it_allow: Sequence[Network]) -> list[str]:
    syn = "tcp flags & (fin|syn|rst|ack) == syn"
    accept = f'tcp dport {port} {syn} ct state new accept comment "consumer port"'
    if not it_allow:
        return ["\t\t# Consumers from any source (--it-allow narrows it).", f"\t\t{accept}"]
    lines = ["\t\t# Consumers from the --it-allow sources only."]
    for family, networks in _by_family(it_allow):
        lines.append(f"\t\t{family} saddr {_set(networks)} {accept}")
    return lines


def _by_family(
    items: Sequence[Address] | Sequence[Network],
) -> list[tuple[Literal["ip", "ip6"], list[str]]]:
    v4 = [str(item) for item in items if item.version == 4]
    v6 = [str(item) for item in items if item.version == 6]
    families: list[tuple[Literal["ip", "ip6"], list[str]]] = [("ip", v4), ("ip6", v6)]
    return [(family, members) for family, members in families if members]


def _set(members: list[str]) -> str:
    return members[0] if len(members) == 1 else "{ " + ", ".join(members) + " }"

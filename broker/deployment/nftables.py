"""The appliance's two-NIC nftables ruleset, written from the configuration and the policy.

The OT interface may carry only connections the plant half's user opens to the devices the
verified policy names, at their ports; the IT interface only consumers' connections to the
consumer port (and the OPC UA port, when the enterprise half serves one) on the IT NIC's own
addresses, and the appliance's own to the MQTT broker, the PostgreSQL historian, the SIEM
collector and a diode receiver. Each NIC has its own conntrack zone and a strict
reverse-path check, so a packet arriving on one NIC can neither claim a source behind the
other nor count as an answer to the other's connections. Nothing is forwarded; everything
else is dropped and counted (`COUNTERS`). Host names are resolved here, when the ruleset is
written, and the file names them next to their addresses.

This module only writes text: it never loads a ruleset, never reads a policy it was not
handed (the caller verifies it), never allows a peer the config or policy does not name, and
never writes text into the ruleset that it has not checked against a narrow character set.
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
from broker.deployment.layout import PLANT_USER
from broker.errors import ConfigError
from broker.policy import BacnetDevice, OpcUaDevice, Policy

TABLE = "dmzbroker"
# Hostile or unexpected traffic per interface, forwarding attempts, packets on any other
# interface, packets whose source is not routed back out of the NIC they came in on, and
# IPv6 router solicitations/advertisements (the appliance has static addresses: no hostile
# intent is implied, so they stay out of the interface counters).
COUNTERS = (
    "ot_dropped",
    "it_dropped",
    "forward_dropped",
    "other_dropped",
    "spoofed_dropped",
    "router_discovery_dropped",
)
OT_ZONE, IT_ZONE = 1, 2  # conntrack zones: a connection belongs to the NIC it uses
OPCUA_DEFAULT_PORT = 4840  # an endpoint URL without a port (IEC 62541-6)
_IFNAMSIZ = 16  # the kernel's limit, with the terminating NUL
# Stricter than the kernel (which refuses only '/', ':', whitespace, "." and ".."): the name
# goes into the ruleset between quotes, and every real interface name fits this.
_INTERFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")
# What `useradd` accepts (Debian's NAME_REGEX, with upper case and '.'); written quoted.
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no user"
# RFC 1123 labels (and '_', which some internal zones use): a host name goes into a comment.
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

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

    @property
    def by_name(self) -> bool:
        """Named by a host name rather than an address literal."""
        return not _is_literal(self.host)


@dataclass(frozen=True)
class Written:
    """A ruleset's text and the devices in it that the policy names by host name: the plant
    half resolves those at run time, which the ruleset's blocked DNS does not allow."""

    text: str
    devices_by_name: tuple[Peer, ...]


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


def user(value: str) -> str:
    """`value` if it can name a user in `meta skuid` (a user name, which nft resolves when the
    ruleset is loaded, or a numeric uid), else ValueError saying why."""
    if value.isascii() and value.isdigit():
        if int(value) > _MAX_UID:
            raise ValueError(f"{value!r}: a uid is at most {_MAX_UID}")
        return str(int(value))
    if not _USER.fullmatch(value):
        raise ValueError(
            f"{value!r}: a user is a uid or a name of up to 32 letters, digits, '_', '.' "
            "and '-', starting with a letter or '_'"
        )
    return value


def source_network(value: str) -> Network:
    """A consumer source range (`--it-allow`): an address or a CIDR without host bits."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"{value!r}: not an IPv4 or IPv6 address or network ({e})") from e


def resolve(key: str, host: str) -> tuple[Address, ...]:
    """Every address `host` resolves to now, IPv4 first, IPv4-mapped IPv6 as IPv4;
    ConfigError naming `key` if `host` is neither an address nor a host name, or if it does
    not resolve."""
    if not _is_literal(host) and not _is_host_name(host):
        raise ConfigError(
            f"{key}: {host!r} is neither an IP address nor a host name (letters, digits, "
            "'-' and '_' in dot-separated labels)"
        )
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise ConfigError(f"{key}: cannot resolve {host!r} ({reason})") from e
    # A link-local IPv6 answer carries its zone ("fe80::1%ot0"); the rule matches the address.
    addresses = {_unmapped(str(info[4][0]).partition("%")[0]) for info in found}
    return tuple(sorted(addresses, key=lambda a: (a.version, int(a))))


def device_peers(
    policy: Policy, *, it_allow: Sequence[Network] = (), sinks: Sequence[Peer] = ()
) -> list[Peer]:
    """The policy's devices, each with its resolved addresses and port; ConfigError naming
    the device for an address that cannot be a device on the OT network."""
    peers = []
    for device in policy.devices:
        transport: Literal["tcp", "udp"] = "udp" if isinstance(device, BacnetDevice) else "tcp"
        if isinstance(device, OpcUaDevice):
            key = f"policy devices[{device.name}].endpoint"
            host, port = _endpoint(key, device.endpoint)
        else:
            key, host, port = f"policy devices[{device.name}].host", device.host, device.port
        peer = Peer(key, host, resolve(key, host), port, transport)
        for address in peer.addresses:
            _check_device_address(peer, address, it_allow, sinks)
        peers.append(peer)
    return peers


def it_peers(cfg: BrokerConfig) -> list[Peer]:
    """The IT-side hosts the appliance connects to: MQTT broker, PostgreSQL, SIEM, diode
    receiver."""
    named: list[tuple[str, str, int, Literal["tcp", "udp"]]] = []
    for name, sink in (("mqtt", cfg.enterprise.mqtt), ("postgres", cfg.enterprise.postgres)):
        if sink is not None:
            named.append((f"config enterprise.{name}.host", sink.host, sink.port, "tcp"))
    if cfg.audit.siem is not None:
        siem = cfg.audit.siem
        named.append(("config audit.siem.host", siem.host, siem.port, "tcp"))
    if cfg.diode is not None:
        named.append(("config diode.host", cfg.diode.host, cfg.diode.port, "udp"))
    return [Peer(key, host, resolve(key, host), port, proto) for key, host, port, proto in named]


def write(
    cfg: BrokerConfig,
    policy: Policy,
    *,
    ot_interface: str = "ot0",
    it_interface: str = "it0",
    it_allow: Sequence[Network] = (),
    ot_users: Sequence[str] = (PLANT_USER,),
) -> Written:
    """The ruleset for `nft -f`: the config's and the verified policy's peers, resolved now;
    only `ot_users` may open connections on the OT interface. ValueError for a bad interface
    or user, ConfigError for a host that does not resolve or cannot be a device."""
    ot, it = interface_name(ot_interface), interface_name(it_interface)
    if ot == it:
        raise ValueError(f"the OT and the IT interface are both {ot!r}: they must differ")
    users = [user(name) for name in ot_users]
    if not users:
        raise ValueError("no OT user: name the plant half's user")
    sinks = it_peers(cfg)
    devices = device_peers(policy, it_allow=it_allow, sinks=sinks)
    diode = [peer for peer in sinks if peer.transport == "udp"]
    owners = _set([f'"{name}"' if not name.isdigit() else name for name in dict.fromkeys(users)])
    lines = _header(policy, ot, it)
    lines += [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        "",
        f"table inet {TABLE} {{",
        *(f"\tcounter {name} {{}}" for name in COUNTERS),
        "",
        *_raw_chains(ot, it),
        "",
        *_base_chain("input", "iif", ot, it),
        "",
        "\tchain ot_in {",
        *_side_rules("ot", "in"),
        "\t\t# Nothing starts on the OT side: only answers come in (accepted above).",
        *_peer_rules(diode, "datagrams to a diode receiver on this host (the IT host of a pair)"),
        '\t\tcounter name "ot_dropped" drop',
        "\t}",
        "",
        "\tchain it_in {",
        *_side_rules("it", "in"),
        *_listener_rules(cfg, it_allow),
        '\t\tcounter name "it_dropped" drop',
        "\t}",
        "",
        *_link_chain("in"),
        "",
        *_base_chain("output", "oif", ot, it),
        "",
        "\tchain ot_out {",
        *_side_rules("ot", "out"),
        f"\t\t# Only the plant half's user ({', '.join(users)}) opens connections here.",
        *_peer_rules(devices, "the devices the verified policy names", f"meta skuid {owners} "),
        '\t\tcounter name "ot_dropped" drop',
        "\t}",
        "",
        "\tchain it_out {",
        *_side_rules("it", "out"),
        *_peer_rules(sinks, "the sinks the config names"),
        '\t\tcounter name "it_dropped" drop',
        "\t}",
        "",
        *_link_chain("out"),
        "",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        "\t\t# The appliance is no router: nothing crosses between its interfaces.",
        '\t\tcounter name "forward_dropped" drop',
        "\t}",
        "}",
    ]
    named = tuple(peer for peer in devices if peer.by_name)
    return Written("\n".join(lines) + "\n", named)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_host_name(host: str) -> bool:
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _unmapped(text: str) -> Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _check_device_address(
    peer: Peer, address: Address, it_allow: Sequence[Network], sinks: Sequence[Peer]
) -> None:
    named = f"{peer.host!r}" if str(address) == peer.host else f"{peer.host!r} ({address})"
    reason = ""
    if address.is_unspecified:
        reason = "is the unspecified address"
    elif address.is_loopback:
        reason = "is a loopback address"
    elif address.is_multicast or address == _BROADCAST:
        reason = "is a multicast or broadcast address"
    elif address.is_link_local:
        reason = "is link-local only"
    elif network := next((n for n in it_allow if address in n), None):
        reason = f"is inside --it-allow {network}, the IT side"
    elif sink := next((s for s in sinks if address in s.addresses), None):
        reason = f"is the address of {sink.key}, an IT-side sink"
    if reason:
        raise ConfigError(
            f"{peer.key}: {named} {reason}: a device must have a unicast address on the OT network"
        )


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
        "# Load it together with deploy/sysctl/90-dmzbroker.conf (no redirects, no forwarding,",
        "# strict reverse path, ARP only for the NIC's own addresses): each needs the other.",
        "#",
        f"# OT interface {ot!r}: only the plant half's connections to the policy's devices.",
        f"# IT interface {it!r}: only consumers to the consumer port (and OPC UA clients to the",
        "# OPC UA port, if configured) on its own addresses, and the appliance's own connections",
        "# to its MQTT broker, PostgreSQL historian, SIEM collector and diode receiver.",
        "# Each interface has its own conntrack zone: a packet on one is never an answer to a",
        "# connection on the other. A source not routed back out of the NIC it came in on is",
        "# dropped before anything else. Nothing is forwarded. Everything else is dropped and",
        "# counted: `nft -j list counters`.",
        "#",
        "# Host names were resolved when this file was written; the addresses below are those",
        "# answers, and a changed address needs the ruleset written again.",
        "# ICMP errors a connection needs (unreachable, packet too big) are `related` to it and",
        "# accepted with it; redirects never; IPv6 neighbour discovery and the link's multicast",
        "# listener messages are accepted, router discovery is dropped; nothing else (no ping).",
        "# DNS, NTP and management (SSH) are not allowed: name devices by address (the plant",
        "# half cannot resolve a name while this is loaded). To manage the appliance through",
        "# a third interface, load rules after this file, e.g.:",
        f'#   insert rule inet {TABLE} input iifname "mgmt0" tcp dport 22 ct state new accept',
        f'#   insert rule inet {TABLE} output oifname "mgmt0" udp dport {{ 53, 123 }} '
        "ct state new accept",
        "# (`insert` puts them first; `add` would put them after the counted drop).",
        "",
    ]


def _raw_chains(ot: str, it: str) -> list[str]:
    zones = [(ot, OT_ZONE), (it, IT_ZONE)]
    return [
        "\tchain raw_prerouting {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        "\t\t# Before conntrack sees it: the zone of the NIC it came in on.",
        *(f'\t\tiifname "{name}" ct zone set {zone}' for name, zone in zones),
        "\t\t# Strict reverse path: the source must be routed back out of this very NIC.",
        '\t\tfib saddr . iif oif missing counter name "spoofed_dropped" drop',
        "\t}",
        "",
        "\tchain raw_output {",
        "\t\ttype filter hook output priority raw; policy accept;",
        *(f'\t\toifname "{name}" ct zone set {zone}' for name, zone in zones),
        "\t}",
    ]


def _base_chain(hook: Literal["input", "output"], match: str, ot: str, it: str) -> list[str]:
    side = "in" if hook == "input" else "out"
    return [
        f"\tchain {hook} {{",
        f"\t\ttype filter hook {hook} priority filter; policy drop;",
        f'\t\t{match} "lo" accept comment "the two halves and local tools"',
        f'\t\t{match}name vmap {{ "{ot}" : jump ot_{side}, "{it}" : jump it_{side} }}',
        '\t\tcounter name "other_dropped" drop',
        "\t}",
    ]


def _side_rules(side: Literal["ot", "it"], direction: Literal["in", "out"]) -> list[str]:
    """The head of one interface's chain: redirects are never followed (they would be
    `related` to a connection), the link's own IPv6 housekeeping, then answers."""
    lines = []
    if direction == "in":
        lines += [
            f'\t\ticmp type redirect counter name "{side}_dropped" drop',
            f'\t\ticmpv6 type nd-redirect counter name "{side}_dropped" drop',
        ]
    lines += [
        f"\t\tjump link_{direction}",
        "\t\tct state established,related accept",
        "\t\t# Invalid packets meet only `ct state new` accepts below: dropped and counted.",
    ]
    return lines


def _link_chain(direction: Literal["in", "out"]) -> list[str]:
    """IPv6's link housekeeping: conntrack does not track it, and its hop limit (255 for
    neighbour discovery, 1 for multicast listener messages) proves it never left the link."""
    mld = "mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report"
    router = "nd-router-advert, nd-router-solicit" if direction == "in" else "nd-router-solicit"
    return [
        f"\tchain link_{direction} {{",
        "\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
        f"\t\ticmpv6 type {{ {mld} }} ip6 hoplimit 1 accept",
        "\t\t# Static addresses: no router discovery, counted apart (not hostile by itself).",
        f'\t\ticmpv6 type {{ {router} }} counter name "router_discovery_dropped" drop',
        "\t}",
    ]


def _peer_rules(peers: Sequence[Peer], what: str, owner: str = "") -> list[str]:
    lines = [f"\t\t# Only {what}."] if peers else []
    for peer in peers:
        answers = ", ".join(str(address) for address in peer.addresses)
        # peer.host passed resolve(): an address or a host name, safe in a comment
        named = peer.host if answers == peer.host else f"{peer.host}, resolved to {answers}"
        lines.append(f"\t\t# {peer.key}: {named}")
        for family, addresses in _by_family(peer.addresses):
            lines.append(
                f"\t\t{owner}{family} daddr {_set(addresses)} {peer.transport} dport {peer.port} "
                f'ct state new accept comment "{peer.key}"'
            )
    return lines


def _listener_rules(cfg: BrokerConfig, it_allow: Sequence[Network]) -> list[str]:
    """New connections to the enterprise half's listening ports: the consumer port, and the
    OPC UA port when the half serves one."""
    listen, opcua = cfg.enterprise.listen, cfg.enterprise.opcua
    lines = _inbound_rules(
        ("Consumers", "consumer port"), "listen", listen.host, listen.port, it_allow
    )
    if opcua is not None:
        what = ("OPC UA clients", "OPC UA port")
        lines += _inbound_rules(what, "opcua", opcua.host, opcua.port, it_allow)
    return lines


def _inbound_rules(
    what: tuple[str, str], section: str, host: str, port: int, it_allow: Sequence[Network]
) -> list[str]:
    who, name = what
    syn = "tcp flags & (fin|syn|rst|ack) == syn"
    accept = f'tcp dport {port} {syn} ct state new accept comment "{name}"'
    key = f"config enterprise.{section}.host"
    own = resolve(key, host) if host else ()
    if own and all(address.is_loopback for address in own):
        # No packet from the IT NIC can reach a loopback address: nothing to open.
        return [f"\t\t# No rule for the {name}: {key} is {host}, loopback only."]
    if not own or all(address.is_unspecified for address in own):
        lines = [f"\t\t# {who} to this NIC's own addresses (the {section} address is any)."]
        targets = [("", "fib daddr . iif type local ")]
    else:
        lines = [f"\t\t# {who} to the {section} address ({key}: {host})."]
        targets = [(family, f"{family} daddr {_set(a)} ") for family, a in _by_family(own)]
    sources: list[tuple[str, str]] = [("", "")]
    if it_allow:
        lines.append("\t\t# From the --it-allow sources only.")
        sources = [(family, f"{family} saddr {_set(n)} ") for family, n in _by_family(it_allow)]
    else:
        lines.append("\t\t# From any source (--it-allow narrows it).")
    for source_family, source in sources:
        for target_family, target in targets:
            if source_family and target_family and source_family != target_family:
                continue
            lines.append(f"\t\t{source}{target}{accept}")
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

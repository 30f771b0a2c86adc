"""`discover opcua URL|dnp3 HOST:PORT|bacnet ADDRESS`: read a device and print a starter policy;
`discover pcap FILE`: draft one from a capture of the plant's traffic, sending nothing
(docs/discovery.md).

It sends Browse and Read only, over a session secured exactly like the connector's (the
server certificate pinned with `--pin` or found in `--trust`; `--security None` only when
asked for). A server that refuses the broker's certificate is named as such, in one line
with what to give its administrator to trust (exit 2). The output is YAML an OT owner
edits (paths, units, what to share) before it goes into a policy: discovery never decides
what crosses. `discover dnp3` sends one integrity poll (READ of class 0, and the CONFIRMs
the outstation asks for); `discover bacnet` sends Who-Is, ReadProperty and
ReadPropertyMultiple only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from broker.policy.device_schema import OPCUA_SECURITY_POLICIES


def add_to(commands: Any) -> None:
    group = commands.add_parser(
        "discover", help="read a device, or a capture of its traffic, and print a starter policy"
    )
    sub = group.add_subparsers(required=True, metavar="PROTOCOL")
    opcua = sub.add_parser("opcua", help="browse an OPC UA server (Browse and Read only)")
    opcua.add_argument("url", help="opc.tcp://host:port[/path]")
    opcua.add_argument("--security", choices=[*OPCUA_SECURITY_POLICIES, "None"],
                       default="Basic256Sha256", help="security policy (None only if you say so)")  # fmt: skip
    opcua.add_argument("--mode", choices=["SignAndEncrypt", "Sign"], default="SignAndEncrypt")
    opcua.add_argument("--certificate", type=Path, help="the plant's OPC UA certificate (.pem)")
    opcua.add_argument("--key", type=Path, help="its private key (.pem)")
    opcua.add_argument("--trust", type=Path, action="append", default=[],
                       help="a trusted server certificate, CA or folder of them (repeatable)")  # fmt: skip
    opcua.add_argument("--pin", help="the server certificate's SHA-256 (hex), instead of --trust")
    opcua.add_argument("--username", help="user identity (default: anonymous)")
    opcua.add_argument("--password-file", type=Path, help="the password, on its first line")
    opcua.add_argument("--device-name", default="opcua-plc", help="the device's name in the policy")
    opcua.add_argument("--max-nodes", type=int, default=5000, help="stop browsing after this many")
    opcua.set_defaults(handler=_discover_opcua)

    dnp3 = sub.add_parser("dnp3", help="list an outstation's points (one class 0 READ only)")
    dnp3.add_argument("address", type=host_port, metavar="HOST:PORT",
                      help="the outstation's TCP address (port 20000 if left out)")  # fmt: skip
    dnp3.add_argument("--outstation", type=int, required=True, metavar="ADDRESS",
                      help="the outstation's link address (no default: a guess could reach "
                      "another device behind a gateway)")  # fmt: skip
    dnp3.add_argument("--master", type=int, default=1, metavar="ADDRESS",
                      help="this master's link address, as the outstation expects it "
                      "(default: %(default)s)")  # fmt: skip
    dnp3.add_argument("--device-name", default="outstation",
                      help="the device's name in the policy (default: %(default)s)")  # fmt: skip
    dnp3.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                      help="to wait for the connection and each answer (default: %(default)s)")  # fmt: skip
    dnp3.set_defaults(handler=_discover_dnp3)

    bacnet = sub.add_parser("bacnet", help="list a device's objects (Who-Is and reads only)")
    bacnet.add_argument("address", type=host_port, metavar="ADDRESS",
                        help="HOST[:PORT] of the device, or the broadcast address of one of "
                        "this host's interfaces (port 47808 if left out)")  # fmt: skip
    bacnet.add_argument("--device-instance", type=int, metavar="N",
                        help="the device to list (default: the only one that answers)")  # fmt: skip
    bacnet.add_argument("--device-name", default="bacnet-device",
                        help="the device's name in the policy (default: %(default)s)")  # fmt: skip
    bacnet.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="to wait for each answer; a broadcast Who-Is collects I-Ams this "
                        "long (default: %(default)s)")  # fmt: skip
    bacnet.add_argument("--max-objects", type=int, default=5000, metavar="N",
                        help="read at most this many entries of the object-list "
                        "(default: %(default)s)")  # fmt: skip
    bacnet.add_argument("--port-local", type=int, default=0, metavar="PORT",
                        help="the UDP port to send from (default: %(default)s, any; 47808 to "
                        "hear devices that broadcast their I-Am)")  # fmt: skip
    bacnet.set_defaults(handler=_discover_bacnet)

    pcap = sub.add_parser("pcap", help="draft devices and signals from a packet capture "
                          "of the plant's own traffic (reads the file only; sends nothing)")  # fmt: skip
    pcap.add_argument("file", type=Path, metavar="FILE", help="a pcap or pcapng capture")
    pcap.add_argument("--json", action="store_true",
                      help="one JSON document on stdout: the draft, devices, signals, polled "
                      "ranges and warnings (docs/discovery.md); with --output, the draft is "
                      "written there too")  # fmt: skip
    pcap.add_argument("--redact", action="store_true",
                      help="addresses as host-1, host-2…; no observed values, BACnet names or "
                      "descriptions: a capture's draft to share with an integrator")  # fmt: skip
    pcap.add_argument("--output", type=Path, metavar="DRAFT.yaml",
                      help="write the draft here; the summary table goes to stdout")  # fmt: skip
    pcap.add_argument("--force", action="store_true",
                      help="let --output replace a file that exists")  # fmt: skip
    pcap.add_argument("--include-constant", action="store_true",
                      help="propose Modbus registers that never changed in the capture too "
                      "(spares, by default one header comment per run)")  # fmt: skip
    pcap.add_argument("--port", action="append", default=[], metavar="PROTOCOL=PORT",
                      help="another port of modbus (502), dnp3 (20000) or bacnet (47808), e.g. "
                      "modbus=5020 (repeatable; a port is one protocol's)")  # fmt: skip
    pcap.add_argument("--site", default="site", metavar="NAME",
                      help="the first word of each signal path (default: %(default)s)")  # fmt: skip
    pcap.set_defaults(handler=_discover_pcap)


def host_port(text: str) -> tuple[str, int | None]:
    """HOST or HOST:PORT (argparse type); the port's default is the protocol's."""
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, None
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST or HOST:PORT (port 1-65535)")
    return host, int(port)


def _discover_opcua(args: argparse.Namespace) -> int:
    # Imported here, not at the top: every CLI process (the halves' too) imports the command
    # modules, and only this command needs asyncua (0.2 s to import).
    from broker.plant.discovery import discover_opcua

    return discover_opcua(args)


def _discover_dnp3(args: argparse.Namespace) -> int:
    from broker.plant.discovery_dnp3 import discover_dnp3

    return discover_dnp3(args)


def _discover_bacnet(args: argparse.Namespace) -> int:
    # bacpypes3 takes about 0.5 s to import: only this command pays for it.
    from broker.plant.discovery_bacnet import discover_bacnet

    return discover_bacnet(args)


def _discover_pcap(args: argparse.Namespace) -> int:
    # scapy takes a while to import: only this command pays for it.
    from broker.passive.discover import discover_pcap

    return discover_pcap(args)

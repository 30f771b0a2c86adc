"""Browse an OPC UA server for `dmzbroker discover opcua`: Browse and Read only.

Run by the CLI, never by a running half. It sends Browse and Read only, over a session
secured exactly like the connector's, and prints YAML an OT owner edits before it goes into
a policy: discovery never decides what crosses. It never writes to the server.

A server certificate it cannot trust is named by its SHA-256, with the `--pin` and `--trust`
flags that would trust it: the operator compares it with the server's own display first;
discovery never trusts a certificate because it was offered.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections import deque
from dataclasses import dataclass

import msgspec
import yaml
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from cryptography import x509

from broker.config import OpcUaConfig, OpcUaUserConfig
from broker.errors import ConfigError, DeviceError, TrustError
from broker.plant.connectors.opcua_session import (
    ServerCertificateUntrusted,
    SessionSettings,
    fingerprint,
)
from broker.plant.discovery_starter import quiet_logs
from broker.policy import OpcUaDevice

MAX_DEPTH = 12  # folder levels below Objects
_SEGMENT = re.compile(r"[^a-z0-9_-]+")


@dataclass(frozen=True)
class Found:
    node: str
    browse_path: str
    data_type: str
    unit: str


def discover_opcua(args: argparse.Namespace) -> int:
    quiet_logs()
    device = _device(args)
    settings = SessionSettings.build(device, _plant_config(args, device), require_trust=False)
    try:
        found, complete, server_sha256 = asyncio.run(_browse(settings, args.max_nodes))
    except ServerCertificateUntrusted as e:
        raise TrustError(_how_to_trust(device, e)) from e
    print(_starter_policy(device, found, complete, server_sha256), end="")
    return 0


def _how_to_trust(device: OpcUaDevice, e: ServerCertificateUntrusted) -> str:
    """What the command line needs to trust this server: in its flags, not policy keys."""
    if device.server_certificate_sha256 is not None:
        why = f"does not match --pin {device.server_certificate_sha256}"
    else:
        why = "is not trusted by --pin or --trust"
    return (
        f"{device.endpoint}: the server's certificate (SHA-256 {e.sha256}, subject {e.subject})"
        f" {why}: compare it with the certificate the server itself shows, then run again "
        f"with --pin {e.sha256} (or --trust FILE: that certificate, or the CA that issued it)"
    )


def _device(args: argparse.Namespace) -> OpcUaDevice:
    fields = {
        "name": args.device_name,
        "endpoint": args.url,
        "security_policy": args.security,
        "security_mode": "None" if args.security == "None" else args.mode,
        "server_certificate_sha256": args.pin,
        "user_identity": "username" if args.username else "anonymous",
    }
    try:
        return msgspec.convert(fields, OpcUaDevice)
    except msgspec.ValidationError as e:
        raise ConfigError(f"discover opcua: {e}") from e


def _plant_config(args: argparse.Namespace, device: OpcUaDevice) -> OpcUaConfig | None:
    if args.certificate is None or args.key is None:
        if not device.unsecured:
            raise ConfigError(
                f"--security {device.security_policy} needs --certificate and --key "
                "(`dmzbroker certs issue opcua`), or --security None"
            )
        return None
    users = {}
    if args.username:
        if args.password_file is None:
            raise ConfigError("--username needs --password-file")
        users[device.name] = OpcUaUserConfig(
            username=args.username, password_file=args.password_file
        )
    return OpcUaConfig(
        certificate=args.certificate, private_key=args.key, trust_list=args.trust, users=users
    )


async def _browse(
    settings: SessionSettings, max_nodes: int
) -> tuple[list[Found], bool, str | None]:
    """Variables under Objects in the server's own namespaces, whether the walk was complete,
    and the SHA-256 of the server certificate trusted (None with security None)."""
    from broker.plant.connectors.opcua_session import failure, open_session  # noqa: PLC0415

    async with open_session(settings) as client:
        peer = None if settings.device.unsecured else client.security_policy.peer_certificate
        server_sha256 = fingerprint(x509.load_der_x509_certificate(peer)) if peer else None
        try:
            return (*await _variables(client, max_nodes), server_sha256)
        except Exception as e:  # whatever asyncua raises: one line, never a traceback
            raise DeviceError(f"browsing {settings.device.endpoint} failed: {failure(e)}") from e


async def _variables(client: Client, max_nodes: int) -> tuple[list[Found], bool]:
    """Breadth first along hierarchical references, each node once, at most `max_nodes`."""
    found: list[Found] = []
    pending: deque[tuple[Node, str, int]] = deque([(client.nodes.objects, "", 0)])
    seen: set[str] = set()
    while pending and len(seen) < max_nodes:
        node, path, depth = pending.popleft()
        for child in await node.get_children_descriptions(refs=ObjectIds.HierarchicalReferences):
            key = child.NodeId.to_string()
            if (
                child.NodeId.NamespaceIndex == 0  # the server's own machinery (Server, Aliases)
                or child.NodeClass not in (ua.NodeClass.Object, ua.NodeClass.Variable)
                or _is_property(child.ReferenceTypeId)  # read with the variable it describes
                or key in seen
            ):
                continue
            seen.add(key)
            child_path = f"{path}/{child.BrowseName.Name}" if path else str(child.BrowseName.Name)
            child_node = client.get_node(child.NodeId)
            if child.NodeClass == ua.NodeClass.Variable:
                found.append(await _describe(client, child_node, child_path))
            if depth < MAX_DEPTH:
                pending.append((child_node, child_path, depth + 1))
    return found, not pending


def _is_property(reference_type: ua.NodeId) -> bool:
    return reference_type.NamespaceIndex == 0 and reference_type.Identifier == ObjectIds.HasProperty


async def _describe(client: Client, node: Node, browse_path: str) -> Found:
    data_type = await node.read_data_type()
    if data_type.NamespaceIndex == 0 and isinstance(data_type.Identifier, int):
        type_name = ObjectIdNames.get(data_type.Identifier, str(data_type.Identifier))
    else:
        type_name = (await client.get_node(data_type).read_browse_name()).Name or ""
    unit = ""
    for prop in await node.get_properties():
        if (await prop.read_browse_name()).Name == "EngineeringUnits":
            units = await prop.read_value()
            unit = (units.DisplayName.Text or "") if isinstance(units, ua.EUInformation) else ""
    return Found(node.nodeid.to_string(), browse_path, type_name, unit)


def _starter_policy(
    device: OpcUaDevice, found: list[Found], complete: bool, server_sha256: str | None
) -> str:
    header = [
        f"# Starter signal list for {device.endpoint}: {len(found)} variables found"
        + ("" if complete else " (stopped at --max-nodes; raise it to see the rest)"),
        *([f"# Server certificate SHA-256: {server_sha256}"] if server_sha256 else []),
        "# Edit each path (site/area/asset/measure) and unit, delete what must not cross,",
        "# then copy this into the policy and have it co-signed.",
    ]
    document = {
        "devices": [
            {
                "name": device.name,
                "protocol": "opcua",
                "endpoint": device.endpoint,
                "security_policy": device.security_policy,
                "security_mode": device.security_mode,
                **(
                    {"server_certificate_sha256": device.server_certificate_sha256}
                    if device.server_certificate_sha256
                    else {}
                ),
            }
        ],
        "signals": [
            {
                "path": _signal_path(device.name, f.browse_path),
                "device": device.name,
                "source": {"node": f.node},  # the device says the protocol
                "unit": f.unit,
                "description": f"{f.browse_path} ({f.data_type})",
            }
            for f in found
        ],
    }
    return "\n".join(header) + "\n" + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _signal_path(device: str, browse_path: str) -> str:
    """A valid signal path to start from: the device, then the browse path, in lower case."""
    parts = [_SEGMENT.sub("-", part.lower()).strip("-_")[:63] for part in browse_path.split("/")]
    return "/".join([device, *[p for p in parts if p][-7:]])

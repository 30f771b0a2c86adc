"""A throwaway appliance in a directory, for the demo and the benchmark.

Everything an integrator sets up by hand (docs/policy.md, README): a CA with a server and
one consumer certificate, an OT and an IT owner key, a trust root naming them and signed by
both, the policy compiled and co-signed, an audit key, and a `broker.yaml` pointing at all of
it; with an OPC UA port, the read-only OPC UA server's certificate and the consumer's OPC UA
application certificate too. Development only: keys are unencrypted and short-lived.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import yaml

from broker.health import CERT_WARNING_DAYS
from broker.policy import Policy, trustroot
from broker.policy import envelope as envelopes
from broker.trust import certs, keys, revocation

# Short-lived, yet well past the broker's own expiry warning: a fresh appliance must not
# warn `certificate_expiring` about the certificates it has just made.
DAYS = 3 * CERT_WARNING_DAYS


@dataclass(frozen=True)
class OpcUaAccess:
    """How the one consumer reaches the read-only OPC UA server."""

    port: int  # on 127.0.0.1
    cert: Path  # the consumer's application certificate: its URI SAN is the identity
    key: Path
    server_cert: Path  # for the client to pin the server by

    @property
    def url(self) -> str:
        return f"opc.tcp://localhost:{self.port}"


@dataclass(frozen=True)
class Appliance:
    config: Path
    ca: Path
    client_cert: Path  # the one consumer's
    client_key: Path
    opcua: OpcUaAccess | None = None


def provision(
    workdir: Path, policy: Policy, *, port: int, consumer_uri: str, opcua_port: int | None = None
) -> Appliance:
    """The appliance in `workdir`: its API on 127.0.0.1:`port`, and with `opcua_port` the
    read-only OPC UA server on 127.0.0.1:`opcua_port` as well."""
    pki = workdir / "certs"
    ca = certs.init_ca(pki, "dmzbroker throwaway CA", days=DAYS)
    certs.issue_server(pki, pki, name="server", dns=["localhost"], ips=["127.0.0.1"], days=DAYS)
    name = consumer_uri.rstrip("/").rpartition("/")[2]
    client = certs.issue_client(pki, pki, name=name, uri=consumer_uri, days=DAYS)
    enterprise: dict[str, object] = {}
    opcua = None
    if opcua_port is not None:
        server = certs.issue_opcua_server(
            pki, pki, name="opcua-server", uri=f"urn:dmzbroker:{policy.deployment_id}:opcua",
            dns=["localhost"], ips=["127.0.0.1"], days=DAYS,
        )  # fmt: skip
        reader = certs.issue_opcua(pki, pki, name=f"{name}-opcua", uri=consumer_uri, dns=[],
                                   days=DAYS)  # fmt: skip
        enterprise["opcua"] = {"host": "127.0.0.1", "port": opcua_port,
                               "certificate": f"certs/{server.cert.name}",
                               "private_key": f"certs/{server.key.name}"}  # fmt: skip
        opcua = OpcUaAccess(opcua_port, reader.cert, reader.key, server.cert)
    revocation.write_crl(pki, days=DAYS)
    _co_sign(policy, workdir)
    keys.generate_pair(workdir / "audit-key", "audit", passphrase=None)
    _maintenance_records(workdir / "maintenance.csv")
    config = workdir / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy": "policy.dsse.json",
                "trust_root": "trust-root.yaml",
                "spool": {"dir": "spool"},
                "plant": {
                    "state_dir": "plant-state",
                    "maintenance": {"file": "maintenance.csv"},
                },
                "enterprise": {
                    "state_dir": "enterprise-state",
                    "listen": {"host": "127.0.0.1", "port": port},
                    "tls": {
                        "cert": "certs/server.crt",
                        "key": "certs/server.key",
                        "client_ca": "certs/ca.crt",
                        "crl": "certs/crl.pem",
                    },
                    **enterprise,
                },
                "audit": {"dir": "audit", "key": "audit-key/audit.key"},
            },
            sort_keys=False,
        )
    )
    return Appliance(config, ca.cert, client.cert, client.key, opcua)


def _maintenance_records(path: Path) -> None:
    """What a CMMS would export for the demo plant: one asset due for service soon."""
    today = date.today()
    rows = [
        ("coldstore/machine-room/compressor-1", -60, 30, "WO-1042: Replace compressor oil filter"),
        ("coldstore/machine-room/condenser-1", -170, 5, ""),
        (
            "coldstore/storage/cold-room-1",
            -20,
            160,
            "WO-1051: Door gasket torn; WO-1055: Recalibrate sensor",
        ),
        ("coldstore/storage/cold-room-2", -45, 135, ""),
    ]
    lines = ["asset,last_service,next_due,open_work_orders"]
    for asset, last, due, orders in rows:
        last_day, due_day = today + timedelta(days=last), today + timedelta(days=due)
        lines.append(f"{asset},{last_day},{due_day},{orders}")
    path.write_text("\n".join(lines) + "\n")


def _co_sign(policy: Policy, workdir: Path) -> None:
    """What an OT owner and an IT owner do by hand (docs/policy.md)."""
    owners = workdir / "owners"
    ot = keys.generate(owners, "Demo OT owner", "ot", passphrase=None)
    it = keys.generate(owners, "Demo IT owner", "it", passphrase=None)
    ot_key, it_key = (keys.load_private(o.private, passphrase=None) for o in (ot, it))
    root = trustroot.unsigned(
        policy.deployment_id,
        1,
        {"ot": 1, "it": 1},
        [
            trustroot.owner("Demo OT owner", "ot", ot_key.public_key()),
            trustroot.owner("Demo IT owner", "it", it_key.public_key()),
        ],
    )
    for key in (ot_key, it_key):
        root = envelopes.sign(root, key)
    envelopes.write(root, workdir / "trust-root.yaml")
    envelope = envelopes.compile_policy(policy)
    for key in (ot_key, it_key):
        envelope = envelopes.sign(envelope, key)
    envelopes.write(envelope, workdir / "policy.dsse.json")

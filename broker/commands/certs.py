"""`certs`: the appliance's small certificate authority."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.trust import certs


def add_to(commands: Any) -> None:
    group = commands.add_parser("certs", help="certificate authority for consumers and servers")
    sub = group.add_subparsers(required=True, metavar="COMMAND")
    init = sub.add_parser("init-ca", help="create a certificate authority")
    init.add_argument("--out", type=Path, required=True, help="directory for ca.crt and ca.key")
    init.add_argument("--name", required=True, help="the CA's common name")
    init.add_argument("--days", type=int, default=3650)
    init.set_defaults(handler=lambda a: _report(certs.init_ca(a.out, a.name, a.days)))

    issue = sub.add_parser("issue", help="issue a server or client certificate")
    kinds = issue.add_subparsers(required=True, metavar="KIND")
    server = kinds.add_parser("server", help="a TLS server certificate (DNS and IP SANs)")
    client = kinds.add_parser("client", help="a consumer certificate (exactly one URI SAN)")
    for kind, days in ((server, 366), (client, 90)):
        kind.add_argument("--ca", type=Path, required=True, help="directory with ca.crt, ca.key")
        kind.add_argument("--out", type=Path, required=True, help="directory for NAME.crt/.key")
        kind.add_argument("--days", type=int, default=days)
    server.add_argument("--name", default="server")
    server.add_argument("--dns", action="append", default=[], help="a DNS name (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="an IP address (repeatable)")
    server.set_defaults(
        handler=lambda a: _report(
            certs.issue_server(a.ca, a.out, name=a.name, dns=a.dns, ips=a.ip, days=a.days)
        )
    )
    client.add_argument("--uri", required=True, help="e.g. spiffe://site/consumer/historian")
    client.add_argument("--name", help="file name (default: the URI's last segment)")
    client.set_defaults(
        handler=lambda a: _report(
            certs.issue_client(
                a.ca,
                a.out,
                name=a.name or a.uri.rstrip("/").rpartition("/")[2],
                uri=a.uri,
                days=a.days,
            )
        )
    )


def _report(issued: certs.Issued) -> int:
    print(f"certificate: {issued.cert}\nprivate key: {issued.key}")
    return 0

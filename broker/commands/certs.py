"""`certs`: the appliance's small certificate authority."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from broker.trust import certs, revocation

DEFAULT_CA = Path("certs")


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
    opcua = kinds.add_parser(
        "opcua", help="the plant half's OPC UA application instance certificate (RSA)"
    )
    for kind, days in ((server, 366), (client, 90), (opcua, 366)):
        kind.add_argument("--ca", type=Path, default=DEFAULT_CA, help="CA directory (certs/)")
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

    opcua.add_argument("--uri", required=True, help="the application URI, e.g. urn:site:dmzbroker")
    opcua.add_argument("--name", default="opcua-client")
    opcua.add_argument("--dns", action="append", default=[], help="the plant host's name")
    opcua.set_defaults(
        handler=lambda a: _report(
            certs.issue_opcua(a.ca, a.out, name=a.name, uri=a.uri, dns=a.dns, days=a.days)
        )
    )

    listing = sub.add_parser("list", help="every certificate this CA issued, with days left")
    listing.add_argument("--ca", type=Path, default=DEFAULT_CA, help="CA directory (certs/)")
    listing.set_defaults(handler=_list)

    revoke = sub.add_parser("revoke", help="revoke a certificate (then publish a CRL)")
    revoke.add_argument("serial", help="as `certs list` shows it (hex)")
    revoke.add_argument("--reason", required=True, choices=sorted(revocation.REASONS))
    revoke.add_argument("--ca", type=Path, default=DEFAULT_CA, help="CA directory (certs/)")
    revoke.set_defaults(handler=_revoke)

    crl = sub.add_parser("crl", help="write the CA's certificate revocation list")
    crl.add_argument("--ca", type=Path, default=DEFAULT_CA, help="CA directory (certs/)")
    crl.add_argument("--days", type=int, default=7, help="until its nextUpdate")
    crl.add_argument("--out", type=Path, help="default: CA directory/crl.pem")
    crl.set_defaults(handler=lambda a: _wrote(revocation.write_crl(a.ca, a.days, a.out)))

    check = sub.add_parser("check", help="warn on certificates ending within 30 days, a stale CRL")
    check.add_argument("--ca", type=Path, default=DEFAULT_CA, help="CA directory (certs/)")
    check.add_argument("--crl", type=Path, help="default: CA directory/crl.pem")
    check.set_defaults(handler=_check)


def _list(args: argparse.Namespace) -> int:
    print(f"{'serial':<40}  {'not after':<10}  {'days':>5}  {'revoked':<22}  subject / SANs")
    for cert in revocation.inventory(args.ca):
        revoked = f"{cert.revoked.reason}" if cert.revoked else "-"
        print(
            f"{cert.serial:<40}  {cert.not_after:%Y-%m-%d}  {cert.days_left:>5.0f}  "
            f"{revoked:<22}  {cert.subject}  {', '.join(cert.sans)}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    revocation.revoke(args.ca, args.serial, args.reason)
    print(f"revoked {args.serial} ({args.reason}); publish it with `dmzbroker certs crl`")
    return 0


def _wrote(path: Path) -> int:
    print(f"CRL: {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    found = revocation.problems(args.ca, args.crl)
    for problem in found:
        print(f"WARNING: {problem}")
    print("OK" if not found else f"{len(found)} warning(s)")
    return 1 if found else 0


def _report(issued: certs.Issued) -> int:
    print(f"certificate: {issued.cert}\nprivate key: {issued.key}")
    return 0

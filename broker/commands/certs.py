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
    init.add_argument("--days", type=int, default=3650, help="validity (default: %(default)s)")
    init.add_argument(
        "--key-type",
        choices=certs.CA_KEY_TYPES,
        default="ecdsa",
        help="ecdsa (P-256, default) or rsa (3072-bit: it then signs with RSA-PKCS1v15-SHA256, "
        "the certificate signature OPC UA security profiles list; for RSA-only OPC UA servers)",
    )
    init.set_defaults(handler=lambda a: _report(certs.init_ca(a.out, a.name, a.days, a.key_type)))

    issue = sub.add_parser("issue", help="issue a server or client certificate")
    kinds = issue.add_subparsers(required=True, metavar="KIND")
    server = kinds.add_parser("server", help="a TLS server certificate (DNS and IP SANs)")
    client = kinds.add_parser("client", help="a consumer certificate (exactly one URI SAN)")
    opcua = kinds.add_parser(
        "opcua",
        help="the plant half's OPC UA application instance certificate (RSA)",
        description="Writes NAME-cert.pem and NAME-key.pem (the key with mode 0600) in --out; "
        "with --der also NAME-cert.der and ca-FINGERPRINT.der (the issuing CA, named by the "
        "first 8 hex digits of its SHA-256, so that two CAs' copies never replace each other), "
        "the files an OPC UA server's administrator puts in its trust store (with the CA's CRL: "
        "`certs crl --der`). See docs/opcua.md.",
    )
    opcua_server = kinds.add_parser(
        "opcua-server",
        help="the enterprise half's OPC UA server certificate (RSA, serverAuth + clientAuth)",
        description="Writes NAME-cert.pem and NAME-key.pem (the key with mode 0600) in --out, "
        "for enterprise.opcua.certificate and .private_key: an RSA key, the application URI "
        "and the host names (--dns) and addresses (--ip) clients connect to as SANs; with "
        "--der also the DER copies, as `issue opcua`. See docs/opcua-server.md.",
    )
    opcua_files = "NAME-cert.pem and NAME-key.pem (--der: NAME-cert.der, ca-FINGERPRINT.der)"
    for kind, days, files in (
        (server, 366, "NAME.crt and NAME.key"),
        (client, 90, "NAME.crt and NAME.key"),
        (opcua, 366, opcua_files),
        (opcua_server, 366, opcua_files),
    ):
        kind.add_argument("--ca", type=Path, default=DEFAULT_CA, help="CA directory (certs/)")
        kind.add_argument("--out", type=Path, required=True, help=f"directory for {files}")
        kind.add_argument("--days", type=int, default=days, help="validity (default: %(default)s)")
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

    for kind, name, host in (
        (opcua, "opcua-client", "the plant host's name"),
        (opcua_server, "opcua-server", "a name clients connect to (repeatable)"),
    ):
        kind.add_argument(
            "--uri", required=True, help="the application URI, e.g. urn:site:dmzbroker"
        )
        kind.add_argument("--name", default=name, help="file names (default: %(default)s)")
        kind.add_argument("--dns", action="append", default=[], help=host)
        kind.add_argument(
            "--der",
            action="store_true",
            help="also write NAME-cert.der and ca-FINGERPRINT.der (the issuing CA), in DER",
        )
    opcua_server.add_argument(
        "--ip", action="append", default=[], help="an address clients connect to (repeatable)"
    )
    opcua_server.set_defaults(
        handler=lambda a: _report(
            certs.issue_opcua_server(
                a.ca, a.out, name=a.name, uri=a.uri, dns=a.dns, ips=a.ip, days=a.days, der=a.der
            )
        )
    )
    opcua.set_defaults(
        handler=lambda a: _report(
            certs.issue_opcua(
                a.ca, a.out, name=a.name, uri=a.uri, dns=a.dns, days=a.days, der=a.der
            )
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
    crl.add_argument(
        "--der",
        action="store_true",
        help="also write a DER copy beside the CRL, named as it with .der (default: CA "
        "directory/crl.der). Neither replaces a file that is not a CRL",
    )
    crl.set_defaults(handler=_crl)

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


def _crl(args: argparse.Namespace) -> int:
    path = revocation.write_crl(args.ca, args.days, args.out, der=args.der)
    print(f"CRL: {path}" + (f"\nCRL (DER): {revocation.der_copy(path)}" if args.der else ""))
    return 0


def _check(args: argparse.Namespace) -> int:
    found = revocation.problems(args.ca, args.crl)
    for problem in found:
        print(f"WARNING: {problem}")
    print("OK" if not found else f"{len(found)} warning(s)")
    return 1 if found else 0


def _report(issued: certs.Issued) -> int:
    print(f"certificate: {issued.cert}\nprivate key: {issued.key}")
    for path, what in zip(issued.der, ("certificate (DER)", "issuing CA (DER)"), strict=False):
        print(f"{what}: {path}")
    return 0

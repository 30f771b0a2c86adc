"""The one command line: `dmzbroker run|plant|enterprise|demo|certs`.

Each command imports only what it runs: the plant process never loads the enterprise half's
code and the reverse, so the boundary holds inside each process as well as between them.

Every user-facing failure is one line on stderr (`dmzbroker: error: …`) and an exit code:
2 for configuration and trust problems, 1 for others. Never a traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from broker import __version__, config, logs, policy
from broker.errors import DmzBrokerError
from broker.lifecycle import run_until_signalled
from broker.trust import certs

DEFAULT_CONFIG = Path("/etc/dmzbroker/broker.yaml")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DmzBrokerError as e:
        print(f"dmzbroker: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmzbroker", description="One-way, deny-by-default OT/IT boundary broker."
    )
    parser.add_argument("--version", action="version", version=f"dmzbroker {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    for name, handler, help_text in (
        ("run", _run, "start the plant half and the enterprise half as two processes"),
        ("plant", _plant, "start the plant half only (reads devices, writes the spool)"),
        (
            "enterprise",
            _enterprise,
            "start the enterprise half only (reads the spool, serves consumers)",
        ),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="broker.yaml")
        command.add_argument(
            "--log-format", choices=("auto", "json", "console"), help="overrides log.format"
        )
        command.set_defaults(handler=handler)

    demo = commands.add_parser(
        "demo", help="run a simulated refrigeration plant through the broker",
        description="Generate a throwaway PKI, start a simulated plant and the broker on it.",
    )  # fmt: skip
    demo.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"), help="demo files (recreated)")
    demo.add_argument("--policy", type=Path, default=Path("policies/refrigeration.yaml"))
    demo.add_argument("--port", type=int, default=8443, help="HTTPS port of the consumer API")
    demo.set_defaults(handler=_demo)

    _add_certs(commands.add_parser("certs", help="certificate authority for consumers and servers"))
    return parser


def _add_certs(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    init = commands.add_parser("init-ca", help="create a certificate authority")
    init.add_argument("--out", type=Path, required=True, help="directory for ca.crt and ca.key")
    init.add_argument("--name", required=True, help="the CA's common name")
    init.add_argument("--days", type=int, default=3650)
    init.set_defaults(handler=lambda a: _report(certs.init_ca(a.out, a.name, a.days)))

    issue = commands.add_parser(
        "issue", help="issue a server or client certificate"
    ).add_subparsers(required=True, metavar="KIND")
    server = issue.add_parser("server", help="a TLS server certificate (DNS and IP SANs)")
    client = issue.add_parser("client", help="a consumer certificate (exactly one URI SAN)")
    for kind, days in ((server, 366), (client, 90)):
        kind.add_argument(
            "--ca", type=Path, required=True, help="directory holding ca.crt and ca.key"
        )
        kind.add_argument(
            "--out", type=Path, required=True, help="directory for NAME.crt and NAME.key"
        )
        kind.add_argument("--days", type=int, default=days)
    server.add_argument("--name", default="server")
    server.add_argument("--dns", action="append", default=[], help="a DNS name (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="an IP address (repeatable)")
    server.set_defaults(
        handler=lambda a: _report(
            certs.issue_server(a.ca, a.out, name=a.name, dns=a.dns, ips=a.ip, days=a.days)
        )
    )
    client.add_argument(
        "--uri", required=True, help="identity, e.g. spiffe://site/consumer/historian"
    )
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


def _load(args: argparse.Namespace, process: str) -> tuple[config.BrokerConfig, policy.Policy]:
    cfg = config.load(args.config)
    logs.configure(args.log_format or cfg.log.format, process)
    return cfg, policy.load(cfg.policy)


def _run(args: argparse.Namespace) -> int:
    from broker.supervisor import Supervisor

    cfg, _ = _load(args, "supervisor")  # refuse a bad config before starting anything
    return run_until_signalled(Supervisor(args.config, args.log_format or cfg.log.format).run())


def _plant(args: argparse.Namespace) -> int:
    from broker.plant.run import run_plant

    return run_until_signalled(run_plant(*_load(args, "plant")))


def _enterprise(args: argparse.Namespace) -> int:
    from broker.enterprise.run import run_enterprise

    return run_until_signalled(run_enterprise(*_load(args, "enterprise")))


def _demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    logs.configure("auto", "demo")
    return run_until_signalled(
        run_demo(args.workdir, args.policy.resolve(), args.seconds, args.port)
    )

"""`keys generate`: an OT or IT owner's policy signing key."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from broker.errors import TrustError
from broker.trust import keys


def add_to(commands: Any) -> None:
    group = commands.add_parser("keys", help="owner keys that sign policies")
    sub = group.add_subparsers(required=True, metavar="COMMAND")
    generate = sub.add_parser("generate", help="a new Ed25519 signing key for an owner")
    generate.add_argument("--role", choices=keys.ROLES, required=True, help="the owner's side")
    generate.add_argument("--name", required=True, help="who holds it, e.g. 'Jane Doe (OT)'")
    generate.add_argument("--out", type=Path, required=True, help="directory for the key files")
    protect = generate.add_mutually_exclusive_group()
    protect.add_argument("--passphrase-file", type=Path, help="encrypt with the file's first line")
    protect.add_argument("--encrypt", action="store_true", help="encrypt; ask for a passphrase")
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    passphrase = read_passphrase(args.passphrase_file, ask=args.encrypt, confirm=True)
    generated = keys.generate(args.out, args.name, args.role, passphrase)
    owner = f"{args.role}:{args.name}:{generated.public}"
    print(
        f"private key: {generated.private} (keep it offline; mode 0600)\n"
        f"public key:  {generated.public}\n"
        f"key id:      {generated.keyid}\n"
        "Then list it in the appliance's trust root:\n"
        f"  a first root:  dmzbroker trust init --deployment-id ID "
        f"--owner '{owner}' --owner … --out trust-root.yaml\n"
        f"  an existing root:  dmzbroker trust rotate trust-root.yaml "
        f"--add-owner '{owner}' --out trust-root-next.yaml\n"
        "and have the owners sign it with `dmzbroker trust sign`."
    )
    return 0


def read_passphrase(path: Path | None, *, ask: bool, confirm: bool = False) -> bytes | None:
    """The passphrase from a file's first line, or asked on the terminal; None for neither."""
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise TrustError(f"{path}: cannot read the passphrase file: {e.strerror}") from e
        if not lines or not lines[0]:
            raise TrustError(f"{path}: the passphrase file is empty")
        return lines[0].encode()
    if not ask:
        return None
    if not sys.stdin.isatty():
        raise TrustError("a passphrase is needed; give --passphrase-file when not on a terminal")
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise TrustError("the passphrases differ")
    if not first:
        raise TrustError("an empty passphrase protects nothing")
    return first.encode()

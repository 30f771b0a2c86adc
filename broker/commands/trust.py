"""`trust init|sign|show|verify|rotate`: the signed trust root's workflow (docs/policy.md).

Writes only unsigned roots and signatures made with a key the user names; never overwrites a
root file, and never reports a root as VERIFIED unless its owners' thresholds are met (and,
with --current, those of the root in force, as TUF root rotation requires).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.audit.show import inert
from broker.commands.outputs import out_file
from broker.commands.policy import add_signature, print_signatures
from broker.errors import ConfigError, TrustRootRefused
from broker.policy import envelope as envelopes
from broker.policy import trustroot
from broker.policy.envelope import Envelope
from broker.policy.verify import OwnerKey, describe_shortfall
from broker.trust import keys
from broker.trust.keys import ROLES, Role

OWNER_SPEC = "ROLE:NAME:PUBFILE"


def add_to(commands: Any) -> None:
    group = commands.add_parser("trust", help="the signed trust root: owner keys and thresholds")
    sub = group.add_subparsers(required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="a first trust root, version 1, unsigned")
    init.add_argument("--deployment-id", required=True, help="the appliance's deployment id")
    init.add_argument(
        "--owner",
        action="append",
        required=True,
        metavar=OWNER_SPEC,
        help="an owner key, e.g. ot:'Jane Doe':ot-jane-doe.pub (repeat)",
    )
    _thresholds(init, "default 1")
    init.add_argument(
        "--out", type=out_file("trust-root.yaml"), required=True, help="e.g. trust-root.yaml"
    )
    init.set_defaults(handler=_init)

    sign = sub.add_parser("sign", help="add one owner's signature (in place)")
    sign.add_argument("root", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the owner's private key")
    sign.add_argument("--passphrase-file", type=Path, help="for an encrypted key")
    sign.set_defaults(handler=_sign)

    show = sub.add_parser("show", help="owners, thresholds, who signed, what is missing")
    show.add_argument("root", type=Path)
    show.set_defaults(handler=_show)

    check = sub.add_parser("verify", help="non-zero exit unless the owners' thresholds are met")
    check.add_argument("root", type=Path)
    check.add_argument("--current", type=Path, help="the root in force that ROOT would replace")
    check.set_defaults(handler=_verify)

    rotate = sub.add_parser("rotate", help="the next version of a root, unsigned")
    rotate.add_argument("current", type=Path, help="the root in force")
    rotate.add_argument(
        "--out", type=out_file("trust-root-next.yaml"), required=True, help="the new root"
    )
    rotate.add_argument("--add-owner", action="append", default=[], metavar=OWNER_SPEC)
    rotate.add_argument("--remove-owner", action="append", default=[], metavar="NAME")
    _thresholds(rotate, "default: as in CURRENT")
    rotate.set_defaults(handler=_rotate)


def _thresholds(parser: argparse.ArgumentParser, default: str) -> None:
    for role in ROLES:
        parser.add_argument(
            f"--threshold-{role}",
            type=_positive,
            metavar="N",
            help=f"{role.upper()} owner signatures required ({default})",
        )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 signature is required")
    return value


def _init(args: argparse.Namespace) -> int:
    owners = [_owner("--owner", spec) for spec in args.owner]
    thresholds = _chosen_thresholds(args, {"ot": 1, "it": 1}, owners, "--owner")
    root = trustroot.unsigned(args.deployment_id, 1, thresholds, owners)
    _write_new(root, args.out)
    print(f"{args.out}: trust root version 1 for {args.deployment_id!r}, unsigned")
    _next_steps(args.out, thresholds, None)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    current = trustroot.load(args.current)
    owners = list(current.keys.values())
    for name in args.remove_owner:
        kept = [o for o in owners if o.name != name]
        if len(kept) == len(owners):
            listed = ", ".join(repr(o.name) for o in owners)
            raise ConfigError(
                f"--remove-owner {name!r}: {args.current} has no owner of that name "
                f"(owners: {listed})"
            )
        owners = kept
    for spec in args.add_owner:
        added = _owner("--add-owner", spec)
        same = [o for o in owners if o.keyid == added.keyid]
        if same:
            raise ConfigError(
                f"--add-owner {spec!r}: this key is already in the trust root as "
                f"{same[0].name!r} ({same[0].role.upper()})"
            )
        owners.append(added)
    thresholds = _chosen_thresholds(args, current.thresholds, owners, "owner")
    version = current.version + 1
    root = trustroot.unsigned(current.deployment_id, version, thresholds, owners)
    _write_new(root, args.out)
    print(f"{args.out}: trust root version {version} for {current.deployment_id!r}, unsigned")
    _next_steps(args.out, thresholds, (args.current, current))
    return 0


def _sign(args: argparse.Namespace) -> int:
    examined = trustroot.examine(envelopes.read_bytes(args.root), str(args.root))
    owners = examined.root.keys
    key = add_signature(args.root, examined.envelope, args.key, args.passphrase_file, owners)
    if keys.key_id(key.public_key()) not in examined.root.keys:
        print(
            "note: this key is not an owner in this root; its signature counts only for the "
            "root in force that this one replaces (`dmzbroker trust verify ROOT --current …`)"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    examined = trustroot.examine(envelopes.read_bytes(args.root), str(args.root))
    root = examined.root
    print(f"trust root:  {args.root}")
    print(f"deployment:  {inert(root.deployment_id)}")
    print(f"version:     {root.version}")
    print(f"sha256:      {root.sha256}")
    print(f"thresholds:  OT {root.thresholds['ot']}, IT {root.thresholds['it']}")
    print("owners:")
    for key in sorted(root.keys.values(), key=lambda k: (k.role, k.name)):
        print(f"  {key.role.upper()}  {inert(key.name)}  key {key.keyid}")
    print_signatures(examined.verification, root, listed_in="this trust root")
    if examined.verification.ok:
        print("signed by its own owners at their thresholds")
    else:
        print(f"NOT SIGNED ENOUGH: {describe_shortfall(examined.verification, 'this trust root')}")
    return 0  # a report: `trust verify` is the check


def _verify(args: argparse.Namespace) -> int:
    data = envelopes.read_bytes(args.root)
    examined = trustroot.examine(data, str(args.root))
    root = examined.root
    print(f"trust root version {root.version} for {root.deployment_id!r}; its own owners:")
    print_signatures(examined.verification, root, listed_in="this trust root")
    problems = []
    replaces = ""
    if not examined.verification.ok:
        shortfall = describe_shortfall(examined.verification, "this trust root")
        problems.append(f"its own owners: {shortfall}")
    if args.current is not None:
        current = trustroot.load(args.current)
        by_current = trustroot.rotation_check(current, data)
        print(f"owners of the root in force ({args.current}, version {current.version}):")
        print_signatures(by_current, current, listed_in="the root in force")
        replaces = f", may replace version {current.version}"
        if not problems:
            try:
                trustroot.check_rotation(current, root)
            except TrustRootRefused as e:
                problems.append(f"{e.reason}: {e}")
        elif not by_current.ok and root.sha256 != current.sha256:
            problems.append(f"the root in force: {describe_shortfall(by_current, 'it')}")
    if problems:
        print(f"NOT VERIFIED: {'; '.join(problems)}")
        return 1
    print(f"VERIFIED: version {root.version}, sha256 {root.sha256}{replaces}")
    return 0


def _owner(flag: str, spec: str) -> OwnerKey:
    """ROLE:NAME:PUBFILE → the owner; the name may hold colons, the role may not."""
    role_text, _, rest = spec.partition(":")
    name, _, file = rest.rpartition(":")
    role = role_text.strip().lower()
    if role not in ROLES or not name.strip() or not file:
        raise ConfigError(
            f"{flag} {spec!r}: expected {OWNER_SPEC} with ROLE ot or it, "
            "e.g. ot:Jane Doe:ot-jane-doe.pub"
        )
    path = Path(file)
    where = f"{flag} {spec!r}: {path}"
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read it as a PEM public key ({e})") from e
    if "PRIVATE KEY" in text:
        raise ConfigError(
            f"{where}: a private key; give the owner's public key (the .pub file) and keep "
            "the private key with its owner"
        )
    checked: Role = "ot" if role == "ot" else "it"
    return trustroot.owner(name.strip(), checked, keys.parse_public_pem(text, where))


def _chosen_thresholds(
    args: argparse.Namespace,
    defaults: dict[Role, int],
    owners: Sequence[OwnerKey],
    given_as: str,
) -> dict[Role, int]:
    chosen: dict[Role, int] = {}
    for role in ROLES:
        flag = getattr(args, f"threshold_{role}")
        threshold = defaults[role] if flag is None else flag
        available = sum(1 for o in owners if o.role == role)
        if threshold > available:
            source = (
                f"--threshold-{role} {threshold}"
                if flag is not None
                else (f"the {role.upper()} threshold {threshold}")
            )
            raise ConfigError(
                f"{source}: needs {threshold} {role.upper()} signature(s) but only {available} "
                f"{role.upper()} {given_as} key(s) would be listed"
            )
        chosen[role] = threshold
    return chosen


def _write_new(root: Envelope, out: Path) -> None:
    try:
        with out.open("xb") as f:  # never replace a root: the one in force may be there
            f.write(envelopes.encode(root))
    except FileExistsError as e:
        raise ConfigError(
            f"{out}: already exists; not overwriting it (choose another --out)"
        ) from e
    except OSError as e:
        raise ConfigError(f"{out}: cannot write: {e.strerror}") from e


def _next_steps(
    out: Path, thresholds: dict[Role, int], current: tuple[Path, trustroot.TrustRoot] | None
) -> None:
    need = f"{thresholds['ot']} OT and {thresholds['it']} IT owner(s) of this root"
    if current is not None:
        path, root = current
        need += (
            f", and {root.thresholds['ot']} OT and {root.thresholds['it']} IT owner(s) of "
            f"{path} (version {root.version})"
        )
    print(f"Next: have {need} sign it with `dmzbroker trust sign {out} --key OWNER.key`,")
    check = f"dmzbroker trust verify {out}" + (f" --current {current[0]}" if current else "")
    print(f"then check it with `{check}`.")

"""`policy compile|show|diff|sign|verify`: the co-signing workflow (docs/policy.md)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.show import inert
from broker.commands import plan
from broker.commands.keys import read_passphrase
from broker.commands.outputs import out_file
from broker.errors import TrustError
from broker.policy import envelope as envelopes
from broker.policy import parse, report, trustroot, verify
from broker.policy.collection import paused_throughout
from broker.policy.envelope import Envelope
from broker.policy.verify import OwnerKey
from broker.trust import keys


def add_to(commands: Any) -> None:
    group = commands.add_parser("policy", help="compile, review, sign and verify policies")
    sub = group.add_subparsers(required=True, metavar="COMMAND")

    compile_ = sub.add_parser("compile", help="YAML → an unsigned, canonical policy envelope")
    compile_.add_argument("source", type=Path, help="the policy as written, YAML")
    compile_.add_argument(
        "--out",
        type=out_file("site.dsse.json"),
        metavar="FILE",
        help="the envelope to write (default: SOURCE with .dsse.json)",
    )
    compile_.set_defaults(handler=_compile)

    show = sub.add_parser("show", help="what a signer needs to read")
    show.add_argument("envelope", type=Path)
    show.set_defaults(handler=_show)

    diff = sub.add_parser("diff", help="what NEW lets cross or see that OLD did not")
    diff.add_argument("old", type=Path)
    diff.add_argument("new", type=Path)
    diff.set_defaults(handler=_diff)

    sign = sub.add_parser("sign", help="add one owner's signature (in place)")
    sign.add_argument("envelope", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the owner's private key")
    sign.add_argument("--passphrase-file", type=Path, help="for an encrypted key")
    sign.add_argument(
        "--trust",
        type=Path,
        help="the appliance's trust root: name the signer's role and say what is still missing",
    )
    sign.set_defaults(handler=_sign)

    check = sub.add_parser("verify", help="who signed; non-zero exit unless thresholds are met")
    check.add_argument("envelope", type=Path)
    check.add_argument("--trust", type=Path, required=True, help="the appliance's trust root")
    check.add_argument(
        "--at",
        type=_moment,
        metavar="TIME",
        help="check expiry at this moment, RFC 3339 with a UTC offset (default: now)",
    )
    check.set_defaults(handler=_verify)


@paused_throughout
def _compile(args: argparse.Namespace) -> int:
    out = args.out or args.source.with_name(args.source.stem + ".dsse.json")
    compiled = parse.load(args.source)
    envelope = envelopes.compile_policy(compiled)
    envelopes.write(envelope, out)
    print(f"{out}: unsigned policy envelope; review with `dmzbroker policy show {out}`")
    found = report.warnings(compiled, plan.requests_per_scan(compiled))
    if found:
        print("\n".join(report.warning_lines(found)))
    return 0  # warnings are printed, never an error: the co-signers decide


def _show(args: argparse.Namespace) -> int:
    policy, sha256 = report.unverified(args.envelope)
    print(report.show(policy, sha256, datetime.now(UTC), plan.requests_per_scan(policy)))
    return 0  # warnings are printed, never an error: the co-signers decide


def _diff(args: argparse.Namespace) -> int:
    print(report.diff(report.unverified(args.old)[0], report.unverified(args.new)[0]))
    return 0


def _sign(args: argparse.Namespace) -> int:
    envelope = envelopes.read(args.envelope)
    if envelope.payloadType != envelopes.PAYLOAD_TYPE:
        raise TrustError(
            f"{args.envelope}: payloadType {envelope.payloadType!r} is not a dmzbroker policy; "
            "not signing"
        )
    trust = trustroot.load(args.trust) if args.trust is not None else None
    owners = trust.keys if trust is not None else None
    key = add_signature(args.envelope, envelope, args.key, args.passphrase_file, owners)
    if trust is not None:
        if keys.key_id(key.public_key()) not in trust.keys:
            print(f"note: this key is not an owner in {args.trust}; its signature does not count")
        result = verify.check(envelopes.read(args.envelope), trust)
        print_signatures(result, trust)
        print(
            "thresholds met; `dmzbroker policy verify` also checks deployment and expiry"
            if result.ok
            else f"not yet: {verify.describe_shortfall(result)}"
        )
    return 0


def add_signature(
    path: Path,
    envelope: Envelope,
    key_file: Path,
    passphrase_file: Path | None,
    owners: Mapping[str, OwnerKey] | None = None,
) -> Ed25519PrivateKey:
    """Sign `envelope` with the owner's key and write it to `path` (policies and trust roots).

    One signature per key: signing again replaces that key's signature, and says so, naming
    the owner and role when `owners` (the trust root's keys by key id) lists the key."""
    key = keys.load_private(
        key_file,
        read_passphrase(passphrase_file, ask=False),
        ask=lambda: read_passphrase(None, ask=True),
    )
    keyid = keys.key_id(key.public_key())
    owner = (owners or {}).get(keyid)
    signer = f"{inert(owner.name)} ({owner.role.upper()} owner, key {keyid})" if owner else ""
    signed = envelopes.sign(envelope, key)
    envelopes.write(signed, path)
    if any(s.keyid == keyid for s in envelope.signatures):
        whose = f"{inert(owner.name)}'s earlier {owner.role.upper()}" if owner else "its earlier"
        print(
            f"{path}: signed by {signer or f'key {keyid}'}, replacing {whose} signature "
            f"(one signature per key; {len(signed.signatures)} signature(s) in the file)"
        )
    else:
        print(f"{path}: signed by {signer or f'key {keyid}'}")
    return key


@paused_throughout
def _verify(args: argparse.Namespace) -> int:
    trust = trustroot.load(args.trust)
    envelope = envelopes.read(args.envelope)
    result = verify.check(envelope, trust)
    if not result.payload_type_ok:
        print(f"payloadType is not {envelopes.PAYLOAD_TYPE!r}")
    print_signatures(result, trust)
    if not result.ok:
        print(f"NOT VERIFIED: {verify.describe_shortfall(result)}")
        return 1
    policy = parse.from_payload(envelope.untrusted_payload, str(args.envelope))  # verified now
    if policy.deployment_id != trust.deployment_id:
        print(
            f"NOT VERIFIED: the policy is for deployment {policy.deployment_id!r}, "
            f"this trust root for {trust.deployment_id!r}"
        )
        return 1
    at = args.at or datetime.now(UTC)
    if policy.expires <= at:
        print(
            f"EXPIRED: version {policy.version} expired at {policy.expires.isoformat()}, "
            f"before {at.isoformat()}; the broker refuses it"
        )
        return 1
    print(f"VERIFIED: version {policy.version}, expires {policy.expires.isoformat()}")
    return 0


def _moment(text: str) -> datetime:
    """`--at`: an RFC 3339 time; one without a UTC offset would be read in local time."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time ({e})") from e
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset; add Z or +HH:MM (for example 2026-12-05T12:00:00Z)"
        )
    return moment


def print_signatures(
    result: verify.Verification, trust: verify.Keyring, listed_in: str = "the trust root"
) -> None:
    """Who signed, which signatures do not count, and each role's count against its threshold."""
    for key in result.signers:
        print(f"signed by {inert(key.name)} ({key.role.upper()} owner, key {key.keyid})")
    for key in result.invalid:
        name = inert(key.name)
        print(f"BAD signature claiming {name} ({key.role.upper()}): does not match the payload")
    for keyid in result.unknown_keyids:
        print(f"signature by key {keyid}: not in {listed_in}, not counted")
    for role, threshold in trust.thresholds.items():
        have = threshold - result.missing[role]
        print(f"{role.upper()}: {have} of {threshold} required signature(s)")

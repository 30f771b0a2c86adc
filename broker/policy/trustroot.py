"""The appliance's trust root: which owner keys may sign policies, and how many of each.

Named in `broker.yaml` (`trust_root:`), provisioned on the appliance, never received from
either network. It is a signed document: a DSSE envelope (broker/policy/envelope.py) around
the root as RFC 8785 canonical JSON, valid alone only when signed by its own keys at its own
thresholds. A new root replaces the one in force only as TUF rotates its root: same
deployment, higher version, and signed at the thresholds of the current root's keys as well
as its own (`check_rotation`). This module never trusts a root that its owners did not sign,
and never lets a root in force be replaced by one its owners did not sign.

One key holds one role only: a key listed for both OT and IT could meet both thresholds
alone, which is exactly what co-signing exists to prevent.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from msgspec import Meta

from broker.audit.show import inert
from broker.errors import ConfigError, TrustError, TrustRootRefused
from broker.policy import envelope as envelopes
from broker.policy.envelope import Envelope
from broker.policy.verify import OwnerKey, Verification, check, describe_shortfall
from broker.trust.keys import ROLES, Role, key_id, parse_public_pem, public_pem

PAYLOAD_TYPE = "application/vnd.dmzbroker.trust-root+json; v=1"
HOW_TO_MAKE = (
    "make a signed trust root with `dmzbroker trust init` and have both owners sign it "
    "with `dmzbroker trust sign` (docs/policy.md)"
)

Threshold = Annotated[int, Meta(ge=1, le=100)]


class _Thresholds(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    ot: Threshold = 1
    it: Threshold = 1


class _KeyEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    role: Role
    public_key: str  # PEM


class _TrustRootFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    deployment_id: str
    version: Annotated[int, Meta(ge=1)]
    keys: list[_KeyEntry]
    thresholds: _Thresholds = _Thresholds()


@dataclass(frozen=True)
class TrustRoot:
    deployment_id: str
    version: int
    thresholds: dict[Role, int]
    keys: dict[str, OwnerKey]  # by key id
    sha256: str  # of the signed payload bytes
    document: bytes  # the whole envelope file as read: enough to restore this root
    signers: tuple[OwnerKey, ...] = ()  # its own keys whose signatures verified


@dataclass(frozen=True)
class Examined:
    """A trust root file read for a report: `root` is NOT trusted unless `verification.ok`."""

    root: TrustRoot
    envelope: Envelope
    verification: Verification  # against its own keys and thresholds


def load(path: Path) -> TrustRoot:
    """The trust root at `path`, verified against its own keys; ConfigError naming the file."""
    return parse(envelopes.read_bytes(path), str(path))


def parse(data: bytes, source: str) -> TrustRoot:
    """The trust root in `data`, only when signed by its own keys at its own thresholds."""
    examined = examine(data, source)
    if not examined.envelope.signatures:
        raise TrustRootRefused("unsigned", f"{source}: the trust root is not signed; {HOW_TO_MAKE}")
    if not examined.verification.ok:
        shortfall = describe_shortfall(examined.verification, listed_in="this trust root")
        raise TrustRootRefused(
            "threshold_not_met",
            f"{source}: the trust root is not signed by its own owners: {shortfall}",
        )
    return examined.root


def examine(data: bytes, source: str) -> Examined:
    """Read a trust root without enforcing its signatures: for `trust show|verify|sign`."""
    envelope = _decode(data, source)
    if envelope.payloadType != PAYLOAD_TYPE:
        raise ConfigError(
            f"{source}: payloadType {envelope.payloadType!r} is not a trust root ({PAYLOAD_TYPE!r})"
        )
    untrusted_payload = envelope.untrusted_payload
    # A root names its own keys, so its payload is parsed before its signatures are checked
    # (as TUF does with root.json); nothing parsed here is trusted until `verification.ok`.
    unverified = _candidate(untrusted_payload, source)
    verification = check(envelope, unverified, PAYLOAD_TYPE)
    root = TrustRoot(
        unverified.deployment_id,
        unverified.version,
        unverified.thresholds,
        unverified.keys,
        hashlib.sha256(untrusted_payload).hexdigest(),
        data,
        verification.signers,
    )
    return Examined(root, envelope, verification)


def check_rotation(current: TrustRoot, new: TrustRoot) -> None:
    """Refuse `new` unless it may replace `current` (TUF root rotation); both verified alone."""
    if new.sha256 == current.sha256:
        return
    if new.deployment_id != current.deployment_id:
        raise TrustRootRefused(
            "wrong_deployment",
            f"the new trust root is for deployment {new.deployment_id!r}, the one in force for "
            f"{current.deployment_id!r}",
        )
    if new.version < current.version:
        raise TrustRootRefused(
            "rollback",
            f"the new trust root has version {new.version}, lower than version "
            f"{current.version} in force (rollback refused)",
        )
    if new.version == current.version:
        raise TrustRootRefused(
            "swapped",
            f"the new trust root has version {new.version} like the one in force but other "
            "content (a swapped trust root is refused); a changed root needs a higher version, "
            "made with `dmzbroker trust rotate`",
        )
    result = rotation_check(current, new.document)
    if not result.ok:
        shortfall = describe_shortfall(result, listed_in="the trust root in force")
        raise TrustRootRefused(
            "not_signed_by_current",
            f"the new trust root (version {new.version}) is not signed by the owners of the one "
            f"in force (version {current.version}): {shortfall}",
        )


def rotation_check(current: TrustRoot, new_document: bytes) -> Verification:
    """Who of the CURRENT root's owners signed the new root, and what is still missing."""
    return check(_decode(new_document, "the new trust root"), current, PAYLOAD_TYPE)


def owner(name: str, role: Role, public_key: Ed25519PublicKey) -> OwnerKey:
    return OwnerKey(key_id(public_key), name, role, public_key)


def unsigned(
    deployment_id: str, version: int, thresholds: Mapping[Role, int], owners: Sequence[OwnerKey]
) -> Envelope:
    """A new, unsigned trust root; refused (ConfigError) where loading would refuse it."""
    document = _TrustRootFile(
        deployment_id,
        version,
        [_KeyEntry(o.name, o.role, public_pem(o.public_key)) for o in owners],
        _Thresholds(ot=thresholds["ot"], it=thresholds["it"]),
    )
    payload = envelopes.canonical_json(msgspec.to_builtins(document))
    _candidate(payload, "the new trust root")  # the same checks as loading it
    return Envelope(PAYLOAD_TYPE, base64.b64encode(payload).decode(), [])


def _decode(data: bytes, source: str) -> Envelope:
    try:
        return envelopes.decode(data, source, "a signed trust root", HOW_TO_MAKE)
    except ConfigError:
        if _is_plain_yaml_root(data):
            raise TrustRootRefused(
                "unsigned",
                f"{source}: an unsigned trust root (plain YAML) is no longer accepted; "
                f"{HOW_TO_MAKE}",
            ) from None
        raise


def _is_plain_yaml_root(data: bytes) -> bool:
    """Whether `data` is a trust root as written before roots were signed (for the message)."""
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError:
        return False
    return isinstance(document, dict) and "keys" in document and "deployment_id" in document


@dataclass(frozen=True)
class _Candidate:
    deployment_id: str
    version: int
    thresholds: dict[Role, int]
    keys: dict[str, OwnerKey]


def _candidate(untrusted_payload: bytes, source: str) -> _Candidate:
    try:
        document = msgspec.json.decode(untrusted_payload, type=_TrustRootFile)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: the trust root's payload: {e}") from e
    _printable(document.deployment_id, f"{source}: deployment_id")
    keys: dict[str, OwnerKey] = {}
    for i, entry in enumerate(document.keys):
        _printable(entry.name, f"{source}: keys[{i}].name")
        try:
            public_key = parse_public_pem(entry.public_key, f"{source}: keys[{i}].public_key")
        except TrustError as e:
            raise ConfigError(str(e)) from e
        keyid = key_id(public_key)
        if keyid in keys:
            earlier = keys[keyid]
            problem = (
                "one key may hold only one role"
                if earlier.role != entry.role
                else "the same key is listed twice"
            )
            raise ConfigError(
                f"{source}: keys[{i}]: {problem} (key {keyid[:16]}… is already "
                f"{earlier.name!r}, role {earlier.role})"
            )
        keys[keyid] = OwnerKey(keyid, entry.name, entry.role, public_key)
    thresholds: dict[Role, int] = {"ot": document.thresholds.ot, "it": document.thresholds.it}
    for role in ROLES:
        available = sum(1 for k in keys.values() if k.role == role)
        if available < thresholds[role]:
            raise ConfigError(
                f"{source}: thresholds.{role}: needs {thresholds[role]} signature(s) but only "
                f"{available} {role.upper()} key(s) are listed"
            )
    return _Candidate(document.deployment_id, document.version, thresholds, keys)


def _printable(text: str, where: str) -> None:
    """Refuse a name holding a control or format character (ESC, CR, LF, bidi overrides,
    zero-width ...): owners read these names on a terminal before they sign."""
    bad = next((c for c in text if not c.isprintable()), None)
    if bad is not None:
        raise ConfigError(
            f"{where}: holds a control or format character ({inert(bad)}); "
            "use printable characters only"
        )

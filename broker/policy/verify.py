"""Signature checks of a DSSE envelope against owner keys and per-role thresholds.

The policy is checked against the trust root; the trust root against its own keys and, when
it replaces another, against the keys of the root in force: one threshold check for both.
Two forms, as in python-tuf: `check()` reports (who signed, which role, what is missing) and
never raises, for `dmzbroker policy verify` and `dmzbroker trust verify`; `verified_payload()`
enforces and returns the payload bytes only when every role's threshold is met by distinct
keys (the trust root enforces its own in broker/policy/trustroot.py, with its own refusals).
Nothing is parsed before that, and a signature never counts for a key that is not listed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.errors import PolicyRefused
from broker.policy.envelope import PAYLOAD_TYPE, Envelope, pae
from broker.trust.keys import ROLES, Role, verifies


@dataclass(frozen=True)
class OwnerKey:
    keyid: str
    name: str
    role: Role
    public_key: Ed25519PublicKey


class Keyring(Protocol):
    """Who may sign and how many of each role must: a trust root."""

    @property
    def keys(self) -> Mapping[str, OwnerKey]: ...  # by key id

    @property
    def thresholds(self) -> Mapping[Role, int]: ...


@dataclass(frozen=True)
class Verification:
    payload_type_ok: bool
    signers: tuple[OwnerKey, ...]  # distinct trusted keys whose signature verifies
    unknown_keyids: tuple[str, ...]  # signatures by keys the trust root does not list
    invalid: tuple[OwnerKey, ...]  # trusted keys whose signature does not verify
    missing: dict[Role, int]  # signatures each role still needs

    @property
    def ok(self) -> bool:
        return self.payload_type_ok and not any(self.missing.values())


def check(envelope: Envelope, trust: Keyring, payload_type: str = PAYLOAD_TYPE) -> Verification:
    message = pae(envelope.payloadType, envelope.untrusted_payload)
    signers: dict[str, OwnerKey] = {}  # by key id: one key never counts twice
    unknown: list[str] = []
    invalid: list[OwnerKey] = []
    for signature in envelope.signatures:
        key = trust.keys.get(signature.keyid)
        if key is None:
            unknown.append(signature.keyid)
        elif verifies(key.public_key, base64.b64decode(signature.sig), message):
            signers[key.keyid] = key
        else:
            invalid.append(key)
    missing: dict[Role, int] = {
        role: max(0, trust.thresholds[role] - sum(1 for k in signers.values() if k.role == role))
        for role in ROLES
    }
    return Verification(
        envelope.payloadType == payload_type,
        tuple(signers.values()),
        tuple(unknown),
        tuple(invalid),
        missing,
    )


def verified_payload(envelope: Envelope, trust: Keyring, source: str) -> tuple[bytes, Verification]:
    """The trusted policy payload bytes; raises PolicyRefused naming what is missing."""
    result = check(envelope, trust)
    if not result.payload_type_ok:
        raise PolicyRefused(
            "wrong_payload_type",
            f"{source}: payloadType {envelope.payloadType!r} is not {PAYLOAD_TYPE!r}",
        )
    if not envelope.signatures:
        raise PolicyRefused("unsigned", f"{source}: the policy is not signed")
    if not result.ok:
        raise PolicyRefused("threshold_not_met", f"{source}: {describe_shortfall(result)}")
    return envelope.untrusted_payload, result


def describe_shortfall(result: Verification, listed_in: str = "the trust root") -> str:
    needs = ", ".join(
        f"{n} more {role.upper()} owner signature(s)" for role, n in result.missing.items() if n
    )
    details = [f"needs {needs}"] if needs else []
    if result.invalid:
        names = ", ".join(repr(k.name) for k in result.invalid)
        details.append(f"signatures that do not match the payload: {names}")
    if result.unknown_keyids:
        ids = ", ".join(k[:16] + "…" for k in result.unknown_keyids)
        details.append(f"signatures by keys not in {listed_in}: {ids}")
    return "; ".join(details)

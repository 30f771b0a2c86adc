"""Signature checks of a policy envelope against the trust root.

Two forms, as in python-tuf: `check()` reports (who signed, which role, what is missing) and
never raises, for `dmzbroker policy verify`; `verified_payload()` enforces and returns the
payload bytes only when every role's threshold is met by distinct keys. Nothing is parsed
before that.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from broker.errors import PolicyRefused
from broker.policy.envelope import PAYLOAD_TYPE, Envelope, pae
from broker.policy.trustroot import OwnerKey, TrustRoot
from broker.trust.keys import ROLES, Role, verifies


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


def check(envelope: Envelope, trust: TrustRoot) -> Verification:
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
        envelope.payloadType == PAYLOAD_TYPE,
        tuple(signers.values()),
        tuple(unknown),
        tuple(invalid),
        missing,
    )


def verified_payload(
    envelope: Envelope, trust: TrustRoot, source: str
) -> tuple[bytes, Verification]:
    """The trusted payload bytes; raises PolicyRefused naming what is missing."""
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


def describe_shortfall(result: Verification) -> str:
    needs = ", ".join(
        f"{n} more {role.upper()} owner signature(s)" for role, n in result.missing.items() if n
    )
    details = [f"needs {needs}"]
    if result.invalid:
        names = ", ".join(repr(k.name) for k in result.invalid)
        details.append(f"signatures that do not match the payload: {names}")
    if result.unknown_keyids:
        ids = ", ".join(k[:16] + "…" for k in result.unknown_keyids)
        details.append(f"signatures by keys not in the trust root: {ids}")
    return "; ".join(details)

"""Whether a verified policy, or a new trust root, may take effect on this appliance.

A policy: its deployment, expiry, and version against the floor (the highest version this
half ever accepted, broker.policy.accepted). A lower version is a rollback; the same version
with other content is equivocation: both are refused. The same version and content is a
no-op. A trust root: the one in its file takes effect only when it is the accepted root or a
valid rotation of it (broker.policy.trustroot.check_rotation) under which the policy file
verifies. At start the file's root is the only candidate: a record (state dir, audit log) only
limits it, and anything else stops the start; a running half keeps the root it holds in
memory. Records are written (atomically, durably) *before* what they record takes effect.
This module never admits anything below a floor, and never takes keys from a record.
"""

from __future__ import annotations

import binascii
import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from broker.errors import ConfigError, PolicyRefused, TrustRootRefused
from broker.policy import accepted as records
from broker.policy import envelope as envelopes
from broker.policy import trustroot
from broker.policy.accepted import AcceptedPolicy, AcceptedRoot
from broker.policy.schema import Policy
from broker.policy.trustroot import TrustRoot
from broker.policy.verify import Verification, verified_payload

log = structlog.get_logger("policy")


@dataclass(frozen=True)
class TrustedPolicy:
    policy: Policy
    sha256: str  # of the signed payload bytes
    verification: Verification
    new: bool  # False: this exact policy was already accepted
    root: TrustRoot  # the trust root it was verified under

    @property
    def record(self) -> AcceptedPolicy:
        return AcceptedPolicy(self.policy.version, self.sha256, self.policy.deployment_id)


@dataclass(frozen=True)
class RootInForce:
    root: TrustRoot
    new: bool  # accepted now: its record is written, its acceptance still to be logged
    refused: ConfigError | None  # the file's root, refused: the accepted one stays in force

    @property
    def record(self) -> AcceptedRoot:
        return records.root_record(self.root.version, self.root.sha256, self.root.document)


def load_trusted(
    path: Path,
    trust: TrustRoot,
    state_dir: Path,
    now: datetime,
    *,
    floor: AcceptedPolicy | None,
    persist: bool = True,
    running: TrustedPolicy | None = None,
) -> TrustedPolicy:
    """Verify, parse and admit the policy envelope at `path` over `floor`; raises
    PolicyRefused. Admitted, it is recorded in `state_dir` (unless not `persist`). Payload
    bytes the same as the `running` policy's are that policy: verified, not parsed again."""
    envelope = envelopes.read(path)
    payload, verification = verified_payload(envelope, trust, str(path))
    sha256 = hashlib.sha256(payload).hexdigest()
    if running is not None and running.sha256 == sha256:
        policy = running.policy  # 10 s of parsing and checks at 100,000 signals, saved
    else:
        # Here, not at the top: the parser brings casbin and the semantic model, which `run`'s
        # long-lived supervisor (it imports this module, never calls this) should not hold.
        from broker.policy.parse import from_payload  # noqa: PLC0415

        policy = from_payload(payload, str(path))
    if policy.deployment_id != trust.deployment_id:
        raise PolicyRefused(
            "wrong_deployment",
            f"{path}: deployment_id {policy.deployment_id!r} is not this appliance's "
            f"({trust.deployment_id!r})",
        )
    if policy.expires <= now:
        raise PolicyRefused("expired", f"{path}: expired at {policy.expires.isoformat()}")
    new = True
    if floor is not None:
        if policy.version < floor.version:
            raise PolicyRefused(
                "rollback",
                f"{path}: version {policy.version} is lower than version {floor.version}, "
                "already accepted here (rollback refused)",
            )
        if policy.version == floor.version:
            if sha256 != floor.sha256:
                raise PolicyRefused(
                    "equivocation",
                    f"{path}: version {policy.version} differs from the version "
                    f"{floor.version} already accepted here (equivocation refused); "
                    "a changed policy needs a higher version",
                )
            new = False
    trusted = TrustedPolicy(policy, sha256, verification, new, trust)
    if persist and (new or not (state_dir / records.POLICY_STATE).exists()):
        records.write_policy(state_dir, trusted.record)  # again if only the log still had it
    return trusted


def admit_root(path: Path, current: TrustRoot, policy: Path, state_dir: Path) -> RootInForce:
    """The running half's trust root once the file at `path` is considered: the file's root
    if it is `current` (the root in force, held in memory) or a valid rotation of it under
    which the policy file at `policy` verifies (recorded in `state_dir` first), else
    `current` with the refusal."""
    try:
        candidate = trustroot.load(path)
        if candidate.sha256 == current.sha256:
            return RootInForce(current, False, None)
        _check_rotation(current, candidate, policy, path)
    except ConfigError as e:
        return RootInForce(current, False, _refusal(e))
    admitted = RootInForce(candidate, True, None)
    records.write_root(state_dir, admitted.record)
    return admitted


def root_at_start(
    candidate: TrustRoot,
    path: Path,
    floor: records.Floor,
    policy: Path,
    state_dir: Path,
    *,
    persist: bool = True,
) -> RootInForce:
    """The trust root in force at a half's start: always `candidate`, the root of the file
    at `path`, verified alone. The records (state dir, audit log) only limit it, never
    supply it: they are files this half can write. Against each, `candidate` must be the
    recorded root or a valid rotation of it (checked with the record's document) under which
    the policy file at `policy` verifies; raises TrustRootRefused naming the file, the record
    and what to do otherwise. `new`: the highest record is another root (or none)."""
    for place, record in floor.roots:
        if record.sha256 == candidate.sha256:
            continue
        try:
            recorded = _recorded_root(record, place)
            _check_rotation(recorded, candidate, policy, path)
        except ConfigError as e:
            refused = _refusal(e)
            raise TrustRootRefused(
                refused.reason,
                f"{refused}; the trust root recorded as accepted ({place}: version "
                f"{record.version}, sha256 {record.sha256[:16]}…) is not this file's root and "
                f"this half does not start. Put the accepted root back in {path}, or deploy a "
                "valid rotation of it together with a policy the new owners signed; if the "
                "record itself was forged, find out who wrote it before removing it",
            ) from e.__cause__
    highest = floor.root
    in_force = RootInForce(candidate, highest is None or highest.sha256 != candidate.sha256, None)
    state = floor.state_root
    if persist and (state is None or state.sha256 != candidate.sha256):
        records.write_root(state_dir, in_force.record)  # again if only the log still had it
    return in_force


def _recorded_root(record: AcceptedRoot, place: str) -> TrustRoot:
    """The root a record names, from the document it keeps: only to check a rotation."""
    try:
        root = trustroot.parse(record.document_bytes, f"the trust root recorded in {place}")
    except (ConfigError, binascii.Error) as e:
        raise TrustRootRefused(
            "unverifiable_record",
            f"the trust root recorded in {place} cannot be read to check a rotation "
            f"against it: {e}",
        ) from None
    if root.sha256 != record.sha256:
        raise TrustRootRefused(
            "unverifiable_record", f"{place} keeps another document than the root it records"
        )
    return root


def _check_rotation(current: TrustRoot, candidate: TrustRoot, policy: Path, path: Path) -> None:
    """Refuse `candidate` (from `path`) unless it is a valid rotation of `current` and the
    policy file verifies under it: a rotation that removes the owners who signed the running
    policy would otherwise leave a policy no root in force vouches for."""
    try:
        trustroot.check_rotation(current, candidate)
    except TrustRootRefused as e:
        raise TrustRootRefused(e.reason, f"{path}: {e}") from None
    try:
        verified_payload(envelopes.read(policy), candidate, str(policy))
    except ConfigError as e:
        refused = TrustRootRefused(
            "policy_not_signed",
            f"{path}: the new trust root (version {candidate.version}) is refused because "
            f"the policy does not verify under it ({e}); deploy the new root together with a "
            "policy the new owners signed",
        )
        # A passing read failure of the policy stays recognisable as one (tried again).
        raise refused from e.__cause__


def _refusal(error: ConfigError) -> TrustRootRefused:
    if isinstance(error, TrustRootRefused):
        return error
    refused = TrustRootRefused("invalid", str(error))
    refused.__cause__ = error.__cause__  # a passing read failure stays recognisable as one
    return refused


def log_refusal(error: ConfigError, **context: object) -> None:
    """The `policy_refused` event; equivocation also raises an alarm of its own."""
    reason = error.reason if isinstance(error, PolicyRefused) else "invalid"
    log.error("policy_refused", reason=reason, error=str(error), **context)
    if reason == "equivocation":
        log.critical(
            "policy_equivocation",
            error=str(error),
            action="two different policies carry one version: find out who signed which",
        )


def log_acceptance(trusted: TrustedPolicy, **context: object) -> None:
    log.info(
        "policy_accepted",
        version=trusted.policy.version,
        sha256=trusted.sha256,
        signers=[f"{k.role}:{k.name}:{k.keyid[:16]}" for k in trusted.verification.signers],
        new=trusted.new,
        **context,
    )


def log_root_acceptance(root: TrustRoot, **context: object) -> None:
    """`trust_root_accepted`, with the signed document: enough to check a rotation against
    it from the audit log alone (broker.policy.accepted)."""
    log.info(
        "trust_root_accepted",
        version=root.version,
        sha256=root.sha256,
        deployment_id=root.deployment_id,
        document=records.document_pieces(root.document),
        signers=[f"{k.role}:{k.name}:{k.keyid[:16]}" for k in root.signers],
        **context,
    )


def log_root_refusal(error: ConfigError, kept: TrustRoot | None, **context: object) -> None:
    log.error(
        "trust_root_refused",
        reason=_refusal(error).reason,
        error=str(error),
        kept_version=kept.version if kept is not None else None,
        action=(
            "the accepted trust root stays in force; find out who replaced the file"
            if kept is not None
            else "this half does not start; find out who replaced the file or the record"
        ),
        **context,
    )

"""Whether a verified policy, or a new trust root, may take effect on this appliance.

A policy: its deployment, expiry, and version against the floor (the highest version this
half ever accepted, broker.policy.accepted). A lower version is a rollback; the same version
with other content is equivocation: both are refused. The same version and content is a
no-op. A trust root: the one in its file takes effect only when it is the accepted root or a
valid rotation of it (broker.policy.trustroot.check_rotation); otherwise the accepted root,
restored from its record, stays in force. Records are written (atomically, durably) *before*
what they record takes effect. This module never admits anything below a floor.
"""

from __future__ import annotations

import binascii
import contextlib
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
from broker.policy.parse import from_payload
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
) -> TrustedPolicy:
    """Verify, parse and admit the policy envelope at `path` over `floor`; raises
    PolicyRefused. Admitted, it is recorded in `state_dir` (unless not `persist`)."""
    envelope = envelopes.read(path)
    payload, verification = verified_payload(envelope, trust, str(path))
    policy = from_payload(payload, str(path))
    sha256 = hashlib.sha256(payload).hexdigest()
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


def admit_root(
    path: Path, current: TrustRoot | None, state_dir: Path, *, persist: bool = True
) -> RootInForce:
    """The trust root in force once the file at `path` is considered against `current` (the
    accepted root, None on a fresh start): the file's root if it is `current` or a valid
    rotation of it (recorded in `state_dir` first, unless not `persist`), else `current`
    with the refusal. Raises ConfigError only when there is no root to keep."""
    try:
        candidate = trustroot.load(path)
    except ConfigError as e:
        if current is None:
            raise
        return RootInForce(current, False, _refusal(e))
    if current is not None:
        if candidate.sha256 == current.sha256:
            return RootInForce(current, False, None)
        try:
            trustroot.check_rotation(current, candidate)
        except TrustRootRefused as e:
            return RootInForce(current, False, TrustRootRefused(e.reason, f"{path}: {e}"))
    admitted = RootInForce(candidate, True, None)
    if persist:
        records.write_root(state_dir, admitted.record)
    return admitted


def restore_root(floor: records.Floor, path: Path) -> TrustRoot | None:
    """The accepted trust root (None if none is recorded), from the first record that still
    holds its document: the floor's, the audit log's, or the file at `path` itself if it is
    that very root. ConfigError if none does: nothing lower may stand in for it."""
    record = floor.root
    if record is None:
        return None
    problems = []
    for source, candidate in (("its record", record), ("the audit log", floor.log_root)):
        if candidate is None or candidate.sha256 != record.sha256:
            continue
        try:
            root = trustroot.parse(candidate.document_bytes, f"the accepted trust root in {source}")
        except (ConfigError, binascii.Error) as e:
            problems.append(str(e))
            continue
        if root.sha256 == record.sha256:
            return root
        problems.append(f"{source} holds another document than the accepted root")
    with contextlib.suppress(ConfigError):
        root = trustroot.load(path)
        if root.sha256 == record.sha256:
            return root
    raise ConfigError(
        f"the accepted trust root (version {record.version}, sha256 {record.sha256[:16]}…) "
        f"cannot be restored, and {path} is not it: {'; '.join(problems) or 'no document kept'}"
    )


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
    """`trust_root_accepted`, with the signed document: enough to restore the root from the
    audit log alone (broker.policy.accepted)."""
    log.info(
        "trust_root_accepted",
        version=root.version,
        sha256=root.sha256,
        deployment_id=root.deployment_id,
        document=records.document_pieces(root.document),
        signers=[f"{k.role}:{k.name}:{k.keyid[:16]}" for k in root.signers],
        **context,
    )


def log_root_refusal(error: ConfigError, kept: TrustRoot, **context: object) -> None:
    log.error(
        "trust_root_refused",
        reason=_refusal(error).reason,
        error=str(error),
        kept_version=kept.version,
        action="the accepted trust root stays in force; find out who replaced the file",
        **context,
    )

"""Whether a verified policy may take effect on this appliance: deployment, expiry, version.

The highest version this appliance ever accepted, and its hash, are kept in the state
directory of each half and written (atomically, durably) *before* the policy takes effect.
A lower version is a rollback; the same version with other content is equivocation: both
are refused. The same version and content is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import structlog

from broker.errors import ConfigError, PolicyRefused
from broker.policy import envelope as envelopes
from broker.policy.parse import from_payload
from broker.policy.schema import Policy
from broker.policy.trustroot import TrustRoot
from broker.policy.verify import Verification, verified_payload

STATE_FILE = "policy-accepted.json"

log = structlog.get_logger("policy")


class Accepted(msgspec.Struct, frozen=True):
    version: int
    sha256: str
    deployment_id: str


@dataclass(frozen=True)
class TrustedPolicy:
    policy: Policy
    sha256: str  # of the signed payload bytes
    verification: Verification
    new: bool  # False: this exact policy was already accepted


def load_trusted(
    path: Path, trust: TrustRoot, state_dir: Path, now: datetime, *, persist: bool = True
) -> TrustedPolicy:
    """Verify, parse and admit the policy envelope at `path`; raises PolicyRefused."""
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
    accepted = _read_state(state_dir)
    new = True
    if accepted is not None:
        if policy.version < accepted.version:
            raise PolicyRefused(
                "rollback",
                f"{path}: version {policy.version} is lower than version {accepted.version}, "
                "already accepted here (rollback refused)",
            )
        if policy.version == accepted.version:
            if sha256 != accepted.sha256:
                raise PolicyRefused(
                    "equivocation",
                    f"{path}: version {policy.version} differs from the version "
                    f"{accepted.version} already accepted here (equivocation refused); "
                    "a changed policy needs a higher version",
                )
            new = False
    if new and persist:
        _write_state(state_dir, Accepted(policy.version, sha256, policy.deployment_id))
    return TrustedPolicy(policy, sha256, verification, new)


def _read_state(state_dir: Path) -> Accepted | None:
    path = state_dir / STATE_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=Accepted)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        # Never treat an unreadable record as "nothing accepted yet": that would allow rollback.
        raise ConfigError(f"{path}: unreadable record of the accepted policy version: {e}") from e


def _write_state(state_dir: Path, accepted: Accepted) -> None:
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    try:
        state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(accepted))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{path}: cannot record the accepted policy version: {e.strerror}") from e


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

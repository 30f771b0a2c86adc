"""The appliance's trust root: which owner keys may sign policies, and how many of each.

Named in `broker.yaml` (`trust_root:`), provisioned on the appliance, never received from
either network. One key holds one role only: a key listed for both OT and IT could meet both
thresholds alone, which is exactly what co-signing exists to prevent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from msgspec import Meta

from broker import documents
from broker.errors import ConfigError, TrustError
from broker.trust.keys import ROLES, Role, key_id, parse_public_pem

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
class OwnerKey:
    keyid: str
    name: str
    role: Role
    public_key: Ed25519PublicKey


@dataclass(frozen=True)
class TrustRoot:
    deployment_id: str
    version: int
    thresholds: dict[Role, int]
    keys: dict[str, OwnerKey]  # by key id


def load(path: Path) -> TrustRoot:
    document = documents.load(path, _TrustRootFile)
    keys: dict[str, OwnerKey] = {}
    for i, entry in enumerate(document.keys):
        try:
            public_key = parse_public_pem(entry.public_key, f"{path}: keys[{i}].public_key")
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
                f"{path}: keys[{i}]: {problem} (key {keyid[:16]}… is already {earlier.name!r},"
                f" role {earlier.role})"
            )
        keys[keyid] = OwnerKey(keyid, entry.name, entry.role, public_key)
    thresholds: dict[Role, int] = {"ot": document.thresholds.ot, "it": document.thresholds.it}
    for role in ROLES:
        available = sum(1 for k in keys.values() if k.role == role)
        if available < thresholds[role]:
            raise ConfigError(
                f"{path}: thresholds.{role}: needs {thresholds[role]} signature(s) but only "
                f"{available} {role.upper()} key(s) are listed"
            )
    return TrustRoot(document.deployment_id, document.version, thresholds, keys)


def render(deployment_id: str, owners: list[tuple[str, Role, Path]], version: int = 1) -> str:
    """A trust root document for `owners` (name, role, public key file), thresholds 1 and 1."""
    return yaml.safe_dump(
        {
            "deployment_id": deployment_id,
            "version": version,
            "thresholds": {"ot": 1, "it": 1},
            "keys": [
                {"name": name, "role": role, "public_key": public.read_text()}
                for name, role, public in owners
            ],
        },
        sort_keys=False,
    )

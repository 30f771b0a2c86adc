"""Certifying, as root, the first audit epoch of each writer that runs as its own user, so that
no half ever needs to read the root audit key (ADR 0018).

`dmzbroker audit enroll` and `dmzbroker run` (started as root, before it drops to the halves'
users) call `enroll`. It certifies epoch 1 only for a writer that has neither a key chain nor
a log: a writer that has one certifies its own next epochs. It never gives a writer's files
to any user but the one `broker.deployment.layout.user_of` names for that writer, and never
touches a folder whose writer is running.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.audit import epochs
from broker.config import BrokerConfig
from broker.deployment.layout import user_of, written_paths
from broker.errors import ConfigError
from broker.folder_lock import check_free


@dataclass(frozen=True)
class Enrolled:
    writer: str
    user: str
    skipped: str | None  # None: epoch 1 certified now; else why nothing was done


def writers(cfg: BrokerConfig) -> list[str]:
    """The audit writers of this configuration that run as a user of their own (not root)."""
    return [writer for writer in written_paths(cfg) if user_of(writer) != "root"]


def enroll(
    cfg: BrokerConfig,
    appliance: str,
    root: epochs.RootKey,
    chosen: Sequence[str],
    *,
    missing_user_ok: bool = False,
) -> list[Enrolled]:
    """Certify epoch 1 of each writer in `chosen` that has no key chain yet, for its user.
    ConfigError for a writer whose user does not exist (with `missing_user_ok`, skipped: a
    host runs only its role's writers), and for a folder whose writer holds it now."""
    if os.geteuid() != 0:
        raise ConfigError(
            "audit enroll gives each writer's first epoch key to the writer's user: run it as "
            "root (as another user, each writer certifies its own, reading the root key)"
        )
    done = []
    for writer in chosen:
        name = user_of(writer)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if missing_user_ok:
                done.append(Enrolled(writer, name, f"no user {name} on this host"))
                continue
            raise ConfigError(
                f"audit writer {writer}: user {name} does not exist; create it with "
                "deploy/install.sh"
            ) from None
        folder = cfg.audit.dir / writer
        owner = (entry.pw_uid, entry.pw_gid)
        _ensure_folder(folder, owner)
        check_free(folder, entry.pw_uid)
        try:
            skipped = epochs.enroll(folder, appliance, root, owner)
        except OSError as e:
            raise ConfigError(f"audit log {folder}: cannot enroll: {e}") from e
        done.append(Enrolled(writer, name, skipped))
    return done


def _ensure_folder(folder: Path, owner: tuple[int, int]) -> None:
    """The writer's folder, made for its user if missing (install.sh makes the shipped ones,
    with the modes of docs/deployment.md; 0750 is what the writer would make itself)."""
    try:
        folder.mkdir(mode=0o750)
    except FileExistsError:
        return
    except OSError as e:
        raise ConfigError(f"audit log {folder}: cannot create: {e.strerror}") from e
    os.chown(folder, *owner, follow_symlinks=False)

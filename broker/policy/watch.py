"""Policy reload: on SIGHUP or when the envelope or trust root file changes, admit a newer
policy.

The trust root file is considered first: a valid rotation of the root in force, under which
the policy file verifies, takes effect (`trust_root_accepted`), anything else is refused (`trust_root_refused`, once per file
content) and the root in force stays. A valid newer policy is then yielded to the half, which
applies it without restarting. An invalid one is refused (logged as `policy_refused` with its
reason) and the running policy stays in force. The floor is the running policy, held in
memory: deleting the state files while the half runs lowers nothing. The running policy's
approaching expiry is warned about beforehand.

A file that cannot be read for a passing reason of this process or machine (out of file
descriptors or memory, an interrupted call) is no verdict on the policy: it is tried again at
the next check, with one `policy_read_failed` per episode, never refused. This module never
refuses a policy it could not read.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from broker.errors import ConfigError
from broker.policy import report
from broker.policy.activation import (
    RootInForce,
    TrustedPolicy,
    admit_root,
    load_trusted,
    log_acceptance,
    log_refusal,
    log_root_acceptance,
    log_root_refusal,
)

CHECK_INTERVAL_S = 1.0  # how often the file is looked at; SIGHUP acts at once
EXPIRY_WARNINGS = (timedelta(days=7), timedelta(days=1), timedelta(hours=1))
# Reading failed because of this process or machine, not because of the file.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR}
)

log = structlog.get_logger("policy")
Fingerprint = tuple[int, int, int] | None  # inode, size, mtime; None: unreadable


class PolicyWatcher:
    def __init__(
        self,
        path: Path,
        trust_root: Path,
        state_dir: Path,
        current: TrustedPolicy,
        on_hangup: Callable[[], object] | None = None,
    ) -> None:
        self._path = path
        self._trust_root = trust_root
        self._state_dir = state_dir
        self._current = current
        self._root = current.root  # the trust root in force
        self._refused_root: str | None = None  # the last refusal logged, not repeated
        # Unknown: the first check reloads, as the files may have changed since the half
        # loaded them (a SIGHUP before this watcher ran was ignored).
        self._seen: tuple[Fingerprint, Fingerprint] | None = None
        self._warned: set[timedelta] = set()
        self._expiry_noted = False
        self._unread = False  # the last try could not read the files: try again next check
        self._wake = asyncio.Event()
        self._on_hangup = on_hangup  # SIGHUP also asks this half to re-read its other files

    async def updates(self) -> AsyncIterator[TrustedPolicy]:
        """Newly accepted policies, as they come; runs until cancelled."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        try:
            while True:
                try:
                    async with asyncio.timeout(CHECK_INTERVAL_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                hangup, before = self._wake.is_set(), self._seen
                self._wake.clear()
                self._warn_if_expiring()
                self._seen = (_fingerprint(self._path), _fingerprint(self._trust_root))
                if not hangup and self._seen == before and not self._unread:
                    continue
                accepted = self._reload()
                if accepted is not None:
                    self._current = accepted
                    self._warned.clear()
                    self._expiry_noted = False
                    yield accepted
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # removal restored the default: exit

    def _hangup(self) -> None:
        # Audited here, in the half that acts on it: under systemd (`systemctl reload`) no
        # supervisor sees the signal.
        log.info("policy_reload_requested", cause="SIGHUP", version=self._current.policy.version)
        self._wake.set()
        if self._on_hangup is not None:
            self._on_hangup()

    def _reload(self) -> TrustedPolicy | None:
        try:
            in_force = admit_root(self._trust_root, self._root, self._path, self._state_dir)
            if in_force.refused is not None and _transient(in_force.refused):
                raise in_force.refused
            self._note_root(in_force)
            trusted = load_trusted(
                self._path,
                self._root,
                self._state_dir,
                datetime.now(UTC),
                floor=self._current.record,
                running=self._current,
            )
        except ConfigError as e:  # PolicyRefused included
            if _transient(e):
                if not self._unread:
                    log.warning(
                        "policy_read_failed",
                        error=str(e),
                        kept_version=self._current.policy.version,
                        action=f"tried again every {CHECK_INTERVAL_S:g} s",
                    )
                self._unread = True
                return None
            self._unread = False
            log_refusal(e, kept_version=self._current.policy.version)
            return None
        self._unread = False
        if not trusted.new:
            return None
        previous = self._current.policy
        widened = report.widening(previous, trusted.policy)
        log_acceptance(trusted, previous_version=previous.version, widened=widened)
        return trusted

    def _note_root(self, in_force: RootInForce) -> None:
        version = self._current.policy.version
        if in_force.refused is not None:
            if str(in_force.refused) != self._refused_root:
                self._refused_root = str(in_force.refused)
                log_root_refusal(in_force.refused, in_force.root, policy_version=version)
        elif in_force.new:
            log_root_acceptance(
                in_force.root,
                new=True,
                previous_version=self._root.version,
                policy_version=version,
            )
            self._refused_root = None
        self._root = in_force.root

    def _warn_if_expiring(self) -> None:
        policy = self._current.policy
        left = policy.expires - datetime.now(UTC)
        if left <= timedelta(0):
            if not self._expiry_noted:
                self._expiry_noted = True
                log.error(
                    "policy_expired",
                    version=policy.version,
                    expires=policy.expires.isoformat(),
                    action="nothing crosses until a newer signed policy is accepted",
                )
            return
        crossed = {w for w in EXPIRY_WARNINGS if left <= w} - self._warned
        if crossed:
            self._warned |= crossed
            log.warning(
                "policy_expiring",
                version=policy.version,
                expires=policy.expires.isoformat(),
                hours_left=round(left.total_seconds() / 3600, 1),
            )


def _transient(error: ConfigError) -> bool:
    cause = error.__cause__
    return isinstance(cause, OSError) and cause.errno in TRANSIENT_ERRNOS


def _fingerprint(path: Path) -> Fingerprint:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)

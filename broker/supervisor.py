"""`dmzbroker run`: the two halves as two OS processes, joined only by the spool, each kept up.

Each half is started as `python -I -m broker plant|enterprise --config FILE`: in isolated
mode, so neither a `broker/` folder in the working directory nor a PYTHON* variable can
stand in for the installed package. A half that exits by itself is started again after a
backoff (doubling from `restart_initial_s` up to `restart_max_s`, jittered, and back to the
first delay once the half has run `restart_reset_s`), with `half_exited` and
`half_restarted` in the supervisor's own audit log. The other half is never touched: the
plant half never stops, pauses or changes its polling because of the enterprise side.

Each half runs in a session of its own, so a terminal's Ctrl-C reaches the supervisor
only, which then stops both (SIGTERM, SIGKILL after STOP_GRACE_S, audited as `half_killed`)
and exits 0. SIGHUP is passed to both halves (`policy_reload_requested`, here and in each
half, which also audits a SIGHUP sent to it directly, as under systemd). If the
supervisor itself dies, the kernel sends each half SIGTERM (`lifecycle.end_with_supervisor`),
and a half that then hangs in its cleanup ends itself after STOP_GRACE_S.
The plant half's polling comes first also for the CPU: the enterprise half runs
`ENTERPRISE_NICENESS` below it (a higher nice value), so that on a busy machine the
enterprise's start-ups (each a fresh interpreter; a restart loop takes about half a core)
and its consumers' load take the CPU the plant's scans need last.
This module never stops or restarts a half because of the other. It checks the folders the
halves write before starting them (`refuse_if_running`), so that a second instance is told
at once; what keeps two writers off one folder is each half's own lock (`folder_lock`).

Started as root, the supervisor runs each half as its own user (`half_users`, ADR 0018):
the plant half as dmzbroker-plant, the enterprise half as dmzbroker-enterprise with the
plant group as a supplementary group (it reads the spool and the plant's audit log, writes
neither), each with its unit's umask. Otherwise (`--same-user`, a non-root start, the demo)
both halves share one user, and `halves_share_user` (audited) says what that gives up. A
missing user is refused, never replaced by root; this module never creates a user.
Before dropping to them it certifies each half's first audit epoch for its user
(`enroll_halves`), so that no half needs to read the root audit key. A half of its own user
gets a minimal environment (`half_environment`), never root's, and, when the supervisor's
stdout or stderr is a regular file, a pipe the supervisor copies into it line by line
(`_relay`): a descriptor of root's log in a half's hands would let it truncate the log.
What the units add and `run` does not (seccomp, an empty capability bounding set, the file
system sandbox) is in docs/deployment.md; each half sets no_new_privs itself at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import structlog

from broker.audit.epochs import RootKey
from broker.audit.log import AuditLog
from broker.audit.monitor import AuditMonitor
from broker.backoff import Backoff
from broker.config import BrokerConfig, SupervisorConfig
from broker.deployment import enrollment
from broker.deployment.layout import PLANT_USER, user_of, written_paths
from broker.errors import ConfigError
from broker.folder_lock import check_free
from broker.lifecycle import STOP_GRACE_S, SUPERVISOR_PID

HALVES = ("plant", "enterprise")
AUDIT_CHECK_S = 1.0  # how often the supervisor's audit log is checked (and checkpointed)
UMASKS = {"plant": 0o027, "enterprise": 0o077}  # as the units' UMask=: the spool group-readable
EXTRA_GROUPS: dict[str, tuple[str, ...]] = {
    "plant": (),
    "enterprise": (PLANT_USER,),
}  # reads the spool and plant audit
PROBE_TIMEOUT_S = 60.0  # one interpreter start, importing the package, on a loaded box
# A half of its own user gets these of the supervisor's environment and nothing else.
KEPT_VARIABLES = ("LANG", "LC_ALL", "TZ")
HALF_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's default
RELAY_LINE_BYTES = 64 * 1024  # a longer line from a half is copied in pieces of this size
RELAY_DRAIN_S = 2.0  # after a half exits, how long its last lines may take to arrive
# Added to the supervisor's nice value for the enterprise half (a CPU weight of about a third
# of the plant's). On two cores at load 13-25, the enterprise killed and restarted 20 times
# (tests/test_supervisor.py): at equal priority the plant skipped 1-8 scan slots in 5 of 23
# runs, every slow scan during an enterprise start-up; 5 or 10 below it, none in 14 runs.
ENTERPRISE_NICENESS = 5
# What one user for both halves gives up: what the enterprise half could then do to the plant.
GIVES_UP = (
    "the enterprise half can write the spool the plant half reads at start, the plant's state "
    "(island flag, accepted policy) and its audit log, and signal or trace the plant process"
)

log = structlog.get_logger("supervisor")


@dataclass(frozen=True)
class HalfUser:
    """Who a half runs as when `run` is started as root."""

    name: str
    uid: int
    gid: int
    extra_groups: tuple[int, ...]
    umask: int
    home: str = "/nonexistent"


def half_users() -> dict[str, HalfUser]:
    """Each half's user and groups from the system's user database; ConfigError naming the
    first that is missing."""
    users = {}
    for half in HALVES:
        name = user_of(half)
        try:
            entry = pwd.getpwnam(name)
            extra = tuple(grp.getgrnam(group).gr_gid for group in EXTRA_GROUPS[half])
        except KeyError:
            raise ConfigError(
                f"user {name} (or its group) does not exist: create the halves' users with "
                "deploy/install.sh, or start both halves as one user with --same-user"
            ) from None
        users[half] = HalfUser(
            name, entry.pw_uid, entry.pw_gid, extra, UMASKS[half], entry.pw_dir or "/nonexistent"
        )
    return users


def enroll_halves(config: BrokerConfig, appliance: str) -> None:
    """Certify, as root, epoch 1 of each half's audit log that has none yet, for the half's
    user (broker.deployment.enrollment): the halves then never read the root audit key,
    which is loaded here only if a half needs it."""
    root = RootKey.from_files(config.audit.key)
    for done in enrollment.enroll(config, appliance, root, HALVES):
        if done.skipped is None:
            log.info("audit_epoch_enrolled", writer=done.writer, user=done.user)


def half_environment(user: HalfUser | None) -> dict[str, str]:
    """The environment a half starts with. As another user: a few locale and time variables
    and a fixed PATH, never the rest of root's (credentials, proxies, HOME, LD_* and SSL_*
    settings would all be readable by the half, and change what it loads)."""
    supervisor = {SUPERVISOR_PID: str(os.getpid())}
    if user is None:
        return {**os.environ, **supervisor}
    kept = {name: os.environ[name] for name in KEPT_VARIABLES if name in os.environ}
    return {"PATH": HALF_PATH, "HOME": user.home, **kept, **supervisor}


def relayed() -> bool:
    """Whether the halves' output goes through the supervisor: when its stdout or stderr is a
    regular file, which a half holding the descriptor could truncate or overwrite. A
    terminal, a pipe or the journal's socket is left to them (a terminal keeps its colours)."""
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return True
    return False


def check_interpreter(users: dict[str, HalfUser]) -> None:
    """ConfigError unless each half's user can start this interpreter and import the broker:
    an installation only root can read would otherwise fail at every restart, forever."""
    for half, user in users.items():
        try:
            probe = subprocess.run(
                [sys.executable, "-I", "-c", "import broker.cli"],
                check=False,
                **_as(user),
                cwd="/",
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
            )
            problem = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
            failed = probe.returncode != 0
        except OSError as e:
            problem, failed = [e.strerror or str(e)], True
        if failed:
            raise ConfigError(
                f"user {user.name} cannot run the {half} half with {sys.executable} "
                f"({'; '.join(problem) or 'exit code ' + str(probe.returncode)}): install "
                "dmzbroker where that user can read it (deploy/install.sh --prefix), or start "
                "both halves as one user with --same-user"
            )


def refuse_if_running(config: BrokerConfig, users: dict[str, HalfUser] | None = None) -> None:
    """Raise FolderLockError, naming the folder and its holder, if another process writes
    any folder a half would write. Each half takes these locks itself; this only keeps
    `run` from starting next to another instance and restarting halves that cannot start.
    With `users`, a folder's lock file belongs to its half's user, not to this process's."""
    written = written_paths(config)
    for half in HALVES:
        owner = users[half].uid if users is not None else None
        for folder in written[half]:
            check_free(folder, owner)


def sharing_user() -> str:
    """The name of the one user both halves run as when `run` does not separate them."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a name, as in some containers
        return str(os.geteuid())


class _Credentials(TypedDict):
    user: int | None
    group: int | None
    extra_groups: list[int] | None
    umask: int


def _as(user: HalfUser | None) -> _Credentials:
    """The subprocess arguments that start a child as `user` (None: as this process)."""
    if user is None:
        return {"user": None, "group": None, "extra_groups": None, "umask": -1}
    return {
        "user": user.uid,
        "group": user.gid,
        "extra_groups": list(user.extra_groups),
        "umask": user.umask,
    }


def restart_delays(settings: SupervisorConfig) -> Backoff:
    """Delays before restarting one half: exponential, capped, with jitter (half to all of
    the step, so halves that die together do not come back in lockstep); a half that ran
    `restart_reset_s` before it exited starts them afresh."""
    return Backoff(
        settings.restart_initial_s,
        settings.restart_max_s,
        fresh_after_s=settings.restart_reset_s,
        jitter=(0.5, 1.0),
    )


class Supervisor:
    def __init__(
        self,
        config: Path,
        log_format: str,
        settings: SupervisorConfig,
        audit: AuditLog | None = None,  # None: the demo, whose log is the terminal
        *,
        reset_state: bool = False,  # a new installation: each half's FIRST start gets it
        users: dict[str, HalfUser] | None = None,  # None: both halves as this process's user
    ) -> None:
        # Absolute: a half that runs as another user may not be able to enter this cwd.
        self._config = config.absolute()
        self._users = users
        self._reset_state = reset_state
        self._log_format = log_format
        self._settings = settings
        self._audit = audit
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._relaying = users is not None and relayed()
        self._relays: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Keep both halves running until cancelled (a stop signal); then stop both."""
        # SIGHUP asks both halves to re-read the policy; it must never stop the broker.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._forward_hangup)
        if self._users is None:
            log.warning("halves_share_user", user=sharing_user(), gives_up=GIVES_UP)
        async with asyncio.TaskGroup() as tasks:
            if self._audit is not None:
                tasks.create_task(self._watch_audit(self._audit), name="supervisor audit")
            for half in HALVES:
                tasks.create_task(self._keep_running(half), name=half)

    async def _keep_running(self, half: str) -> None:
        backoff = restart_delays(self._settings)
        starts = 0
        delay = 0.0
        while True:
            try:
                # A restart never resets: a half whose records vanished while it ran must
                # not come back without them.
                process = await self._start(half, reset_state=self._reset_state and starts == 0)
            except OSError as e:  # fork or exec refused (out of memory or processes): retry
                delay = backoff.after(0.0)
                log.error("half_start_failed", half=half, error=str(e), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            if starts == 0:
                user = self._users[half].name if self._users is not None else sharing_user()
                log.info("half_started", half=half, pid=process.pid, user=user)
            else:
                log.warning(
                    "half_restarted",
                    half=half,
                    pid=process.pid,
                    restarts=starts,
                    delay_s=round(delay, 3),
                )
            starts += 1
            started = time.monotonic()
            try:
                code = await process.wait()
                await self._drain(half)
            except asyncio.CancelledError:
                await self._stop(half, process)
                raise
            ran_s = time.monotonic() - started
            delay = backoff.after(ran_s)
            log.error(
                "half_exited",
                half=half,
                pid=process.pid,
                **_how_it_ended(code),
                ran_s=round(ran_s, 3),
                restart_in_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def _start(self, half: str, *, reset_state: bool) -> asyncio.subprocess.Process:
        """Start a half; a stop request arriving meanwhile stops it again before returning."""
        user = self._users[half] if self._users is not None else None
        # Relayed: one pipe for both, read by _relay; else the supervisor's own, inherited.
        stdout = asyncio.subprocess.PIPE if self._relaying else None
        stderr = asyncio.subprocess.STDOUT if self._relaying else None
        argv = [sys.executable, "-I", "-m", "broker", half, "--config", str(self._config)]
        if reset_state:
            argv.append("--reset-state")
        spawning = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                "--log-format",
                self._log_format,
                env=half_environment(user),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                limit=RELAY_LINE_BYTES,
                stdout=stdout,
                stderr=stderr,
                **_as(user),
            )
        )
        try:
            process = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            await self._stop(half, await spawning)
            raise
        if half == "enterprise":
            _yield_cpu_to_the_plant(process.pid)
        self._children[half] = process
        if process.stdout is not None:
            self._relays[half] = asyncio.create_task(_relay(process.stdout), name=f"{half} out")
        return process

    async def _drain(self, half: str) -> None:
        """Let the relay of a half that exited copy its last lines (its error, if it failed
        to start), for at most RELAY_DRAIN_S: a process it left behind may hold the pipe."""
        relay = self._relays.pop(half, None)
        if relay is not None:
            await asyncio.wait({relay}, timeout=RELAY_DRAIN_S)
            relay.cancel()

    async def _stop(self, half: str, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await process.wait()
            except TimeoutError:
                log.error("half_killed", half=half, pid=process.pid, after_s=STOP_GRACE_S)
                process.kill()
                await process.wait()
        await self._drain(half)
        log.info("half_stopped", half=half, pid=process.pid, exit_code=process.returncode)

    def _forward_hangup(self) -> None:
        for process in self._children.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)
        log.info("policy_reload_requested", halves=len(self._children))

    async def _watch_audit(self, audit: AuditLog) -> None:
        """Checkpoints on time, and a failing audit log reported (the halves go on)."""
        monitor = AuditMonitor(audit, "restarts of halves are only in the process log")
        while True:
            monitor.check()
            await asyncio.sleep(AUDIT_CHECK_S)


def _yield_cpu_to_the_plant(pid: int) -> None:
    """Lower the enterprise half's CPU priority by ENTERPRISE_NICENESS, right after its exec.
    A nice value is per thread on Linux: the main thread first (the threads it starts later
    inherit the value), then any thread the interpreter started already."""
    niceness = min(os.getpriority(os.PRIO_PROCESS, 0) + ENTERPRISE_NICENESS, 19)
    try:
        os.setpriority(os.PRIO_PROCESS, pid, niceness)
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, int(task), niceness)
    except (ProcessLookupError, FileNotFoundError):
        pass  # it exited already: _keep_running sees it
    except PermissionError as e:  # never a reason to start the half again: it runs
        log.warning("half_priority_unchanged", half="enterprise", pid=pid, error=str(e))


async def _relay(output: asyncio.StreamReader) -> None:
    """Copy a half's output into the supervisor's stderr until it ends: whole lines, so that
    the two halves' lines never interleave, and a line longer than RELAY_LINE_BYTES in pieces
    (memory stays bounded). A stderr that refuses is skipped, never a reason to stop reading:
    the half would block on a full pipe."""
    while True:
        try:
            chunk = await output.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            chunk = e.partial  # the end: what came after the last newline, if anything
        except asyncio.LimitOverrunError as e:
            chunk = await output.read(max(e.consumed, 1))
        if not chunk:
            return
        with contextlib.suppress(OSError):
            view = memoryview(chunk)
            while view:
                view = view[os.write(2, view) :]


def _how_it_ended(returncode: int) -> dict[str, int | str]:
    """An exit code, or the signal that ended the process (asyncio gives it negated)."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return {"exit_signal": signal.Signals(-returncode).name}
    return {"exit_code": returncode}

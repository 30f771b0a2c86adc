"""Process lifecycle: run a main coroutine until it ends or SIGINT/SIGTERM asks it to stop,
and, for a half started by `dmzbroker run`, end when its supervisor ends.

A stop request cancels the main task, so every `finally` (closing the spool, the listeners,
child processes) runs before the process exits. A half never outlives its supervisor: a
half left running headless would keep polling devices with nothing watching it, and the
next `run` would be refused its folders. A half whose supervisor is gone bounds its own
shutdown: nothing is left to SIGKILL it, so the kernel ends it `STOP_GRACE_S` after the stop
request (SIGALRM, whose default action ends the process) if its cleanup hangs.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from typing import Any

from broker.errors import DmzBrokerError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SUPERVISOR_PID = "DMZBROKER_SUPERVISOR_PID"  # set by `run` in each half's environment
STOP_GRACE_S = 10.0  # a half's clean stop may take this long; then it is ended (SIGKILL, SIGALRM)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_supervisor: list[int] = []  # the pid of the `run` that started this half, once checked


def end_with_supervisor() -> None:
    """Under `run`, have the kernel send this process SIGTERM when the supervisor dies.

    Call it first thing in the child. The supervisor may have died before the request was
    made (the kernel would then never send the signal), so the parent is checked after it:
    if it is no longer the supervisor whose pid `run` passed down, the half does not start.
    Without SUPERVISOR_PID in the environment (systemd, `dmzbroker plant`) it does nothing.
    """
    supervisor = os.environ.pop(SUPERVISOR_PID, None)
    if supervisor is None:
        return
    import ctypes  # noqa: PLC0415 - only under `run`: not loaded in the hardened units

    libc = ctypes.CDLL(None, use_errno=True)
    term = ctypes.c_ulong(signal.SIGTERM)
    if libc.prctl(_PR_SET_PDEATHSIG, term, ctypes.c_ulong(0), ctypes.c_ulong(0), 0) != 0:
        raise SystemExit(f"dmzbroker: error: prctl: {os.strerror(ctypes.get_errno())}")
    if str(os.getppid()) != supervisor:
        raise SystemExit(f"dmzbroker: error: supervisor pid {supervisor} is gone; not starting")
    _supervisor.append(os.getppid())


def _orphaned() -> bool:
    """Started by `run`, whose process is gone: nobody would SIGKILL a stop that hangs."""
    return bool(_supervisor) and os.getppid() != _supervisor[0]


def run_until_signalled(main: Coroutine[Any, Any, int | None]) -> int:
    """Run `main`; returns its exit code, 0 when stopped by a signal."""

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopping = False

        def stop() -> None:
            nonlocal stopping
            if not stopping:  # a second request must not interrupt the cleanup of the first
                stopping = True
                if _orphaned():  # the kernel ends the process if the cleanup hangs
                    signal.setitimer(signal.ITIMER_REAL, STOP_GRACE_S)
                task.cancel()

        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, stop)
        try:
            return await main or 0
        except asyncio.CancelledError:
            if stopping:
                return 0
            raise
        except BaseExceptionGroup as group:
            raise _first_user_error(group) or group from group
        finally:
            # Nothing is left to stop. Hold further stop requests until they are ignored
            # below: closing the loop closes the pipe asyncio's signal handling writes to,
            # and a signal arriving meanwhile printed an OSError traceback at the user.
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)

    # SIGHUP means "re-read the policy": until a policy watcher takes it over, and after the
    # loop is gone, it must not kill the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return asyncio.run(guarded())
    finally:
        # The loop is gone and with it our handlers; a late stop request (Ctrl-C reaches the
        # whole process group, then the supervisor sends SIGTERM) must not cut the exit short.
        for sig in (*_STOP_SIGNALS, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # what was held: discarded


def _first_user_error(group: BaseExceptionGroup) -> DmzBrokerError | None:
    """A task group wraps the error a user must see; unwrap the first one."""
    matched: BaseException | None = group.subgroup(DmzBrokerError)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched if isinstance(matched, DmzBrokerError) else None

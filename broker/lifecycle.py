"""Process lifecycle: run a main coroutine until it ends or SIGINT/SIGTERM asks it to stop.

A stop request cancels the main task, so every `finally` (closing the spool, the listeners,
child processes) runs before the process exits.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from broker.errors import DmzBrokerError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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

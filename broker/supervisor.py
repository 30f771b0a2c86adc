"""`dmzbroker run`: the two halves as two OS processes, joined only by the spool.

Each half is started as `python -m broker plant|enterprise --config FILE`. If one half
exits on its own, the other is stopped too: a broker with half its pipeline is not running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import structlog

HALVES = ("plant", "enterprise")
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long

log = structlog.get_logger("supervisor")


class Supervisor:
    def __init__(self, config: Path, log_format: str) -> None:
        self._config = config
        self._log_format = log_format
        self._children: dict[str, asyncio.subprocess.Process] = {}

    async def start(self) -> None:
        # SIGHUP asks both halves to re-read the policy; it must never stop the broker.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._forward_hangup)
        for half in HALVES:
            self._children[half] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker", half,
                "--config", str(self._config), "--log-format", self._log_format,
            )  # fmt: skip
            log.info("half_started", half=half, pid=self._children[half].pid)

    def _forward_hangup(self) -> None:
        for process in self._children.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)
        log.info("policy_reload_requested", halves=len(self._children))

    async def wait(self) -> int:
        """Until a half exits by itself; returns the exit code to report (never 0)."""
        waits = {asyncio.create_task(p.wait()): half for half, p in self._children.items()}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        half = waits[done.pop()]
        code = self._children[half].returncode or 1
        log.error("half_exited", half=half, exit_code=self._children[half].returncode)
        return code

    async def stop(self) -> None:
        for half, process in self._children.items():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(STOP_GRACE_S):
                        await process.wait()
                except TimeoutError:
                    log.error("half_killed", half=half, after_s=STOP_GRACE_S)
                    process.kill()
                    await process.wait()
            log.info("half_stopped", half=half, exit_code=process.returncode)

    async def run(self) -> int:
        await self.start()
        try:
            return await self.wait()
        finally:
            await self.stop()

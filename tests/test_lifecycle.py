"""run_until_signalled: a stop request runs every `finally`, SIGHUP never kills, user errors
unwrap; end_with_supervisor: a half ends when the supervisor that started it dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import ConfigError, DeviceError, DmzBrokerError
from broker.lifecycle import SUPERVISOR_PID, run_until_signalled
from tests.harness import REPO

pytestmark = pytest.mark.timeout(60)

CHILD = textwrap.dedent(
    """
    import asyncio
    import sys

    from broker.lifecycle import SUPERVISOR_PID, run_until_signalled


    async def main():
        try:
            print("ready", flush=True)
            await asyncio.sleep(30)
            print("slept", flush=True)
        finally:
            await asyncio.sleep({cleanup_s})
            print("cleaned", flush=True)


    sys.exit(run_until_signalled(main()))
    """
)


class Child:
    """The script above in its own process group; its stdout goes to a file."""

    def __init__(self, directory: Path, cleanup_s: float = 0.0) -> None:
        self.out = directory / "child.out"
        with open(self.out, "wb") as stdout:
            self.process = subprocess.Popen(
                [sys.executable, "-c", CHILD.format(cleanup_s=cleanup_s)],
                stdout=stdout, stderr=subprocess.PIPE, cwd=REPO, start_new_session=True,
            )  # fmt: skip

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while "ready" not in self.lines():
            if self.process.poll() is not None:
                raise AssertionError(f"child exited early: {self.process.stderr.read()!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"child not ready within {timeout} s")
            time.sleep(0.02)

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process.stderr.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    started = Child(tmp_path)
    try:
        yield started
    finally:
        started.kill()


@pytest.fixture
def slow_cleanup_child(tmp_path: Path) -> Iterator[Child]:
    started = Child(tmp_path, cleanup_s=0.5)
    try:
        yield started
    finally:
        started.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_runs_the_finally_and_exits_0(child: Child, sig: signal.Signals) -> None:
    child.wait_ready()
    child.send(sig)
    assert child.wait() == 0
    assert child.lines() == ["ready", "cleaned"]
    assert b"Traceback" not in child.process.stderr.read()


def test_a_second_sigterm_does_not_interrupt_the_cleanup(slow_cleanup_child: Child) -> None:
    slow_cleanup_child.wait_ready()
    started = time.monotonic()
    slow_cleanup_child.send(signal.SIGTERM)
    slow_cleanup_child.send(signal.SIGTERM)  # may merge with the first while pending: see below
    assert slow_cleanup_child.wait() == 0
    assert time.monotonic() - started >= 0.5  # the cleanup's sleep ran to its end
    assert slow_cleanup_child.lines() == ["ready", "cleaned"]


def test_sigterm_during_the_cleanup_does_not_interrupt_it(slow_cleanup_child: Child) -> None:
    slow_cleanup_child.wait_ready()
    slow_cleanup_child.send(signal.SIGTERM)
    time.sleep(0.2)  # well inside the 0.5 s cleanup: surely handled as a second request
    slow_cleanup_child.send(signal.SIGTERM)
    assert slow_cleanup_child.wait() == 0
    assert slow_cleanup_child.lines() == ["ready", "cleaned"]


def test_sighup_does_not_kill_it(child: Child) -> None:
    child.wait_ready()
    child.send(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.5)
    assert child.lines() == ["ready"]
    child.send(signal.SIGTERM)
    assert child.wait() == 0
    assert child.lines() == ["ready", "cleaned"]


@pytest.fixture
def restore_signal_handlers() -> Iterator[None]:
    """run_until_signalled ignores stop signals once it returns; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.usefixtures("restore_signal_handlers")
@pytest.mark.parametrize(("returned", "code"), [(None, 0), (0, 0), (3, 3)])
def test_the_exit_code_is_what_main_returns(returned: int | None, code: int) -> None:
    async def main() -> int | None:
        await asyncio.sleep(0)
        return returned

    assert run_until_signalled(main()) == code


@pytest.mark.usefixtures("restore_signal_handlers")
def test_a_user_error_in_a_task_group_surfaces_as_itself() -> None:
    raised = ConfigError("policy.yaml: signals[0].device: no device named 'plc'")

    async def fail() -> None:
        await asyncio.sleep(0)
        raise raised

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(30))
            group.create_task(fail())

    with pytest.raises(ConfigError) as caught:
        run_until_signalled(main())
    assert caught.value is raised
    assert not isinstance(caught.value, BaseExceptionGroup)


@pytest.mark.usefixtures("restore_signal_handlers")
def test_a_user_error_in_a_nested_task_group_surfaces_as_itself() -> None:
    raised = DeviceError("plc-machine-room: no answer")

    async def fail() -> None:
        await asyncio.sleep(0)
        raise raised

    async def inner() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(fail())

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(inner())

    with pytest.raises(DmzBrokerError) as caught:
        run_until_signalled(main())
    assert caught.value is raised


@pytest.mark.usefixtures("restore_signal_handlers")
def test_a_programming_error_in_a_task_group_is_not_disguised() -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("a bug")

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(fail())

    with pytest.raises(ExceptionGroup) as caught:
        run_until_signalled(main())
    assert caught.group_contains(ValueError, match="a bug")
    assert not caught.group_contains(DmzBrokerError)


HALF = textwrap.dedent(
    """
    import asyncio
    import sys

    from broker.lifecycle import end_with_supervisor, run_until_signalled

    end_with_supervisor()


    async def main():
        try:
            print("ready", flush=True)
            await asyncio.sleep(30)
        finally:
            print("cleaned", flush=True)


    sys.exit(run_until_signalled(main()))
    """
)
SUPERVISOR = textwrap.dedent(
    """
    import os, subprocess, sys, time

    environment = dict(os.environ)
    if sys.argv[2] == "supervised":
        environment[{name!r}] = str(os.getpid())
    with open(sys.argv[1], "wb") as out:
        half = subprocess.Popen([sys.executable, "-I", "-c", {half!r}], stdout=out, env=environment)
    print(half.pid, flush=True)
    time.sleep(60)
    """
).format(name=SUPERVISOR_PID, half=HALF)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def supervisor_killed(script: str, out: Path, mode: str, cwd: Path) -> Iterator[int]:
    """Start `script` as the supervisor of a half, wait for the half to say "ready", kill
    the supervisor; yields the half's pid, and kills the half afterwards if it is alive."""
    supervisor = subprocess.Popen(
        [sys.executable, "-c", script, str(out), mode], stdout=subprocess.PIPE, text=True, cwd=cwd
    )
    assert supervisor.stdout is not None
    half = int(supervisor.stdout.readline())
    try:
        deadline = time.monotonic() + 20
        while "ready" not in out.read_text().splitlines():
            assert time.monotonic() < deadline, "the half did not start"
            time.sleep(0.02)
        supervisor.kill()
        supervisor.wait(timeout=10)
        yield half
    finally:
        supervisor.stdout.close()
        if alive(half):
            os.kill(half, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["supervised", "unsupervised"])
def test_a_half_ends_cleanly_when_its_supervisor_is_killed(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "half.out"
    with supervisor_killed(SUPERVISOR, out, mode, cwd=tmp_path) as half:
        # Up to 10 s for the supervised half to stop; 2 s of watching the unsupervised one.
        deadline = time.monotonic() + (10 if mode == "supervised" else 2)
        while alive(half) and time.monotonic() < deadline:
            time.sleep(0.02)
        if mode == "supervised":  # SIGTERM from the kernel: a clean stop, `finally` ran
            assert not alive(half)
            assert out.read_text().splitlines() == ["ready", "cleaned"]
        else:  # what `run` did before: the half lives on, headless
            assert alive(half)


STUCK_HALF = textwrap.dedent(
    """
    import asyncio
    import sys

    from broker import lifecycle

    lifecycle.end_with_supervisor()
    lifecycle.STOP_GRACE_S = 1.0  # the default is 10 s; the test need not wait that long


    async def main():
        try:
            print("ready", flush=True)
            await asyncio.sleep(30)
        finally:
            print("stopping", flush=True)
            await asyncio.shield(asyncio.sleep(30))  # a cleanup that hangs
            print("cleaned", flush=True)


    sys.exit(lifecycle.run_until_signalled(main()))
    """
)


def test_a_half_whose_supervisor_died_ends_itself_when_its_cleanup_hangs(tmp_path: Path) -> None:
    """Nobody is left to SIGKILL it: it bounds its own stop instead of lingering headless."""
    out = tmp_path / "half.out"
    script = SUPERVISOR.replace(repr(HALF), repr(STUCK_HALF))
    with supervisor_killed(script, out, "supervised", cwd=REPO) as half:
        deadline = time.monotonic() + 15  # 1 s of grace, much slack; the cleanup hangs 30 s
        while alive(half) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(half)
        assert out.read_text().splitlines() == ["ready", "stopping"]

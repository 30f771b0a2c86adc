"""`run`'s checks in a short-lived child (ADR 0031), and what the long-lived supervisor
takes from them: a policy of 100,000 signals parsed for the checks held 370 MB, which leaves
with the child. The child reports the digests of the config and trust root it verified; the
supervisor starts nothing unless what it reads again is the same."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from broker.config import BrokerConfig
from broker.errors import ConfigError
from broker.lifecycle import SUPERVISOR_PID

REPORT_BYTES = 4096  # the checks child's report: two hex digests in JSON, far below PIPE_BUF


@dataclass(frozen=True)
class Checked:
    """What `run`'s checks verified (ADR 0031): the parsed config's digest (`config_digest`)
    and the sha256 of the trust root's payload."""

    config: str
    trust_root: str


def config_digest(config: BrokerConfig) -> str:
    """The sha256 of the parsed config, not of its file: equal configs give equal digests in
    any process (sets and keys sorted, paths as text)."""
    encoded = msgspec.json.encode(config, enc_hook=str, order="deterministic")
    return hashlib.sha256(encoded).hexdigest()


def checked_in_child(
    config: Path, log_format: str | None, reset_state: bool, same_user: bool
) -> tuple[int, Checked | None]:
    """Run `run`'s checks in a short-lived child (`run --checks-only`) and return its exit
    code and what it checked (`report_checked`, on a pipe): what it parses (a policy of
    100,000 signals held 370 MB) leaves with it, where this long-lived process would keep it
    for ever. It shares this process's stdout and stderr, where it says what it refused, and
    dies with this process (SUPERVISOR_PID)."""
    report, writer = os.pipe()
    argv = [sys.executable, "-I", "-m", "broker", "run", "--checks-only"]
    argv += ["--config", str(config.absolute()), "--report-fd", str(writer)]
    argv += ["--log-format", log_format] if log_format is not None else []
    argv += ["--reset-state"] if reset_state else []
    argv += ["--same-user"] if same_user else []
    env = {**os.environ, SUPERVISOR_PID: str(os.getpid())}
    try:
        code = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, pass_fds=(writer,), check=False
        ).returncode
    finally:
        os.close(writer)
    try:
        # The child has exited: its one short write (atomic) is there or never will be.
        os.set_blocking(report, False)
        checked = msgspec.json.decode(os.read(report, REPORT_BYTES), type=Checked)
    except (BlockingIOError, msgspec.DecodeError):
        checked = None
    finally:
        os.close(report)
    return (code if code >= 0 else 128 - code), checked  # a signal: as a shell says it


def report_checked(fd: int, checked: Checked) -> None:
    """The checks child's report to `run` (`checked_in_child`), on the pipe at `fd`."""
    with os.fdopen(fd, "wb") as report:
        report.write(msgspec.json.encode(checked))


def refuse_unless_checked(
    checked: Checked | None, read: Checked, config: Path, trust_root: Path
) -> None:
    """ConfigError, naming the files that differ, unless what this process `read` is what
    the checks child verified (`checked`; None: it reported nothing)."""
    if checked is None:
        raise ConfigError(
            f"{config}: `run`'s checks did not report what they checked; nothing was started"
        )
    changed = [
        str(path)
        for path, before, now in (
            (config, checked.config, read.config),
            (trust_root, checked.trust_root, read.trust_root),
        )
        if before != now
    ]
    if changed:
        raise ConfigError(
            f"{' and '.join(changed)} changed after `run` checked it; nothing was started: "
            "run again once the files are no longer being changed"
        )

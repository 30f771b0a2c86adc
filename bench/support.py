"""What the benchmarks share: the repository root, a free loopback port, the CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> None:
    """`dmzbroker ARGS…` from the repository root; raises if it fails."""
    subprocess.run(
        [sys.executable, "-m", "broker", *args], check=True, capture_output=True, cwd=REPO
    )

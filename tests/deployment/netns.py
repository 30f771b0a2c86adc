"""Network namespaces for root-only tests: create them, link them with veth pairs, run
programs inside them, and remove them all again.

Everything here runs `ip` (iproute2) and `sysctl` as the test's root user; nothing touches
the host's own interfaces, addresses or routes: veth pairs are created inside the
namespaces, never in the host's, and a namespace's name carries the test run's pid so that
one left by a crashed run cannot collide.
"""

from __future__ import annotations

import select
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import REPO, stop_process

MISSING_TOOLS = [tool for tool in ("ip", "nft", "sysctl") if shutil.which(tool) is None]


def run(argv: Sequence[str], timeout: float = 30) -> str:
    """A command's stdout (run in the repository, so `python -m tests…` works); its stderr
    in the failure when it fails."""
    done = subprocess.run(
        list(argv), check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Namespace:
    """One network namespace, loopback up. IPv6 is on, as on a real host: a ruleset must
    hold for both families, and a namespace's own neighbour discovery and multicast listener
    reports are part of what its links carry."""

    name: str
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 30) -> str:
        return run(self.exec_argv(*argv), timeout)

    def python(self, *args: str, log: Path, ready: bool = True) -> subprocess.Popen[bytes]:
        """`python …` in the repository, inside the namespace, stderr to `log`; with `ready`,
        waits (bounded) for the program's `ready` line on its stdout. Stopped when the
        namespace is removed at the latest."""
        with open(log, "ab") as stderr:
            process = subprocess.Popen(
                self.exec_argv(sys.executable, *args),
                stdout=subprocess.PIPE if ready else subprocess.DEVNULL, stderr=stderr, cwd=REPO,
            )  # fmt: skip
        self.started.append(process)
        if ready:
            _wait_ready(process, log)
        return process

    def sysctl(self, *settings: str) -> None:
        self.run("sysctl", "-qw", *settings)

    def up(self, interface: str, *addresses: str) -> None:
        """Addresses (IPv4 or IPv6, with prefix length) on `interface`, then the link up.
        IPv6 addresses skip duplicate address detection (as `namespaces` sets for the link-local
        ones): usable at once, not after ~1 s."""
        for address in addresses:
            nodad = ["nodad"] if ":" in address else []
            self.run("ip", "address", "add", address, "dev", interface, *nodad)
        self.run("ip", "link", "set", interface, "up")

    def route(self, destination: str, via: str) -> None:
        family = "-6" if ":" in via else "-4"
        self.run("ip", family, "route", "add", destination, "via", via)


def _wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if readable else b""
    if line.strip() != b"ready":
        raise AssertionError(
            f"{process.args!r} not ready within {timeout} s ({line!r}): "
            + log.read_text(errors="replace")[-2000:]
        )


def veth(a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
    """A veth pair from `a` (interface `a_name`) to `b` (`b_name`), made inside `a`."""
    a.run("ip", "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)


@contextmanager
def namespaces(*names: str) -> Iterator[list[Namespace]]:
    """Namespaces created now and removed on exit, with every program started in them."""
    made: list[Namespace] = []
    try:
        for name in names:
            run(["ip", "netns", "add", name])
            space = Namespace(name)
            made.append(space)
            space.run("ip", "link", "set", "lo", "up")
            # No duplicate address detection on any interface made here later, link-local
            # addresses included: while a router's link-local address is tentative (~1-2 s
            # after link up) Linux sends no neighbour solicitation for a packet it forwards,
            # so the first IPv6 connection through it could time out and leave its peer
            # retransmitting SYN-ACKs into a later capture (a failure of test_wire).
            space.sysctl("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        yield made
    finally:
        for space in made:
            for process in space.started:
                stop_process(process)
                if process.stdout is not None:
                    process.stdout.close()
        for space in made:
            # its veth ends go with it, and with them their peers in the other namespaces
            subprocess.run(
                ["ip", "netns", "delete", space.name], check=False, capture_output=True, timeout=30
            )

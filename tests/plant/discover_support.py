"""What the `discover dnp3` and `discover bacnet` tests share: the real CLI in a child
process, the one-line error it must print, the check that a starter compiles as printed,
and a loopback TCP server for answers no real device gives."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from tests.harness import dmzbroker


async def discover(protocol: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`dmzbroker discover PROTOCOL ARGS…` in a child process; a thread keeps this loop (and
    the device it serves) running meanwhile."""
    return await asyncio.to_thread(dmzbroker, "discover", protocol, *args, check=False)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed (exit 1) with one line on stderr, nothing on stdout: returns it."""
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("dmzbroker: error: ") and "Traceback" not in done.stderr
    return line


async def assert_compiles(starter: str, folder: Path) -> None:
    """`policy compile` accepts the starter exactly as discover printed it."""
    (folder / "starter.yaml").write_text(starter)
    compiled = await asyncio.to_thread(
        dmzbroker, "policy", "compile", str(folder / "starter.yaml"), check=False
    )
    assert compiled.returncode == 0, compiled.stderr + compiled.stdout


@asynccontextmanager
async def tcp_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """`serve` on a free loopback port (yielded) until the block ends."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()

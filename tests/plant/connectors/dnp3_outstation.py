"""A DNP3 outstation the project did not write, behind a proxy that counts every request.

The outstation is opendnp3's (the `yadnp3` wheel, module `opendnp3`, a test-only
dependency: ADR 0023). It runs C++ threads, so it runs in a subprocess (this file run as a
script), configured from argv and driven through its stdin with one JSON object a line,
each acknowledged with one line on its stdout. In the test process, `CountingProxy` (asyncio)
sits between the master and the outstation, decodes every frame the master sends, and counts
its application function codes (`functions`: "READ", "CONFIRM", "WRITE g80v1", …) and link
function codes (`links`: "primary 4", "secondary 11", …); it can cut the line to simulate an
outage.

API (used by the DNP3 connector tests, `discover dnp3` and the bench):

    with Dnp3Outstation(size=8, unsolicited=False, outstation=1024, master=1,
                        unsolicited_confirm_timeout_s=5.0, events=1000) as station:
        station.set("analog", 0, 21.5, flags=ONLINE)        # kinds: KINDS below
        station.set("double_bit", 1, "on")                  # off|on|intermediate|indeterminate
        station.restart()                                    # sets IIN1.7 DEVICE_RESTART again
        station.indications(need_time=True, device_trouble=False, local_control=False)
        station.port                                         # where it listens, on 127.0.0.1
    async with CountingProxy(station.port) as proxy:        # proxy.port: where a master connects
        proxy.functions, proxy.links, proxy.reads            # what the master sent
        proxy.unsolicited, proxy.unsolicited_confirms        # sent by each side
        proxy.unsolicited_with_objects, proxy.data_confirms  # the non-null ones, their CONFIRMs
        proxy.cut() / proxy.restore()                        # an outage: connections closed, refused
        proxy.assert_read_only()                             # READ and CONFIRM only, no link reset
    link_frames(buffer) -> (frames, rest)                   # an independent frame splitter

Every point exists at indexes 0..size-1 of every kind, with the value 0 and the RESTART flag
until set; the outstation sets DEVICE_RESTART when it starts. Unsolicited responses are
allowed only with `unsolicited=True` (it then sends a null unsolicited response at start
and repeats it until it is confirmed; yadnp3 does not expose the class mask that would
report events unsolicited without an ENABLE_UNSOLICITED, so only null ones come: an
unsolicited response with objects is the hostile outstation's, test_dnp3_hostile.py). The event
buffer holds `events` events of each type (1000: more than the tests of one module make,
so an overflow only happens when a test asks for it).

`start` picks a free port and retries with another when opendnp3 could not bind it (another
process took it first): the subprocess says "ready" only once a listening socket of its own
is on that port (/proc), which a connect probe to someone else's server cannot fake.

The subprocess ends when its stdin closes, so a test process that dies leaves no
outstation behind. The fixtures `dnp3_outstation` (one per test module) and `dnp3_proxy` (one per test, whose
teardown asserts the master sent only READ and CONFIRM) are in conftest.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
ONLINE = 0x01
RESTART = 0x02
COMM_LOST = 0x04
REMOTE_FORCED = 0x08
LOCAL_FORCED = 0x10
OVER_RANGE = 0x20  # counters: ROLLOVER (obsolete), binaries: CHATTER_FILTER
REFERENCE_ERR = 0x40

KINDS = (
    "binary",  # group 1 (events 2)
    "double_bit",  # group 3 (events 4)
    "binary_output",  # group 10 (events 11)
    "counter",  # group 20 (events 22); frozen counters (21) freeze from these: not used here
    "analog",  # group 30 (events 32)
    "analog_output",  # group 40 (events 42)
)
DOUBLE_BIT = {"intermediate": 0, "off": 1, "on": 2, "indeterminate": 3}

FUNCTIONS = {
    0: "CONFIRM", 1: "READ", 2: "WRITE", 3: "SELECT", 4: "OPERATE", 5: "DIRECT_OPERATE",
    6: "DIRECT_OPERATE_NR", 7: "IMMED_FREEZE", 8: "IMMED_FREEZE_NR", 9: "FREEZE_CLEAR",
    10: "FREEZE_CLEAR_NR", 11: "FREEZE_AT_TIME", 12: "FREEZE_AT_TIME_NR", 13: "COLD_RESTART",
    14: "WARM_RESTART", 15: "INITIALIZE_DATA", 16: "INITIALIZE_APPLICATION",
    17: "START_APPLICATION", 18: "STOP_APPLICATION", 19: "SAVE_CONFIGURATION",
    20: "ENABLE_UNSOLICITED", 21: "DISABLE_UNSOLICITED", 22: "ASSIGN_CLASS",
    23: "DELAY_MEASURE", 24: "RECORD_CURRENT_TIME", 25: "OPEN_FILE", 26: "CLOSE_FILE",
    27: "DELETE_FILE", 28: "GET_FILE_INFO", 29: "AUTHENTICATE_FILE", 30: "ABORT_FILE",
    31: "ACTIVATE_CONFIG", 32: "AUTHENTICATE_REQ", 33: "AUTH_REQ_NO_ACK",
}  # fmt: skip
# What a read-only master may send: READ and the CONFIRM the protocol requires; on the link,
# unconfirmed user data (primary 4) and the answers a secondary owes (ACK 0, LINK_STATUS 11).
ALLOWED_FUNCTIONS = frozenset({"READ", "CONFIRM"})
ALLOWED_LINKS = frozenset({"primary 4", "secondary 0", "secondary 11"})


class Dnp3Outstation:
    """opendnp3's outstation in a subprocess on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        size: int = 8,
        *,
        unsolicited: bool = False,
        unsolicited_confirm_timeout_s: float = 5.0,
        events: int = 1000,
        outstation: int = 1024,
        master: int = 1,
    ) -> None:
        self.size = size
        self.unsolicited = unsolicited
        # opendnp3 holds its answers while it waits for an unsolicited response's CONFIRM:
        # its default, 5 s, so the tests see what a master meets in the field.
        self.unsolicited_confirm_timeout_s = unsolicited_confirm_timeout_s
        self.events = events
        self.outstation = outstation
        self.master = master
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        import pytest  # noqa: PLC0415 - the subprocess need not load it

        from tests.harness import free_port  # noqa: PLC0415

        pytest.importorskip("opendnp3", reason="yadnp3 (the outstation) has x86_64 wheels only")

        for _ in range(5):  # a free port may be taken by someone else before the child binds
            self.port = free_port()
            config = {
                "port": self.port,
                "size": self.size,
                "unsolicited": self.unsolicited,
                "unsolicited_confirm_ms": int(self.unsolicited_confirm_timeout_s * 1000),
                "events": self.events,
                "outstation": self.outstation,
                "master": self.master,
            }
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, json.dumps(config)],
                cwd=_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            if self._answer() == "ready" and self._listening():
                return
            self.stop()  # "taken": another process bound the port first; try another one
        raise RuntimeError("the DNP3 outstation did not start")

    def _listening(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.poll() is None and process.stdin is not None:
                process.stdin.write('{"op": "stop"}\n')
                process.stdin.flush()
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait(timeout=10)
        finally:
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> Dnp3Outstation:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def set(
        self,
        kind: str,
        index: int,
        value: bool | int | float | str,
        flags: int = ONLINE,
        time_ms: int | None = None,
    ) -> None:
        """Change a point (an event of its class 1 when value or flags change)."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
        if kind == "double_bit":
            value = DOUBLE_BIT[str(value)]
        self._command(
            {"op": "set", "kind": kind, "index": index, "value": value, "flags": flags,
             "time_ms": time_ms}
        )  # fmt: skip

    def restart(self) -> None:
        """Set the DEVICE_RESTART indication (IIN1.7) again, as after a restart."""
        self._command({"op": "restart"})

    def indications(self, **bits: bool) -> None:
        """Application indications: need_time, device_trouble, local_control,
        config_corrupt, event_buffer_overflow."""
        self._command({"op": "iin", **bits})

    def _command(self, command: dict[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise RuntimeError("the outstation is not running")
        process.stdin.write(json.dumps(command) + "\n")
        process.stdin.flush()
        answer = self._answer()
        if answer != "ok":
            raise RuntimeError(f"the outstation answered {answer!r} to {command}")

    def _answer(self) -> str:
        process = self._process
        if process is None or process.stdout is None:
            return ""
        return process.stdout.readline().strip()


@dataclass(frozen=True)
class ReadHeader:
    """One object header of a READ the proxy saw: `start`/`stop` None for all points."""

    group: int
    variation: int
    qualifier: int
    start: int | None = None
    stop: int | None = None


class CountingProxy:
    """An asyncio TCP proxy on 127.0.0.1 in front of the outstation (module docstring)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self.port = 0
        self.functions: collections.Counter[str] = collections.Counter()
        self.links: collections.Counter[str] = collections.Counter()
        self.reads: list[list[ReadHeader]] = []  # the object headers of each READ, in order
        self.unsolicited = 0  # UNSOLICITED_RESPONSEs the outstation sent
        self.unsolicited_confirms = 0  # CONFIRMs of them (UNS set) the master sent
        self.unsolicited_with_objects = 0  # those of them that carried objects (not null)
        self.data_confirms = 0  # CONFIRMs of an unsolicited response that carried objects
        self._unsolicited_null: dict[int, bool] = {}  # seq → whether the last one was null
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut = False

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        """An outage: close every connection and close new ones at once."""
        self._cut = True
        self._close_all()

    def restore(self) -> None:
        self._cut = False

    def assert_read_only(self) -> None:
        functions = set(self.functions)
        assert functions <= ALLOWED_FUNCTIONS, f"the master sent {dict(self.functions)}"
        assert set(self.links) <= ALLOWED_LINKS, f"link functions {dict(self.links)}"

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        for coroutine in (
            self._pipe(reader, up_writer, self._from_master, writer),
            self._pipe(up_reader, writer, self._from_outstation, up_writer),
        ):
            task = asyncio.create_task(coroutine)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        count: Any,
        other: asyncio.StreamWriter,
    ) -> None:
        buffer = b""
        try:
            while chunk := await reader.read(4096):
                found, buffer = link_frames(buffer + chunk)
                for control, data in found:
                    count(control, data)
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            for w in (writer, other):
                w.close()
                self._writers.discard(w)

    def _from_master(self, control: int, data: bytes) -> None:
        primary = "primary" if control & 0x40 else "secondary"
        self.links[f"{primary} {control & 0x0F}"] += 1
        if len(data) < 3 or not data[0] & 0x40:  # no user data, or not a first segment
            return
        function = data[2]
        name = FUNCTIONS.get(function, f"FUNCTION_{function}")
        if function == 2 and len(data) >= 5:
            name += f" g{data[3]}v{data[4]}"
        self.functions[name] += 1
        if function == 1:
            self.reads.append(_read_headers(data[3:]))
        elif function == 0 and data[1] & 0x10:
            self.unsolicited_confirms += 1
            if not self._unsolicited_null.get(data[1] & 0x0F, True):
                self.data_confirms += 1

    def _from_outstation(self, control: int, data: bytes) -> None:
        # The first segment of each unsolicited response (a null one fits in one segment of
        # 5 bytes: transport header, application control, function, IIN).
        if len(data) >= 3 and data[0] & 0x40 and data[2] == 130:
            self.unsolicited += 1
            null = len(data) == 5 and bool(data[0] & 0x80)
            self.unsolicited_with_objects += not null
            self._unsolicited_null[data[1] & 0x0F] = null


def link_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole link frames in `buffer` as (control, user data without CRCs), and the bytes
    left over. Independent of the broker's codec on purpose: it counts what that codec sends."""
    out = []
    while True:
        start = buffer.find(b"\x05\x64")
        if start < 0:
            return out, buffer[-1:] if buffer.endswith(b"\x05") else b""
        buffer = buffer[start:]
        if len(buffer) < 10:
            return out, buffer
        user = buffer[2] - 5
        if user < 0:
            buffer = buffer[2:]
            continue
        total = 10 + user + 2 * ((user + 15) // 16)
        if len(buffer) < total:
            return out, buffer
        body = buffer[10:total]
        data = b"".join(body[i : i + 18][:-2] for i in range(0, len(body), 18))  # CRCs off
        out.append((buffer[3], data))
        buffer = buffer[total:]


def _read_headers(objects: bytes) -> list[ReadHeader]:
    headers = []
    i = 0
    while i + 3 <= len(objects):
        group, variation, qualifier = objects[i], objects[i + 1], objects[i + 2]
        i += 3
        if qualifier == 0x06:
            headers.append(ReadHeader(group, variation, qualifier))
        elif qualifier in (0x00, 0x01):
            width = 1 if qualifier == 0x00 else 2
            start = int.from_bytes(objects[i : i + width], "little")
            stop = int.from_bytes(objects[i + width : i + 2 * width], "little")
            i += 2 * width
            headers.append(ReadHeader(group, variation, qualifier, start, stop))
        else:
            headers.append(ReadHeader(group, variation, qualifier))
            break  # a qualifier this proxy does not size: nothing after it is read
    return headers


# ---- the subprocess: opendnp3's outstation, driven through stdin --------------------------


def _serve(config: dict[str, Any]) -> None:  # pragma: no cover - runs in the subprocess
    import opendnp3 as o  # noqa: PLC0415 - its C++ threads stay in the subprocess

    indications: dict[str, bool] = {}

    class App(o.IOutstationApplication):  # type: ignore[misc]
        def SupportsWriteAbsoluteTime(self) -> bool:
            return False

        def WriteAbsoluteTime(self, _: Any) -> bool:
            return False

        def SupportsAssignClass(self) -> bool:
            return False

        def GetApplicationIIN(self) -> Any:
            iin = o.ApplicationIIN()
            iin.needTime = indications.get("need_time", False)
            iin.deviceTrouble = indications.get("device_trouble", False)
            iin.localControl = indications.get("local_control", False)
            iin.configCorrupt = indications.get("config_corrupt", False)
            iin.eventBufferOverflow = indications.get("event_buffer_overflow", False)
            return iin

        def ColdRestartSupport(self) -> Any:
            return o.RestartMode.UNSUPPORTED

        def WarmRestartSupport(self) -> Any:
            return o.RestartMode.UNSUPPORTED

        def ColdRestart(self) -> int:
            return 0

        def WarmRestart(self) -> int:
            return 0

        def Now(self) -> Any:
            return o.DNPTime(int(time.time() * 1000))

    class Commands(o.ICommandHandler):  # type: ignore[misc]
        def Begin(self) -> None:
            pass

        def End(self) -> None:
            pass

        def Select(self, *_: Any) -> Any:
            return o.CommandStatus.NOT_SUPPORTED

        def Operate(self, *_: Any) -> Any:
            return o.CommandStatus.NOT_SUPPORTED

    types = {
        "binary": o.Binary, "double_bit": o.DoubleBitBinary, "binary_output": o.BinaryOutputStatus,
        "counter": o.Counter, "analog": o.Analog, "analog_output": o.AnalogOutputStatus,
    }  # fmt: skip
    manager = o.DNP3Manager(1)
    try:
        channel = manager.AddTCPServer(
            "server",
            o.levels.NOTHING,
            o.ServerAcceptMode.CloseExisting,
            o.IPEndpoint("127.0.0.1", config["port"]),
            None,
        )
    except RuntimeError:  # "Unable to bind server": the parent tries another port
        print("taken", flush=True)
        manager.Shutdown()
        return
    stack = o.OutstationStackConfig(o.DatabaseConfig(config["size"]))
    stack.outstation.params.allowUnsolicited = config["unsolicited"]
    stack.outstation.params.unsolConfirmTimeout = o.TimeDuration.Milliseconds(
        config["unsolicited_confirm_ms"]
    )
    stack.outstation.eventBufferConfig = o.EventBufferConfig(*([config["events"]] * 8))
    stack.link.LocalAddr = config["outstation"]
    stack.link.RemoteAddr = config["master"]
    outstation = channel.AddOutstation("outstation", Commands(), App(), stack)
    outstation.Enable()
    print("ready" if _listening_here(config["port"]) else "taken", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "stop":
            break
        if op == "set":
            kind = command["kind"]
            value = command["value"]
            if kind == "double_bit":
                value = o.DoubleBit(value)
            elif kind == "counter":
                value = int(value)
            point = types[kind](value)  # not every type takes flags in its constructor
            flags = command["flags"]
            if kind in ("binary", "binary_output"):  # opendnp3 keeps the state in the flags
                flags |= 0x80 if value else 0
            elif kind == "double_bit":
                flags |= command["value"] << 6
            point.flags = o.Flags(flags)
            if command["time_ms"] is not None:
                point.time = o.DNPTime(command["time_ms"])
            builder = o.UpdateBuilder()
            builder.Update(point, command["index"])
            outstation.Apply(builder.Build())
        elif op == "restart":
            outstation.SetRestartIIN()
        elif op == "iin":
            indications.update({k: bool(v) for k, v in command.items() if k != "op"})
        print("ok", flush=True)
    manager.Shutdown()


def _listening_here(port: int) -> bool:  # pragma: no cover - runs in the subprocess
    """Whether this process has a socket listening on 127.0.0.1:`port` (opendnp3 binds in its
    own thread and says nothing when it cannot): /proc/net/tcp, by socket inode."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        mine = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                mine.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue  # closed meanwhile
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                address, _, hex_port = local.partition(":")
                listening = state == "0A" and address == "0100007F"
                if listening and int(hex_port, 16) == port and f"socket:[{inode}]" in mine:
                    return True
        time.sleep(0.02)
    return False


if __name__ == "__main__":  # pragma: no cover - the subprocess
    _serve(json.loads(sys.argv[1]))

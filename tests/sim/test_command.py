"""`dmzbroker sim refrigeration`: the demo's plant as a process of its own (a Modbus server
read by a real pymodbus client, a BACnet/IP room controller); it says where it listens,
listens only there, and stops on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from bacpypes3.primitivedata import ObjectIdentifier
from pymodbus.client import AsyncModbusTcpClient

from broker.plant.connectors import bacnet_frames as frames
from broker.sim.refrigeration import (
    AI_ROOM_TEMPERATURE,
    AV_ROOM_SETPOINT,
    BI_DOOR,
    IR_AMBIENT,
    IR_DISCHARGE,
    IR_ROOM,
    IR_SUCTION,
    ROOM_CONTROLLER_INSTANCE,
    ROOM_CONTROLLER_PORT,
)
from tests.harness import REPO, dmzbroker, eventually, free_port, free_udp_port

pytestmark = pytest.mark.timeout(60)


@contextmanager
def simulator(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The command running with `args`; its log (stderr) in a file. Killed if still running."""
    log = tmp_path / "sim.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "sim", "refrigeration", *args],
            stdout=subprocess.DEVNULL, stderr=sink, cwd=REPO, start_new_session=True,
        )  # fmt: skip
    try:
        yield process, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def signed(word: int) -> int:
    return word - 0x10000 if word & 0x8000 else word


async def input_registers(host: str, port: int) -> list[int] | None:
    """Input registers 0-39 of unit 1, or None while nothing answers there."""
    client = AsyncModbusTcpClient(host, port=port, timeout=2, retries=0)
    try:
        if not await client.connect():
            return None
        response = await client.read_input_registers(0, count=40, device_id=1)
        return None if response.isError() else list(response.registers)
    finally:
        client.close()


async def present_value(host: str, port: int, obj: tuple[str, int]) -> Any:
    """One object's present-value read from the room controller with a ReadProperty, or
    None when nothing answers within a second."""
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Link(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            answers.put_nowait(data)

        def error_received(self, exc: Exception) -> None:  # ICMP port unreachable
            pass

    transport, _ = await loop.create_datagram_endpoint(Link, remote_addr=(host, port))
    try:
        transport.sendto(frames.read_property(1, ObjectIdentifier(obj), "present-value"))
        try:
            async with asyncio.timeout(1.0):
                answer = frames.parse(await answers.get())
        except TimeoutError:
            return None
        return frames.value_of(obj[0], "present-value", answer.propertyValue)
    finally:
        transport.close()


async def answering(host: str, port: int) -> list[int]:
    """The registers, once the started process answers (it takes a second or two)."""
    read: list[list[int]] = []

    async def answered() -> bool:
        registers = await input_registers(host, port)
        read.extend([registers] if registers is not None else [])
        return bool(read)

    await eventually(answered, timeout=30, interval=0.2)
    return read[0]


def in_use(stderr: str, host: str, port: int, server: str) -> bool:
    """The command said it could not listen on host:port (`server`), as for a port in use."""
    return f"dmzbroker: error: cannot listen on {host}:{port} ({server}): " in stderr


@asynccontextmanager
async def serving(
    tmp_path: Path, *host: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Path, int, int]]:
    """The command on free ports, once its start is logged (Modbus answers before the BACnet
    device is up): (process, log, port, bacnet_port). A port free when picked may be taken by
    another test before the command binds it: on that error, and on no other, it starts again
    on other ports, 3 times at most."""
    address = host[-1] if host else "127.0.0.1"
    for attempt in range(3):
        port, bacnet_port = free_port(), free_udp_port()
        args = (*host, "--port", str(port), "--bacnet-port", str(bacnet_port))
        with simulator(tmp_path, *args) as (process, log):
            await eventually(
                lambda: (
                    '"event": "simulator_started"' in log.read_text() or process.poll() is not None
                ),
                timeout=30,
            )
            if process.poll() is None:
                yield process, log, port, bacnet_port
                return
            error = log.read_text()
            taken = in_use(error, address, port, "the Modbus server") or in_use(
                error, address, bacnet_port, "the BACnet/IP room controller"
            )
            assert taken and attempt < 2, error


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serves_the_demo_registers_and_stops_on_a_signal(
    tmp_path: Path, stop: signal.Signals
) -> None:
    async with serving(tmp_path) as (process, log, port, bacnet_port):
        first = await answering("127.0.0.1", port)
        assert f'"port": {port}' in log.read_text()
        assert f'"bacnet_port": {bacnet_port}' in log.read_text()
        # A cold store: a room near -18 degC, pressures of a refrigeration circuit, in bar.
        assert -25 <= signed(first[IR_ROOM]) / 10 <= -10
        assert 0 < signed(first[IR_SUCTION]) / 100 < signed(first[IR_DISCHARGE]) / 100 < 25
        assert -10 <= signed(first[IR_AMBIENT]) / 10 <= 40

        async def moved() -> bool:  # the simulation runs: the noisy ambient changes
            now = await input_registers("127.0.0.1", port)
            return now is not None and now[IR_AMBIENT] != first[IR_AMBIENT]

        await eventually(moved, timeout=20)

        # The chill room's controller answers on its UDP port: a room near +2 degC.
        temperature = await present_value("127.0.0.1", bacnet_port, AI_ROOM_TEMPERATURE)
        assert isinstance(temperature, float) and 0 < temperature < 6
        assert await present_value("127.0.0.1", bacnet_port, AV_ROOM_SETPOINT) == 2.0
        assert str(await present_value("127.0.0.1", bacnet_port, BI_DOOR)) in {"active", "inactive"}

        process.send_signal(stop)
        assert await asyncio.to_thread(process.wait, 20) == 0
    assert '"event": "simulator_stopped"' in log.read_text()
    assert "Traceback" not in log.read_text()
    with socket.create_server(("127.0.0.1", port)):  # the ports are free again
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", bacnet_port))


async def test_listens_on_the_host_given_and_nowhere_else(tmp_path: Path) -> None:
    async with serving(tmp_path, "--host", "127.0.0.2") as (process, log, port, bacnet_port):
        await answering("127.0.0.2", port)
        assert await input_registers("127.0.0.1", port) is None
        assert await present_value("127.0.0.2", bacnet_port, AV_ROOM_SETPOINT) == 2.0
        assert await present_value("127.0.0.1", bacnet_port, AV_ROOM_SETPOINT) is None
        assert '"host": "127.0.0.2"' in log.read_text()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = dmzbroker(
            "sim", "refrigeration", "--port", str(port), "--bacnet-port", str(free_udp_port()),
            check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"dmzbroker: error: cannot listen on 127.0.0.1:{port} (the Modbus server): "
        "the port is in use"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bacnet_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        bacnet_port = taken.getsockname()[1]
        for _ in range(3):  # the Modbus port, free when picked, may be taken before it binds
            port = free_port()
            result = dmzbroker(
                "sim", "refrigeration", "--port", str(port), "--bacnet-port", str(bacnet_port),
                check=False,
            )  # fmt: skip
            if not in_use(result.stderr, "127.0.0.1", port, "the Modbus server"):
                break
    assert result.returncode == 2
    assert (
        f"dmzbroker: error: cannot listen on 127.0.0.1:{bacnet_port} (the BACnet/IP room "
        "controller): the port is in use"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    with socket.create_server(("127.0.0.1", port)):  # the Modbus server it started is gone
        pass


@pytest.mark.parametrize("port", ["0", "65536", "modbus"])
def test_a_port_out_of_range_is_refused(port: str) -> None:
    result = dmzbroker("sim", "refrigeration", "--port", port, check=False)
    assert result.returncode == 2
    assert f"argument --port: {port!r} is not a TCP port (1-65535)" in result.stderr
    result = dmzbroker("sim", "refrigeration", "--bacnet-port", port, check=False)
    assert result.returncode == 2
    assert f"argument --bacnet-port: {port!r} is not a UDP port (1-65535)" in result.stderr


@pytest.mark.parametrize("host", ["localhost", "::1", "127.0.0"])
def test_a_host_that_is_not_an_ipv4_address_is_refused(host: str) -> None:
    result = dmzbroker("sim", "refrigeration", "--host", host, check=False)
    assert result.returncode == 2
    assert f"argument --host: {host!r} is not an IPv4 address" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_names_both_servers_and_their_default_ports() -> None:
    text = " ".join(dmzbroker("sim", "refrigeration", "--help").stdout.split())
    assert "Modbus TCP server (unit id 1)" in text
    assert f"BACnet/IP device (instance {ROOM_CONTROLLER_INSTANCE}, UDP)" in text
    assert "--bacnet-port BACNET_PORT UDP port of the BACnet/IP room controller (default: " in text
    assert f"(default: {ROOM_CONTROLLER_PORT}, BACnet/IP's own port, as the demo policy)" in text

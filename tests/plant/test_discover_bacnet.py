"""`dmzbroker discover bacnet` against the simulated BACnet/IP device on 127.0.0.1, which counts
every service it receives: the starter policy lists each object of a type the broker reads
with its name and units and compiles as printed, only Who-Is, ReadProperty and
ReadPropertyMultiple reach the device, a long object-list stops at --max-objects and says so,
and nothing listening, nothing answering or an answer that is not BACnet is one line."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import yaml

from broker.plant.connectors.bacnet_units import our_unit
from broker.sim.bacnet_device import SimObject, SimulatedBacnetDevice
from tests.deployment import netns
from tests.harness import REPO, dmzbroker, stop_process
from tests.plant.connectors.test_bacnet import started_on_a_free_port
from tests.plant.discover_support import assert_compiles, one_line_error
from tests.plant.discover_support import discover as discover_cli

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

READS = {"whoIs", "readProperty", "readPropertyMultiple"}
discover = partial(discover_cli, "bacnet")
ROOM = [
    SimObject("analog-input", 1, "room-temp", -18.5, "degreesCelsius", "cold room air"),
    SimObject("binary-input", 2, "door", False),
    SimObject("multi-state-value", 3, "fan-mode", 2),
    SimObject("analog-output", 4, "valve", 40.0, "percent"),
]


@asynccontextmanager
async def device(objects: list[SimObject]) -> AsyncIterator[SimulatedBacnetDevice]:
    simulated = await started_on_a_free_port(1001, objects, "room-ctl")
    try:
        yield simulated
    finally:
        await simulated.stop()
    assert set(simulated.requests) <= READS, simulated.requests  # never a write, never DM


async def test_a_device_s_objects_become_a_starter_policy_that_compiles_as_printed(
    tmp_path: Path,
) -> None:
    async with device(ROOM) as room:
        done = await discover(f"127.0.0.1:{room.port}", "--device-name", "room-controller")
        assert done.returncode == 0, done.stderr
        assert room.requests["whoIs"] == 1 and room.requests["readPropertyMultiple"] >= 1
    starter = yaml.safe_load(done.stdout)
    assert starter["devices"] == [{"name": "room-controller", "protocol": "bacnet",
                                   "host": "127.0.0.1", "port": room.port,
                                   "device_instance": 1001}]  # fmt: skip
    by_object = {(s["source"]["object_type"], s["source"]["instance"]): s
                 for s in starter["signals"]}  # fmt: skip
    assert set(by_object) == {(o.object_type, o.instance) for o in ROOM}  # no device, no port
    temperature = by_object[("analog-input", 1)]
    assert temperature["description"] == "room-temp — cold room air"
    assert temperature["unit"] == our_unit("degreesCelsius") != ""  # the policy's spelling
    assert by_object[("analog-output", 4)]["unit"] == our_unit("percent") != ""
    assert by_object[("binary-input", 2)]["unit"] == ""  # a binary object has no units
    # no `protocol`: the device says it (docs/policy.md), and a starter is what people write
    assert temperature["source"] == {"object_type": "analog-input", "instance": 1}
    lines = done.stdout.splitlines()
    comment = lines[lines.index(f"  - path: {temperature['path']}") - 1]
    assert comment == "  # analog-input 1 'room-temp': -18.5 degrees-celsius, float32"
    assert "# Starter policy for BACnet device 1001 (room-ctl)" in lines[0]
    await assert_compiles(done.stdout, tmp_path)


async def test_a_long_object_list_is_read_entry_by_entry_and_stops_at_max_objects() -> None:
    """An object-list longer than one answer can hold (2 kB; the device does not segment): the
    device aborts the whole read, so discover reads its length, then one entry at a time."""
    many = [SimObject("analog-value", i, f"av-{i}", float(i), "percent") for i in range(400)]
    async with device(many) as big:
        done = await discover(f"127.0.0.1:{big.port}", "--max-objects", "20")
        assert done.returncode == 0, done.stderr
        # its name, the whole list (aborted), the list's length, then 20 entries
        assert big.requests["readProperty"] == 1 + 1 + 1 + 20
    header = done.stdout.splitlines()[0]
    assert "of 402 in its object-list (stopped at --max-objects 20; raise it" in header
    assert 0 < len(yaml.safe_load(done.stdout)["signals"]) <= 20


async def test_another_device_instance_is_named_and_not_read() -> None:
    async with device(ROOM[:1]) as room:
        done = await discover(f"127.0.0.1:{room.port}", "--device-instance", "77")
        assert room.requests == {"whoIs": 1}  # nothing read from the wrong device
    line = one_line_error(done)
    assert "no device 77 answered the Who-Is (device 1001 did): check --device-instance" in line


async def test_nothing_listening_is_named_with_the_usual_port() -> None:
    # a port held by a socket connected elsewhere: the kernel delivers it no datagram from
    # discover and answers port unreachable, as for a free port, and while it is held no
    # other test can bind it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        held.connect(("127.0.0.1", 9))
        port = held.getsockname()[1]
        line = one_line_error(await discover(f"127.0.0.1:{port}", "--timeout", "2"))
    assert "nothing listens there (Connection refused)" in line and "usual port is 47808" in line


@asynccontextmanager
async def udp_server(answer: bytes | None) -> AsyncIterator[int]:
    """A UDP server that answers any datagram with `answer`, or says nothing (None)."""

    class Reply(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if answer is not None:
                self.transport.sendto(answer, addr)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Reply, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def test_an_answer_that_is_not_bacnet_is_named_as_such() -> None:
    async with udp_server(b"SSH-2.0-OpenSSH_9.2\r\n") as port:
        line = one_line_error(await discover(f"127.0.0.1:{port}"))
    assert "not BACnet/IP (BVLL type 53)" in line and "is this the device's BACnet/IP port?" in line


async def test_a_host_that_does_not_resolve_is_named_as_such() -> None:
    line = one_line_error(await discover("nosuchhost.invalid", "--timeout", "0.5"))
    # the resolver's words vary with the machine's DNS (unknown name, or no server reachable)
    assert line.startswith(
        "dmzbroker: error: nosuchhost.invalid:47808: cannot resolve 'nosuchhost.invalid' ("
    )
    assert line.endswith("): check the host name")


async def test_a_silent_port_times_out_in_one_line() -> None:
    async with udp_server(None) as port:
        done = await discover(f"127.0.0.1:{port}", "--timeout", "0.5")
    assert "no device answered the Who-Is" in one_line_error(done)


async def test_help_shows_the_defaults() -> None:
    shown = await asyncio.to_thread(dmzbroker, "discover", "bacnet", "--help")
    words = " ".join(shown.stdout.split())  # as wrapped for any terminal width
    assert "object-list (default: 5000)" in words and "this long (default: 3.0)" in words
    assert "the broadcast address of one of this host's interfaces (port 47808" in words


async def test_an_address_that_is_no_interface_s_broadcast_is_one_device_s() -> None:
    """127.0.0.255 ends in .255 but is no interface's broadcast address: a directed Who-Is."""
    async with udp_server(None) as port:
        done = await discover(f"127.0.0.255:{port}", "--timeout", "0.5")
    assert "nothing listens there" in one_line_error(done)  # connected: the ICMP came back


async def test_the_limited_broadcast_is_refused_with_the_interfaces_broadcasts() -> None:
    done = await discover("255.255.255.255:47808", "--timeout", "0.5")
    assert done.returncode == 2, done.stderr
    assert "leaves by the default route" in done.stderr and "Traceback" not in done.stderr


# A simulated device in a namespace: it serves until SIGTERM, then writes its counts.
RUNNER = """
import asyncio, json, signal, sys
from broker.sim.bacnet_device import SimObject, SimulatedBacnetDevice
async def main(host, instance, counts):
    device = SimulatedBacnetDevice(host, 47808, int(instance),
        [SimObject("analog-input", 1, "room-temp", -18.5, "degreesCelsius")], "room-ctl",
        prefix=24)
    await device.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await device.stop()
    open(counts, "w").write(json.dumps(device.requests))
asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.skipif(bool(netns.MISSING_TOOLS), reason=f"missing {netns.MISSING_TOOLS}")
async def test_broadcast_mode_in_a_namespace_finds_the_device_and_names_a_duplicated_instance(
    tmp_path: Path,
) -> None:
    """A /24 on a veth interface in a namespace of its own: `discover bacnet` broadcasts its
    Who-Is to the subnet's broadcast address (its interface's, so a broadcast), and a second
    device claiming the same instance from another address is an error naming both."""
    with netns.namespaces(f"dmzb-bac-{os.getpid()}") as (space,):
        space.run("ip", "link", "add", "bac0", "type", "veth", "peer", "name", "bac1")
        space.up("bac1")
        space.up("bac0", "10.77.0.1/24", "10.77.0.2/24")
        devices = []

        def device(host: str) -> None:
            counts = tmp_path / f"{host}.json"
            process = space.python("-c", RUNNER, host, "1001", str(counts), log=tmp_path / "log")
            devices.append((process, counts))

        def discover_in_namespace() -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "broker", "discover", "bacnet", "10.77.0.255:47808"]
            return subprocess.run(
                space.exec_argv(*argv, "--timeout", "1"),
                capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
            )  # fmt: skip

        device("10.77.0.1")
        found = discover_in_namespace()
        assert found.returncode == 0, found.stderr
        starter = yaml.safe_load(found.stdout)
        assert starter["devices"][0]["host"] == "10.77.0.1"
        assert starter["devices"][0]["device_instance"] == 1001
        device("10.77.0.2")  # the same instance again, from another address
        twice = discover_in_namespace()
        assert twice.returncode == 1, twice.stderr
        assert "device 1001 answered from 10.77.0.1:47808 and 10.77.0.2:47808" in twice.stderr
        for process, _ in devices:
            stop_process(process)
        for _, counts in devices:
            assert set(json.loads(counts.read_text())) <= READS  # never a write, never DM

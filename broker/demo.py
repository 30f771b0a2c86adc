"""`dmzbroker demo`: a throwaway PKI and owner keys, the example policy co-signed, the
simulated plant (a Modbus PLC and a BACnet/IP room controller), and the broker running on it,
serving the HTTPS API and the read-only OPC UA mirror.

Everything lives in a work directory that is recreated on each run (only if it holds the
demo's marker file, so a mistyped --workdir never deletes someone's files).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import structlog

from broker import policy
from broker.config import SupervisorConfig
from broker.errors import ConfigError, DmzBrokerError
from broker.policy import BacnetDevice, Device, ModbusDevice
from broker.sim.appliance import Appliance, OpcUaAccess, provision
from broker.sim.refrigeration import ROOM_CONTROLLER_INSTANCE, ListenError, demo_plant
from broker.supervisor import Supervisor
from broker.trust import tls

MARKER = ".dmzbroker-demo"
CONSUMER_URI = "spiffe://demo/consumer/historian"
READY_TIMEOUT_S = 30.0

log = structlog.get_logger("demo")


async def run_demo(
    workdir: Path, policy_path: Path, seconds: float | None, port: int, opcua_port: int
) -> int:
    demo_policy = policy.load(policy_path)
    plc, room_controller = _plant_devices(policy_path, demo_policy.devices)
    _recreate(workdir)
    served = opcua_port or None  # 0: no OPC UA server
    appliance = provision(
        workdir, demo_policy, port=port, consumer_uri=CONSUMER_URI, opcua_port=served
    )

    # Condenser fouling develops over simulated days, one a minute: within about a minute
    # the context flags it while the raw pressure still looks normal.
    plant = demo_plant(
        plc.host,
        plc.port,
        plc.unit_id,
        room_controller=(room_controller.host, room_controller.port),
    )
    try:
        await plant.start()
    except ListenError as e:
        raise ConfigError(
            f"cannot start the simulated plant: {e.server} cannot listen on {e.host}:{e.port}: "
            "is the port in use?"
        ) from e
    # `run`'s supervisor, without an audit writer of its own: the demo's log is the terminal.
    # A fresh appliance: each half's first start records what it accepts (--reset-state).
    supervisor = Supervisor(appliance.config, "auto", SupervisorConfig(), reset_state=True)
    running = asyncio.create_task(supervisor.run())
    try:
        url = f"https://localhost:{port}/v1/snapshot"
        await _wait_ready(url, appliance)
        print(
            "\nThe broker is running. Ask it for the latest value of every signal:\n\n"
            f"curl --cert {shlex.quote(str(appliance.client_cert))} "
            f"--key {shlex.quote(str(appliance.client_key))} "
            f"--cacert {shlex.quote(str(appliance.ca))} {url}\n",
            flush=True,
        )
        if appliance.opcua is not None:  # its address space takes a moment longer to build
            await _wait_listening(appliance.opcua)
            print(_opcua_hint(appliance.opcua, demo_policy), flush=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # None: no limit
                await asyncio.shield(running)  # ends only by a stop request or a bug
        return 0
    finally:
        running.cancel()  # stops both halves
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await plant.stop()


def _opcua_hint(access: OpcUaAccess, demo_policy: policy.Policy) -> str:
    """How to browse the read-only mirror: asyncua's `uals`, with the consumer's application
    certificate (its identity decides what it sees) and the server's certificate pinned,
    from the site's top object down to the signals' values."""
    uals = Path(sys.executable).with_name("uals")
    files = (access.cert, access.key, access.server_cert)
    security = ",".join(["Basic256Sha256", "SignAndEncrypt", *map(str, files)])
    roots = {signal.path.partition("/")[0] for signal in demo_policy.signals}
    # The server's own URI is namespace 1; the site's model is the next it registers.
    top = f"ns=2;s={roots.pop()}" if len(roots) == 1 else "i=85"
    return (
        f"The same values, read-only, over OPC UA at {access.url} (SignAndEncrypt with "
        "Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss; the client presents "
        f"the consumer's application certificate {access.cert} with its key {access.key}, and "
        f"trusts the server certificate {access.server_cert}):\n\n"
        f"{shlex.quote(str(uals))} -u {access.url} -n {shlex.quote(top)} -l -d 3 -v ERROR "
        f"--security {shlex.quote(security)}\n"
    )


def _plant_devices(
    policy_path: Path, devices: Sequence[Device]
) -> tuple[ModbusDevice, BacnetDevice]:
    """The policy's devices must be the ones the simulated plant serves: its PLC (Modbus)
    and its chill room's controller (BACnet/IP, the simulator's device instance)."""
    kinds = sorted(d.protocol for d in devices)
    plc = [d for d in devices if isinstance(d, ModbusDevice)]
    controller = [d for d in devices if isinstance(d, BacnetDevice)]
    if kinds != ["bacnet", "modbus"] or len(plc) != 1 or len(controller) != 1:
        raise ConfigError(
            f"{policy_path}: the demo plant is one Modbus device and one BACnet device, "
            f"not {', '.join(kinds) or 'none'}"
        )
    if controller[0].device_instance != ROOM_CONTROLLER_INSTANCE:
        raise ConfigError(
            f"{policy_path}: device {controller[0].name!r}: the demo's room controller is "
            f"BACnet device {ROOM_CONTROLLER_INSTANCE}, not {controller[0].device_instance}"
        )
    return plc[0], controller[0]


def _recreate(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists():
            raise ConfigError(
                f"{workdir}: exists and is not a demo directory; choose another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()


async def _wait_ready(url: str, appliance: Appliance) -> None:
    """Until the API answers over mTLS with at least one record (proves the whole path)."""
    ssl_context = tls.client_context(appliance.ca, appliance.client_cert, appliance.client_key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            try:
                async with session.get(url, ssl=ssl_context) as response:
                    if response.status == 200 and (await response.json())["records"]:
                        return
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.2)
    raise DmzBrokerError(f"no data at {url} after {READY_TIMEOUT_S:.0f} s; see the log above")


async def _wait_listening(access: OpcUaAccess) -> None:
    """Until the OPC UA server accepts connections: it binds once its address space is built
    (the records the API served are already in the half's store then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", access.port)
        except OSError:
            await asyncio.sleep(0.1)  # not listening yet
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise DmzBrokerError(
        f"the OPC UA server is not listening at {access.url} after {READY_TIMEOUT_S:.0f} s; "
        "see the log above"
    )

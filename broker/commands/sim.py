"""`sim refrigeration`: the demo's simulated plant on its own, a Modbus TCP server and a
BACnet/IP room controller to try a policy of one's own against (README, "Try your own policy").

Development only: it serves the simulator's registers and objects and nothing else; no broker
half imports it, and it never listens anywhere but the one address and two ports it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
from collections.abc import Callable
from typing import Any

import structlog

from broker import logs
from broker.errors import ConfigError
from broker.lifecycle import run_until_signalled

DEFAULT_PORT = 5020  # the ports policies/refrigeration.yaml names
DEFAULT_BACNET_PORT = 47808

log = structlog.get_logger("sim")


def add_to(commands: Any) -> None:
    sim = commands.add_parser(
        "sim", help="run a simulated plant on its own (development)",
        description="Run one of the demo's simulated plants on its own, to point a policy at.",
    )  # fmt: skip
    plants = sim.add_subparsers(required=True, metavar="PLANT")
    fridge = plants.add_parser(
        "refrigeration",
        help="the demo's cold store: a Modbus TCP server and a BACnet/IP room controller",
        description="The demo's simulated cold store, with its developing condenser fault: its "
        "machine-room PLC as a Modbus TCP server (unit id 1) and its chill room's controller as "
        "a BACnet/IP device (instance 1001, UDP). The registers and objects it serves are the "
        "ones policies/refrigeration.yaml names. Stops on Ctrl-C or SIGTERM.",
    )  # fmt: skip
    fridge.add_argument(
        "--port", type=_port("TCP"), default=DEFAULT_PORT,
        help="TCP port of the Modbus server (default: %(default)s, as the demo policy)",
    )  # fmt: skip
    fridge.add_argument(
        "--bacnet-port", type=_port("UDP"), default=DEFAULT_BACNET_PORT,
        help="UDP port of the BACnet/IP room controller (default: %(default)s, BACnet/IP's "
        "own port, as the demo policy)",
    )  # fmt: skip
    fridge.add_argument(
        "--host", type=_ipv4, default="127.0.0.1",
        help="IPv4 address to listen on (default: %(default)s)",
    )  # fmt: skip
    fridge.set_defaults(handler=_refrigeration)


def _port(kind: str) -> Callable[[str], int]:
    def port_number(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind} port (1-65535)")
        return port

    return port_number


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IPv4 address (the BACnet/IP room controller needs one)"
        ) from None


def _refrigeration(args: argparse.Namespace) -> int:
    logs.configure("auto", "sim")
    return run_until_signalled(_serve(args.host, args.port, args.bacnet_port))


async def _serve(host: str, port: int, bacnet_port: int) -> None:
    # pymodbus's and bacpypes3's servers only for this command: every other CLI start stays
    # as quick
    from broker.sim.refrigeration import (  # noqa: PLC0415
        ROOM_CONTROLLER_INSTANCE,
        ListenError,
        demo_plant,
    )

    plant = demo_plant(host, port, room_controller=(host, bacnet_port))
    try:
        await plant.start()
    except ListenError as e:
        raise ConfigError(
            f"cannot listen on {e.host}:{e.port} ({e.server}): the port is in use or {host} "
            "is not an address of this host"
        ) from e
    try:
        log.info(
            "simulator_started",
            plant="refrigeration",
            host=host,
            port=port,
            unit_id=plant.unit_id,
            bacnet_port=bacnet_port,
            device_instance=ROOM_CONTROLLER_INSTANCE,
            registers="policies/refrigeration.yaml",
        )
        await asyncio.Event().wait()  # until a stop signal cancels this task
    finally:
        await plant.stop()
        log.info("simulator_stopped", plant="refrigeration", host=host, port=port)

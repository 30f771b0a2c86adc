"""`sim refrigeration`: the demo's simulated plant on its own, a Modbus TCP server to try a
policy of one's own against (README, "Try your own policy").

Development only: it serves the simulator's registers and nothing else; no broker half
imports it, and it never listens anywhere but the one address it is given.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import structlog

from broker import logs
from broker.errors import ConfigError
from broker.lifecycle import run_until_signalled

DEFAULT_PORT = 5020  # the port policies/refrigeration.yaml names

log = structlog.get_logger("sim")


def add_to(commands: Any) -> None:
    sim = commands.add_parser(
        "sim", help="run a simulated plant on its own (development)",
        description="Run one of the demo's simulated plants on its own, to point a policy at.",
    )  # fmt: skip
    plants = sim.add_subparsers(required=True, metavar="PLANT")
    fridge = plants.add_parser(
        "refrigeration", help="the demo's cold store: a Modbus TCP server, unit id 1",
        description="The demo's simulated cold store, with its developing condenser fault, as "
        "a Modbus TCP server (unit id 1). The registers it serves are the ones "
        "policies/refrigeration.yaml names. Stops on Ctrl-C or SIGTERM.",
    )  # fmt: skip
    fridge.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="TCP port (default: %(default)s)"
    )
    fridge.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    fridge.set_defaults(handler=_refrigeration)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def _refrigeration(args: argparse.Namespace) -> int:
    logs.configure("auto", "sim")
    return run_until_signalled(_serve(args.host, args.port))


async def _serve(host: str, port: int) -> None:
    # pymodbus's server only for this command: every other CLI start stays as quick
    from broker.sim.refrigeration import demo_plant  # noqa: PLC0415

    plant = demo_plant(host, port)
    try:
        await plant.start()
    except RuntimeError as e:  # pymodbus's bind failure, without the OSError behind it
        raise ConfigError(
            f"cannot listen on {host}:{port}: the port is in use or {host} is not an address "
            "of this host"
        ) from e
    try:
        log.info(
            "simulator_started",
            plant="refrigeration",
            host=host,
            port=port,
            unit_id=plant.unit_id,
            registers="policies/refrigeration.yaml",
        )
        await asyncio.Event().wait()  # until a stop signal cancels this task
    finally:
        await plant.stop()
        log.info("simulator_stopped", plant="refrigeration", host=host, port=port)

"""A simulated refrigeration plant: a Modbus TCP server (the machine room's PLC) and, for
the demo, a BACnet/IP room controller (cold room 2), both on loopback.

A compressor keeps a cold room near its setpoint; ambient temperature swings; the door
opens now and then. Values move plausibly so the demo shows real dynamics. A developing
fault can be switched on: condenser fouling raises the discharge pressure at the same
ambient and load, growing with simulated days (`fouling_bar_per_day`, `days_per_second`
accelerate it) while the raw value stays inside its normal range. The register
map holds addresses that the demo policy does NOT name (tuning constants, diagnostics),
so tests can prove that the broker never reads them. Every request is counted by
function code and address.

The same compressor feeds the evaporator of a chill room whose own room controller speaks
BACnet/IP (`broker/sim/bacnet_device.py`, which counts every service request): its air
warms with the outdoor air and while its door is open (a few seconds every
`DOOR_EVERY_S`, on the simulation's clock), and cools while the compressor runs, its
evaporator fan turns and its controller calls for cold; a fouled condenser cools it less.
Its physics draws on its own random numbers, so the PLC's values and the fault's timing
are the same with or without it. Development only: nothing here is hardened.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
from collections import Counter
from dataclasses import dataclass

from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from broker.sim.bacnet_device import SimObject, SimulatedBacnetDevice

# Register map (addresses per table). Unmodelled: coils 2-7, inputs 2-7, holding 1-9 and
# 12-19, input registers 4-9, 11-19, 22-29, 34-39.
COIL_COMPRESSOR_RUNNING, COIL_CONDENSER_FAN = 0, 1
DI_DOOR_OPEN, DI_HIGH_PRESSURE = 0, 1
HR_SETPOINT, HR_ENERGY = 0, 10  # int16 x0.1 degC; uint32 x0.01 kWh (big word order)
IR_SUCTION, IR_DISCHARGE, IR_POWER = 0, 1, 2  # int16 x0.01 bar; int16 x0.01 bar; float32 kW
IR_CONDENSER_OUT, IR_AMBIENT, IR_HUMIDITY = 10, 20, 21  # int16 x0.1 degC; int16; uint16 x0.1 %
IR_ROOM, IR_RUN_SECONDS = 30, 31  # int16 x0.1 degC; uint32 s (little word order)
IR_DEFROST_CURRENT = 33  # uint16 x0.01 A
FOULING_MAX_BAR = 2.5
# The demo's fault (`dmzbroker demo`, `dmzbroker sim refrigeration`): one simulated day a
# minute, the condenser fouls fast enough that the discharge pressure reads drifting within
# about half a minute and abnormal within about a minute, both during the compressor's first
# run (about 65 s; the next starts only after about 70 s off). README's demo section states
# these times and tests/sim/test_refrigeration.py holds the simulation to them.
DEMO_FOULING_BAR_PER_DAY = 1.5
DEMO_DAYS_PER_SECOND = 1 / 60

FC_COILS, FC_INPUTS, FC_HOLDING, FC_INPUT_REGS = 1, 2, 3, 4

# The chill room's controller: BACnet device 1001 on UDP 47808 (BACnet/IP's own port), the
# address policies/refrigeration.yaml names. Its objects, by type and instance; the fan
# delay is one the demo policy does NOT name.
ROOM_CONTROLLER_INSTANCE, ROOM_CONTROLLER_PORT = 1001, 47808
AI_ROOM_TEMPERATURE = ("analog-input", 1)
AV_ROOM_SETPOINT = ("analog-value", 1)
BI_DOOR = ("binary-input", 1)
BO_EVAPORATOR_FAN = ("binary-output", 1)
AV_FAN_DELAY = ("analog-value", 2)
# The door opens for DOOR_OPEN_S seconds every DOOR_EVERY_S, first after DOOR_FIRST_S: soon
# enough to be seen in the demo's first minute.
DOOR_EVERY_S, DOOR_OPEN_S, DOOR_FIRST_S = 60.0, 6.0, 15.0


@dataclass
class PlantState:
    ambient_c: float = 24.0
    humidity_pct: float = 55.0
    room_c: float = -17.0
    setpoint_c: float = -18.0
    compressor_on: bool = False
    door_open: bool = False
    energy_kwh: float = 0.0
    run_seconds: float = 0.0
    suction_bar: float = 3.0
    discharge_bar: float = 6.0
    power_kw: float = 0.0
    fouling_bar: float = 0.0  # extra condensing pressure of a dirty condenser
    defrost_a: float = 0.0


@dataclass
class ChillRoomState:
    temperature_c: float = 2.0
    setpoint_c: float = 2.0
    door_open: bool = False
    calling: bool = False  # the controller's call for cold (its thermostat, 1 K band)
    fan_running: bool = False


def door_open_at(t: float) -> bool:
    """The chill room's door at `t` seconds since the start."""
    return t >= DOOR_FIRST_S and (t - DOOR_FIRST_S) % DOOR_EVERY_S < DOOR_OPEN_S


def step_chill_room(
    room: ChillRoomState, plant: PlantState, t: float, dt: float, rng: random.Random
) -> None:
    """Advance the chill room by `dt` seconds at time `t`, after the plant's own `step`."""
    room.door_open = door_open_at(t)
    if room.temperature_c > room.setpoint_c + 0.5:
        room.calling = True
    elif room.temperature_c < room.setpoint_c - 0.5:
        room.calling = False
    # Room controllers stop the evaporator fan while the door is open, so that it does not
    # blow warm, moist air onto the coil.
    room.fan_running = plant.compressor_on and not room.door_open
    # Heat through the walls towards the outdoor air; much more through an open door. A
    # fouled condenser condenses hotter, so the circuit moves less heat.
    heat_in = 0.0005 * (plant.ambient_c - room.temperature_c) + (0.04 if room.door_open else 0.0)
    capacity = 1 - 0.5 * plant.fouling_bar / FOULING_MAX_BAR
    cooling = 0.15 * capacity if room.fan_running and room.calling else 0.0
    room.temperature_c += (heat_in - cooling) * dt + rng.gauss(0, 0.005)


def step(
    state: PlantState, t: float, dt: float, rng: random.Random, fouling_per_s: float = 0.0
) -> None:
    """Advance the plant by `dt` seconds at time `t` (seconds since start)."""
    state.fouling_bar = min(FOULING_MAX_BAR, state.fouling_bar + fouling_per_s * dt)
    state.defrost_a = 8.0 + rng.gauss(0, 0.05) if int(t) % 120 < 10 else 0.0
    state.ambient_c = 24 + 6 * math.sin(2 * math.pi * t / 600) + rng.gauss(0, 0.1)
    state.humidity_pct = min(100.0, max(0.0, 55 + 10 * math.cos(2 * math.pi * t / 600)))
    if state.door_open:
        state.door_open = rng.random() > 0.2
    else:
        state.door_open = rng.random() < 0.01
    if state.room_c > state.setpoint_c + 1.0:
        state.compressor_on = True
    elif state.room_c < state.setpoint_c - 1.0:
        state.compressor_on = False
    heat_in = 0.01 + 0.002 * (state.ambient_c - 20) + (0.08 if state.door_open else 0.0)
    cooling = 0.06 if state.compressor_on else 0.0
    state.room_c += (heat_in - cooling) * dt
    if state.compressor_on:
        state.suction_bar = 1.2 + 0.02 * (state.room_c + 18) + rng.gauss(0, 0.01)
        state.power_kw = 15 + 0.3 * (state.ambient_c - 20) + rng.gauss(0, 0.2)
        state.discharge_bar = (
            7
            + 0.25 * (state.ambient_c - 20)
            + 0.07 * state.power_kw
            + state.fouling_bar
            + rng.gauss(0, 0.03)
        )
        state.run_seconds += dt
    else:
        state.suction_bar += (3.0 - state.suction_bar) * 0.1 * dt
        state.discharge_bar += (6.0 - state.discharge_bar) * 0.1 * dt
        state.power_kw = 0.0
    state.energy_kwh += state.power_kw * dt / 3600


def _int16(value: float) -> int:
    return int(struct.unpack(">H", struct.pack(">h", round(value)))[0])


def _words(fmt: str, value: float | int) -> list[int]:
    return list(struct.unpack(">HH", struct.pack(fmt, value)))


class ListenError(RuntimeError):
    """A server of the plant could not listen on its address (in use, or not this host's)."""

    def __init__(self, server: str, host: str, port: int) -> None:
        super().__init__(f"{server} cannot listen on {host}:{port}")
        self.server, self.host, self.port = server, host, port


class RefrigerationPlant:
    """The simulated plant's Modbus server, and the chill room's BACnet/IP controller when
    `room_controller` gives its (host, UDP port); each counts every request it receives."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5020,
        unit_id: int = 1,
        *,
        tick_s: float = 0.5,
        fouling_bar_per_day: float = 0.0,
        days_per_second: float = 1 / 86400,
        room_controller: tuple[str, int] | None = None,
    ) -> None:
        self.address = (host, port)
        self.unit_id = unit_id
        self.tick_s = tick_s
        self.fouling_per_s = fouling_bar_per_day * days_per_second  # per real second
        self.state = PlantState()
        self.requests: Counter[tuple[int, int, int]] = Counter()  # (function code, address, count)
        self._rng = random.Random(1)  # noqa: S311 - a reproducible simulation, not secrecy
        device = SimDevice(
            id=unit_id,
            simdata=(
                [SimData(0, count=8, values=False, datatype=DataType.BITS)],
                [SimData(0, count=8, values=False, datatype=DataType.BITS)],
                [SimData(0, count=20, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=40, values=0, datatype=DataType.REGISTERS)],
            ),
        )
        self._server = ModbusTcpServer(device, address=self.address, trace_pdu=self._trace)
        self._ticker: asyncio.Task[None] | None = None
        self.chill_room = ChillRoomState()
        self._room_rng = random.Random(2)  # noqa: S311 - its own: the PLC's values stay as they were
        self.room_controller = (
            SimulatedBacnetDevice(
                *room_controller,
                ROOM_CONTROLLER_INSTANCE,
                _room_controller_objects(self.chill_room),
                name="chill-room-2-controller",
            )
            if room_controller is not None
            else None
        )
        self._room_controller_serving = False

    def addresses_read(self, function_code: int) -> set[int]:
        return {
            address + i
            for (fc, address, count) in self.requests
            if fc == function_code
            for i in range(count)
        }

    @property
    def function_codes(self) -> set[int]:
        return {fc for fc, _, _ in self.requests}

    async def start(self) -> None:
        """Serve the PLC, then the room controller; `ListenError` names the one that cannot."""
        await self.publish()
        try:
            await self._server.serve_forever(background=True)
        except RuntimeError as e:  # pymodbus's bind failure, without the OSError behind it
            raise ListenError("the Modbus server", *self.address) from e
        if self.room_controller is not None:
            try:
                await self._start_room_controller(self.room_controller)
            except ListenError:
                await self._server.shutdown()  # type: ignore[no-untyped-call]
                raise
        self._ticker = asyncio.create_task(self._tick_forever(), name="plant simulation")

    async def _start_room_controller(self, device: SimulatedBacnetDevice) -> None:
        try:
            await device.start()
        except OSError as e:  # the port is in use, or the host is not one of ours
            raise ListenError("the BACnet/IP room controller", device.host, device.port) from e
        self._room_controller_serving = True
        await self.publish()

    async def freeze(self) -> None:
        """Stop the simulated physics; registers change only through `publish()` from now on."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None

    async def stop(self) -> None:
        await self.freeze()
        if self.room_controller is not None:
            self._room_controller_serving = False
            await self.room_controller.stop()
        await self._server.shutdown()  # type: ignore[no-untyped-call]

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests[
                (pdu.function_code, getattr(pdu, "address", -1), getattr(pdu, "count", 0))
            ] += 1
        return pdu

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await asyncio.sleep(self.tick_s)
            await self.advance(loop.time() - start)

    async def advance(self, t: float) -> None:
        """One tick of the simulated physics at `t` seconds since the start, into the
        registers (the ticker calls it; a test may drive the clock itself, after `freeze`)."""
        step(self.state, t, self.tick_s, self._rng, self.fouling_per_s)
        step_chill_room(self.chill_room, self.state, t, self.tick_s, self._room_rng)
        await self.publish()

    async def values(self, function_code: int, address: int, count: int) -> list[int] | list[bool]:
        """What a read with this function code would return, without a connection."""
        return await self._server.async_getValues(self.unit_id, function_code, address, count)

    async def publish(self) -> None:
        """Write `self.state` into the registers."""
        s, unit, put = self.state, self.unit_id, self._server.async_setValues
        await put(unit, FC_COILS, COIL_COMPRESSOR_RUNNING, [s.compressor_on, s.compressor_on])
        await put(unit, FC_INPUTS, DI_DOOR_OPEN, [s.door_open, s.discharge_bar > 14])
        await put(unit, FC_HOLDING, HR_SETPOINT, [_int16(s.setpoint_c * 10)])
        await put(unit, FC_HOLDING, HR_ENERGY, _words(">I", round(s.energy_kwh * 100)))
        await put(
            unit,
            FC_INPUT_REGS,
            IR_SUCTION,
            [_int16(s.suction_bar * 100), _int16(s.discharge_bar * 100)],
        )
        await put(unit, FC_INPUT_REGS, IR_POWER, _words(">f", s.power_kw))
        await put(
            unit,
            FC_INPUT_REGS,
            IR_CONDENSER_OUT,
            [_int16((s.ambient_c + (8 if s.compressor_on else 1)) * 10)],
        )
        await put(
            unit, FC_INPUT_REGS, IR_AMBIENT, [_int16(s.ambient_c * 10), round(s.humidity_pct * 10)]
        )
        await put(unit, FC_INPUT_REGS, IR_DEFROST_CURRENT, [round(s.defrost_a * 100)])
        run_words = _words(">I", round(s.run_seconds))
        await put(unit, FC_INPUT_REGS, IR_ROOM, [_int16(s.room_c * 10), run_words[1], run_words[0]])
        if self.room_controller is not None and self._room_controller_serving:
            room, device = self.chill_room, self.room_controller
            # A controller's sensor input is a REAL: to the 0.1 K it resolves.
            device.set(*AI_ROOM_TEMPERATURE, round(room.temperature_c, 1))
            device.set(*BI_DOOR, room.door_open)
            device.set(*BO_EVAPORATOR_FAN, room.fan_running)


def _room_controller_objects(room: ChillRoomState) -> list[SimObject]:
    return [
        SimObject(*AI_ROOM_TEMPERATURE, "ROOM-TEMP", room.temperature_c, "degreesCelsius",
                  "Chill room air temperature"),
        SimObject(*AV_ROOM_SETPOINT, "ROOM-SETPOINT", room.setpoint_c, "degreesCelsius",
                  "Chill room temperature setpoint"),
        SimObject(*BI_DOOR, "DOOR", room.door_open, description="Door contact, active when open"),
        SimObject(*BO_EVAPORATOR_FAN, "EVAP-FAN", room.fan_running,
                  description="Evaporator fan, stopped while the door is open"),
        SimObject(*AV_FAN_DELAY, "FAN-DELAY", 30.0, "seconds",
                  "Fan restart delay after the door closes"),
    ]  # fmt: skip


def demo_plant(
    host: str = "127.0.0.1",
    port: int = 5020,
    unit_id: int = 1,
    room_controller: tuple[str, int] | None = ("127.0.0.1", ROOM_CONTROLLER_PORT),
) -> RefrigerationPlant:
    """The demo's plant: the one policies/refrigeration.yaml reads, with its developing fault;
    its room controller on `room_controller` (host, UDP port), none when None."""
    return RefrigerationPlant(
        host,
        port,
        unit_id,
        fouling_bar_per_day=DEMO_FOULING_BAR_PER_DAY,
        days_per_second=DEMO_DAYS_PER_SECOND,
        room_controller=room_controller,
    )

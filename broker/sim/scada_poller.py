"""A scripted SCADA for the refrigeration simulator: what a plant's HMI sends all day, so
that a capture of it can show passive discovery at work (docs/discovery.md, README).

It polls the simulator's modelled Modbus ranges (broker/sim/refrigeration.py), each range
at its own interval, and writes the cold room's setpoint twice (FC 6, then FC 16) as an
operator would. Raw frames built with struct over a plain TCP connection, so a capture
holds what a real SCADA's would. Development only, never imported by the broker halves:
unlike the broker, this poller WRITES to the PLC.

    python -m broker.sim.scada_poller --port 5020 --seconds 30

Started alongside the simulator (README), it keeps trying to connect for a while
(`--connect-s`, 10 s by default) before it gives up with one error line.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from broker.backoff import Backoff
from broker.sim import refrigeration as sim

STEP_S = 0.5  # every interval below is a multiple of it
CONNECT_S = 10.0  # how long to keep trying to connect: the simulator may still be starting


@dataclass(frozen=True)
class Poll:
    """One range the SCADA reads, every `every_s` seconds."""

    function: int
    address: int
    count: int
    every_s: float


@dataclass(frozen=True)
class Write:
    """A setpoint an operator writes at `at_s` seconds into the run."""

    at_s: float
    function: int  # 6 (one register) or 16 (several)
    address: int
    words: tuple[int, ...]


@dataclass(frozen=True)
class Exchange:
    """One request and its answer on the wire, with when each was sent."""

    sent_at: float
    request: bytes
    answered_at: float
    response: bytes


# The modelled ranges, as a SCADA would group them: one request per block, never across a gap.
POLLS = (
    Poll(sim.FC_COILS, sim.COIL_COMPRESSOR_RUNNING, 2, 1.0),
    Poll(sim.FC_INPUTS, sim.DI_DOOR_OPEN, 2, 0.5),
    Poll(sim.FC_HOLDING, sim.HR_SETPOINT, 1, 2.0),
    Poll(sim.FC_HOLDING, sim.HR_ENERGY, 2, 4.0),
    Poll(sim.FC_INPUT_REGS, sim.IR_SUCTION, 4, 1.0),
    Poll(sim.FC_INPUT_REGS, sim.IR_CONDENSER_OUT, 1, 2.0),
    Poll(sim.FC_INPUT_REGS, sim.IR_AMBIENT, 2, 4.0),
    Poll(sim.FC_INPUT_REGS, sim.IR_ROOM, 4, 1.0),
)


def word(value: int) -> int:
    """A signed 16-bit value as the register's word."""
    return value & 0xFFFF


def writes(seconds: float) -> tuple[Write, ...]:
    """The setpoint writes of a run of `seconds`: -17.5 °C a quarter in, -18.0 °C later."""
    return (
        Write(_on_step(seconds / 4), 6, sim.HR_SETPOINT, (word(-175),)),
        Write(_on_step(seconds * 5 / 8), 16, sim.HR_SETPOINT, (word(-180),)),
    )


def _on_step(t: float) -> float:
    return round(t / STEP_S) * STEP_S


def due(t: float, polls: Sequence[Poll] = POLLS) -> list[Poll]:
    """The polls due at `t` seconds into the run (a multiple of STEP_S)."""
    return [p for p in polls if round(t / STEP_S) % round(p.every_s / STEP_S) == 0]


def read_frame(transaction: int, unit: int, poll: Poll) -> bytes:
    return _frame(transaction, unit, struct.pack(">BHH", poll.function, poll.address, poll.count))


def write_frame(transaction: int, unit: int, write: Write) -> bytes:
    if write.function == 6:
        pdu = struct.pack(">BHH", 6, write.address, write.words[0])
    else:
        n = len(write.words)
        pdu = struct.pack(f">BHHB{n}H", 16, write.address, n, 2 * n, *write.words)
    return _frame(transaction, unit, pdu)


def _frame(transaction: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction & 0xFFFF, 0, len(pdu) + 1, unit) + pdu


class Scada:
    """One connection to the PLC; `at(t)` sends what is due at `t` seconds into the run."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, unit: int = 1
    ) -> None:
        self._reader, self._writer, self._unit = reader, writer, unit
        self._transaction = 0

    async def at(
        self, t: float, seconds: float, stamp: float | None = None
    ) -> tuple[list[Exchange], list[Write]]:
        """The exchanges due at `t` of a run of `seconds`, and the writes among them. Times are
        the wall clock's, or, with `stamp`, scripted ones from `stamp` on (1 ms apart)."""
        done = [w for w in writes(seconds) if w.at_s == t]
        frames = [write_frame(self._next(), self._unit, w) for w in done]
        frames += [read_frame(self._next(), self._unit, p) for p in due(t)]
        exchanges = []
        for i, frame in enumerate(frames):
            sent = time.time() if stamp is None else stamp + 0.002 * i
            answer = await self._ask(frame)
            answered = time.time() if stamp is None else sent + 0.001
            exchanges.append(Exchange(sent, frame, answered, answer))
        return exchanges, done

    def _next(self) -> int:
        self._transaction = (self._transaction + 1) & 0xFFFF
        return self._transaction

    async def _ask(self, frame: bytes) -> bytes:
        self._writer.write(frame)
        await self._writer.drain()
        header = await self._reader.readexactly(6)
        (length,) = struct.unpack(">H", header[4:6])
        return header + await self._reader.readexactly(length)


async def connect(
    host: str, port: int, within_s: float = CONNECT_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `host:port`, tried again and again for up to `within_s` seconds;
    the last error once that time is up. Says once on stderr that it is waiting."""
    loop = asyncio.get_running_loop()
    deadline, backoff = loop.time() + within_s, Backoff(0.1, 1.0)
    said = False
    while True:
        try:
            return await asyncio.open_connection(host, port)
        except OSError:
            wait = min(backoff.delay(), deadline - loop.time())
            if wait <= 0:
                raise
            if not said:
                print(f"scada_poller: waiting for {host}:{port} (up to {within_s:g} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
                said = True
            await asyncio.sleep(wait)


async def poll(
    host: str, port: int, seconds: float, unit: int = 1, connect_s: float = CONNECT_S
) -> int:
    """Poll the PLC at `host:port` for `seconds` of wall time; the number of exchanges."""
    reader, writer = await connect(host, port, connect_s)
    scada, count = Scada(reader, writer, unit=unit), 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for tick in range(round(seconds / STEP_S) + 1):
            await asyncio.sleep(max(0.0, start + tick * STEP_S - loop.time()))
            exchanges, _ = await scada.at(tick * STEP_S, seconds)
            count += len(exchanges)
    finally:
        writer.close()
        await writer.wait_closed()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.sim.scada_poller",
        description="poll the refrigeration simulator as a SCADA would (and write its setpoint)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5020)
    parser.add_argument("--unit", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--connect-s", type=float, default=CONNECT_S,
        help=f"keep trying to connect for this long (default {CONNECT_S:g} s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        count = asyncio.run(poll(args.host, args.port, args.seconds, args.unit, args.connect_s))
    except ConnectionRefusedError as e:
        parser.exit(2, f"scada_poller: error: {args.host}:{args.port}: {e}: is the simulator "
                       f"running (dmzbroker sim refrigeration --port {args.port})?\n")  # fmt: skip
    except (OSError, asyncio.IncompleteReadError) as e:
        parser.exit(2, f"scada_poller: error: {args.host}:{args.port}: {e}\n")
    print(f"scada_poller: {count} exchanges with {args.host}:{args.port} in {args.seconds:g} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

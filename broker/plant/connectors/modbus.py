"""Modbus TCP connector: coils, discrete inputs, holding and input registers, read-only.

Read-only by construction: the only Modbus functions this code base names are in
`READ_FUNCTIONS` (codes 1–4); it never sends a write function code. It reads only what the
planner (`modbus_plan.py`) plans: never an address that no signal names.

It keeps the device's budget from the policy (docs/modbus.md): a scan starts at most every
`poll_interval_s` and never overlaps the previous one (missed slots are skipped and counted,
never queued, so nothing piles up); request starts are spaced to at most
`max_requests_per_s`; a scan's requests share at most `max_connections` connections; each
request waits at most `timeout_s`. A timeout or a lost connection trips the device's own
breaker: its signals go `bad`, the connections close, and it retries after an exponential
backoff with jitter. Each device runs in its own task, so one never delays another.

Behind a gateway (several unit ids at one address), a unit that stops answering while the
connection stays up trips a breaker of its own instead: its signals go `bad`, its requests
are not sent again until its backoff has passed, and the other units keep their rate.

The breaker's backoff starts afresh only after the session has scanned well for `STABLE_S`
(the idea `supervision.py` applies to a whole connector): a device that answers one scan and
then fails is reconnected at a slowing rate, not once per scan.

It never takes an answer that does not match its request as data (docs/modbus.md, "A device
that answers wrongly"): `modbus_frames.py` decodes every frame and says why an answer is not
one; a refusal (an exception, the wrong number of items) makes that request's signals `bad`,
anything else means the connection no longer lines up requests and answers, and it is
dropped like a silent one.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from broker.backoff import Backoff
from broker.errors import DeviceError
from broker.plant.connectors.base import (
    Emit,
    Pace,
    RawSample,
    ScanGrid,
    SessionBreaker,
    raise_if_cancelled,
)
from broker.plant.connectors.modbus_frames import (
    ResponseDecoder,
    exception_name,
    mismatch,
    refusal,
)
from broker.plant.connectors.modbus_plan import READ_FUNCTIONS, ReadRequest, plan_reads
from broker.plant.connectors.supervision import FIRST_RETRY_S, MAX_RETRY_S, STABLE_S
from broker.policy import ModbusDevice, Signal, budget
from broker.policy.schema import BIT_TABLES

# What pymodbus raises for a request: no answer within timeout_s or the connection lost
# (ModbusException), and what its decoding raises should a version let one through.
_LIBRARY_ERRORS = (ModbusException, OSError, ValueError, IndexError, struct.error)


class _Client(AsyncModbusTcpClient):
    """One connection to the device: pymodbus's client with `ResponseDecoder`, knowing the
    transaction id of the request it sent last (one request at a time per connection)."""

    def __init__(self, device: ModbusDevice) -> None:
        super().__init__(
            device.host,
            port=device.port,
            timeout=device.timeout_s,
            retries=0,
            reconnect_delay=0,  # reconnects are ours, through the breaker
            trace_pdu=self._traced,
        )
        self.ctx.framer.decoder = ResponseDecoder()  # what `register()` extends, replaced
        self.sent_tid = 0  # pymodbus numbers requests from 1

    def _traced(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending:
            self.sent_tid = pdu.transaction_id
        return pdu


class _UnitSilent(Exception):
    """One unit behind a gateway did not answer; the connection itself is fine."""


class _UnitBreaker:
    """One unit's breaker: after a silent read, its requests rest until the backoff ends."""

    def __init__(self, initial_s: float) -> None:
        self._backoff = Backoff(initial_s)
        self._resting_until = 0.0
        self.down = False

    def resting(self, now: float) -> bool:
        return self.down and now < self._resting_until

    def tripped(self, now: float) -> float:
        """Trip (or stay tripped); the seconds until the next try."""
        delay = self._backoff.delay()
        self._resting_until = now + delay
        self.down = True
        return delay

    def closed(self) -> None:
        self._backoff.reset()
        self.down = False


def emit_groups(plan: Sequence[ReadRequest], shared: Sequence[Collection[str]]) -> list[int]:
    """For each request of `plan`, the group it is handed on with: requests that read
    signals of one set of `shared` fall in one group (union-find), any other request is a
    group of its own. A group is emitted once all of its requests are answered."""
    parent = list(range(len(plan)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    request_of = {slot.signal: i for i, request in enumerate(plan) for slot in request.slots}
    for paths in shared:
        found = [request_of[p] for p in paths if p in request_of]
        for i in found[1:]:
            parent[root(i)] = root(found[0])
    return [root(i) for i in range(len(plan))]


class _HandOn:
    """A scan's groups, passed to `emit` in order by a task of their own, so that the reads
    never wait for the spool: while `emit` waits for room, the groups answered meanwhile are
    held here (at most one scan's), and `drained` is the scan's one backpressure wait."""

    def __init__(self, emit: Emit) -> None:
        self._held: asyncio.Queue[list[RawSample] | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._forward(emit))

    def put(self, samples: list[RawSample]) -> None:
        self._held.put_nowait(samples)

    async def drained(self) -> None:
        """Once every group put is taken by `emit` (the spool's backpressure)."""
        self._held.put_nowait(None)
        await self._task

    async def cancel(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _forward(self, emit: Emit) -> None:
        while (samples := await self._held.get()) is not None:
            await emit(samples)


class ModbusConnector:
    def __init__(
        self,
        device: ModbusDevice,
        signals: Sequence[Signal],
        shared: Sequence[Collection[str]] | None = None,
    ) -> None:
        """`shared`: sets of signals that share asset state (registry.shared_state); each
        request's samples are handed on as soon as every request its set touches is answered.
        None: a whole scan is one batch."""
        self._device = device
        self.plan = plan_reads(signals, device.unit_id)
        self._groups = [0] * len(self.plan) if shared is None else emit_groups(self.plan, shared)
        self._members: dict[int, list[int]] = {}
        for i, group in enumerate(self._groups):
            self._members.setdefault(group, []).append(i)
        self.scans = 0
        self.overruns = 0  # scan slots skipped because the previous scan ran late
        self.errors = 0  # failed connections and reads
        self.last_scan_s = 0.0  # how long the last scan's reads took (not its hand-on)
        self._connections = max(1, min(device.max_connections, len(self.plan)))
        self._pace = Pace(device.max_requests_per_s)
        self._refused: set[ReadRequest] = set()  # requests the device currently refuses
        self._budget_told = False
        self._log = structlog.get_logger("modbus").bind(device=device.name)
        self._breaker = SessionBreaker(self._log, [s.path for s in signals])
        self._grid = ScanGrid(device.poll_interval_s, self._log)
        units = {request.unit_id for request in self.plan}
        self._unit_breakers = (  # only behind a gateway: a lone unit is the device
            {u: _UnitBreaker(min(1.0, device.poll_interval_s)) for u in units}
            if len(units) > 1
            else {}
        )

    async def run(self, emit: Emit) -> None:
        self._warn_if_over_budget()
        backoff = Backoff(FIRST_RETRY_S, MAX_RETRY_S, fresh_after_s=STABLE_S)
        while True:
            self._breaker.opening()
            try:
                async with self._session() as clients:
                    await self._scan_forever(clients, emit)
            except DeviceError as e:
                self.errors += 1
                await self._breaker.failed(e, backoff, emit)

    def _warn_if_over_budget(self) -> None:
        """Audit, once per connector (so once per accepted policy), scans its budget cannot
        carry: a policy signed before the default budget existed may now be held to it."""
        if self._budget_told:
            return
        self._budget_told = True
        device = self._device
        found = budget.misfits(device, len(self.plan))
        if found:
            self._log.warning(
                "device_budget_exceeded",
                requests_per_scan=len(self.plan),
                poll_interval_s=device.poll_interval_s,
                max_requests_per_s=device.max_requests_per_s,
                max_connections=device.max_connections,
                warnings=found,
            )

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[list[_Client]]:
        device = self._device
        clients = [_Client(device) for _ in range(self._connections)]
        try:
            for client in clients:
                connected = await client.connect()
                raise_if_cancelled()
                if not connected:
                    raise DeviceError(f"cannot connect to {device.address}")
            yield clients
        finally:
            for client in clients:
                client.close()

    async def _scan_forever(self, clients: list[_Client], emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        next_scan = loop.time()
        while True:
            await self._scan(clients, emit)
            device = self._device
            self._breaker.scanned(host=device.host, port=device.port, connections=len(clients))
            next_scan, missed = self._grid.next_slot(next_scan, loop.time(), self.last_scan_s)
            self.overruns += missed
            await asyncio.sleep(next_scan - loop.time())

    async def _scan(self, clients: list[_Client], emit: Emit) -> None:
        """One pass over the plan, each connection taking the next request when it is free;
        a group's samples are handed on when its last request is answered. The reads go
        back to back whatever the spool does: a spool that is behind (emit waits) holds the
        scan's groups until after its last request (ADR 0032), so the wait is once a scan,
        outside `last_scan_s`, and the scan still runs late and skips slots."""
        started = time.monotonic()
        results: list[list[RawSample]] = [[] for _ in self.plan]
        pending = iter(enumerate(self.plan))
        groups, members = self._groups, self._members
        unanswered = Counter(groups)
        hand_on = _HandOn(emit)

        async def work(client: _Client) -> None:
            for i, request in pending:
                results[i] = await self._read_unless_resting(client, request)
                group = groups[i]
                unanswered[group] -= 1
                if not unanswered[group]:
                    hand_on.put([sample for j in members[group] for sample in results[j]])

        # Not a TaskGroup: on 3.11 a failing child leaves this task's cancel count raised,
        # which `raise_if_cancelled` would then take for a stop request.
        workers = [asyncio.create_task(work(client)) for client in clients]
        try:
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.wait(workers)
            self.last_scan_s = time.monotonic() - started  # the device's time, not the spool's
            await hand_on.drained()
        finally:
            await hand_on.cancel()  # a failed scan's groups not yet taken are dropped
        self.scans += 1

    async def _read_unless_resting(self, client: _Client, request: ReadRequest) -> list[RawSample]:
        """The request's samples; `bad` without a read while its unit's breaker rests."""
        breaker = self._unit_breakers.get(request.unit_id)
        if breaker is None:
            return await self._read(client, request)
        now = time.monotonic()
        if breaker.resting(now):
            return self._bad(request)
        try:
            samples = await self._read(client, request)
        except _UnitSilent as e:
            self.errors += 1
            was_down = breaker.down
            retry_in_s = breaker.tripped(time.monotonic())
            if not was_down:  # logged (and audited) once per state change
                self._log.warning(
                    "device_unit_down",
                    unit_id=request.unit_id,
                    error=str(e),
                    retry_in_s=round(retry_in_s, 3),
                )
            return self._bad(request)
        if breaker.down:
            breaker.closed()
            self._log.info("device_unit_up", unit_id=request.unit_id)
        return samples

    async def _read(self, client: _Client, request: ReadRequest) -> list[RawSample]:
        await self._pace.wait()
        raise_if_cancelled()
        method = getattr(client, READ_FUNCTIONS[request.table][1])
        what = f"unit {request.unit_id} {request.table} {request.address}+{request.count}"
        try:
            response = await method(request.address, count=request.count, device_id=request.unit_id)
        except _LIBRARY_ERRORS as e:
            if self._unit_breakers and client.connected:
                raise _UnitSilent(f"{what}: {e}") from e
            raise DeviceError(f"{what}: {e}") from e
        raise_if_cancelled()
        if (wrong := mismatch(response, request, client.sent_tid)) is not None:
            raise DeviceError(f"{what}: answered with {wrong}")
        now = datetime.now(UTC)
        reason = refusal(response, request)
        if reason is not None:
            self.errors += 1
            self._refused_once(request, response, reason)
            return self._bad(request)
        items = response.bits if request.table in BIT_TABLES else response.registers
        if request in self._refused:
            self._refused.discard(request)
            self._log.info(
                "device_read_recovered",
                unit_id=request.unit_id,
                table=request.table,
                address=request.address,
            )
        if request.table in BIT_TABLES:
            return [RawSample(s.signal, bool(items[s.offset]), now, "good") for s in request.slots]
        return [
            RawSample(s.signal, tuple(items[s.offset : s.offset + s.width]), now, "good")
            for s in request.slots
        ]

    def _refused_once(self, request: ReadRequest, response: ModbusPDU, reason: str) -> None:
        """Log (and so audit) a refusal when it starts, not at every poll while it lasts."""
        if request in self._refused:
            return
        self._refused.add(request)
        code = response.exception_code if response.isError() else None
        self._log.warning(
            "device_read_refused",
            unit_id=request.unit_id,
            table=request.table,
            address=request.address,
            count=request.count,
            reason=reason,
            exception_code=code,
            exception=exception_name(code),
            signals=[slot.signal for slot in request.slots],
        )

    @staticmethod
    def _bad(request: ReadRequest) -> list[RawSample]:
        now = datetime.now(UTC)
        return [RawSample(slot.signal, None, now, "bad") for slot in request.slots]

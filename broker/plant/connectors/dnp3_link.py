"""One TCP session of the DNP3 connector with its outstation: requests out, responses in.

Owns the link channel (`dnp3_frames.Channel`), the application sequence and the byte
budget of one request; the connector (`dnp3.py`) owns the scans and the point table. It
sends only what `dnp3_objects` encodes, READ and CONFIRM, and confirms only what the
protocol requires of a master: a solicited fragment that asks for it (CON set), a null
unsolicited response (the 4 header bytes, no object: it carries no event and enables
nothing, and an outstation holds its answers until it is confirmed or its confirm timeout
ends), and an unsolicited response with objects only when the connector takes it
(`unsolicited: true`). It never confirms an unsolicited response with objects the policy
does not take: that CONFIRM would delete events from the outstation's buffer.

One request is outstanding at a time; a response is matched to it by the application
sequence number. Whatever does not line up (another sequence, a frame that `dnp3_frames`
refuses, a response that does not finish within `MAX_FRAGMENTS` fragments, more than
`MAX_BYTES_PER_REQUEST` received while waiting for one) is a DeviceError: the connection can
no longer be trusted to pair requests and answers. Bytes are read only while a request waits,
and the task yields to the event loop after every chunk, so a flood costs this device a
timeout, never the other devices their scan rate nor memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Final

from broker.errors import DeviceError
from broker.plant.connectors.base import raise_if_cancelled
from broker.plant.connectors.dnp3_frames import Channel, FrameError
from broker.plant.connectors.dnp3_objects import (
    Header,
    Response,
    confirm,
    parse_response,
    read_request,
)
from broker.policy import Dnp3Device

MAX_FRAGMENTS: Final = 32  # fragments of one response; a longer one never finishes
MAX_BYTES_PER_REQUEST: Final = 128 * 1024  # received while waiting for one response
NULL_RESPONSE: Final = 4  # bytes of a response with no object header: control, function, IIN
_CHUNK = 4096


class Link:
    """One TCP connection to the outstation: the link channel, the application sequence,
    one request at a time. `take_unsolicited` is asked about each unsolicited response
    with objects: True when the policy takes it (it is then confirmed)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        device: Dnp3Device,
        take_unsolicited: Callable[[Response], bool],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._take_unsolicited = take_unsolicited
        self._channel = Channel(device.master_address, device.outstation_address)
        self._timeout = device.timeout_s
        self._seq = 0
        self._apdus: list[bytes] = []  # received, not yet looked at (one chunk's worth)
        self._budget = 0

    def close(self) -> None:
        self._writer.close()

    async def ask(self, headers: Sequence[Header]) -> list[Response]:
        """READ these headers; the response's fragments, confirmed where they ask for it."""
        seq, self._seq = self._seq, (self._seq + 1) & 0x0F
        self._budget = MAX_BYTES_PER_REQUEST
        await self._send(self._channel.request(read_request(seq, headers)))
        fragments: list[Response] = []
        while len(fragments) < MAX_FRAGMENTS:
            # Each fragment within timeout_s, whatever comes between (unsolicited, link frames).
            deadline = asyncio.get_running_loop().time() + self._timeout
            response = await self._next_response(deadline)
            if response.seq != seq or response.first != (not fragments):
                raise DeviceError(
                    f"answered with sequence {response.seq} "
                    f"({'first' if response.first else 'not first'} fragment) "
                    f"where sequence {seq} was due"
                )
            fragments.append(response)
            if response.confirm:
                await self._send(self._channel.request(confirm(seq, unsolicited=False)))
            if response.final:
                return fragments
            seq = (seq + 1) & 0x0F  # the next fragment of a response takes the next sequence
        raise DeviceError(f"a response that did not finish within {MAX_FRAGMENTS} fragments")

    async def _next_response(self, deadline: float) -> Response:
        """The next solicited response; unsolicited ones are taken or ignored on the way."""
        while True:
            apdu = await self._next_apdu(deadline)
            try:
                response = parse_response(apdu)
            except FrameError as e:
                raise DeviceError(f"a response that cannot be read: {e}") from e
            if not response.unsolicited:
                return response
            # Null: confirmed whatever the policy (no object header: not "no points", since
            # g51/g52/g80 are passed over without a point); with objects: only when taken.
            null = len(apdu) == NULL_RESPONSE
            if response.confirm and (null or self._take_unsolicited(response)):
                await self._send(self._channel.request(confirm(response.seq, unsolicited=True)))

    async def _next_apdu(self, deadline: float) -> bytes:
        while not self._apdus:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await self._reader.read(_CHUNK)
            except TimeoutError as e:
                raise DeviceError(
                    f"no answer within {self._timeout} s: if this lasts, check that the "
                    "outstation's link addresses are the policy's outstation_address and "
                    "master_address (it does not answer frames addressed otherwise)"
                ) from e
            except OSError as e:
                raise DeviceError(f"connection lost: {e}") from e
            raise_if_cancelled()
            if not chunk:
                raise DeviceError("the outstation closed the connection")
            self._budget -= len(chunk)
            if self._budget < 0:
                raise DeviceError(
                    f"more than {MAX_BYTES_PER_REQUEST} bytes while waiting for one response "
                    "(a flood of link frames or unsolicited responses)"
                )
            try:
                self._apdus = self._channel.receive(chunk)
            except FrameError as e:
                raise DeviceError(f"a frame that is not DNP3: {e}") from e
            if owed := self._channel.replies():
                await self._send(owed)
            await asyncio.sleep(0)  # a flood shares the loop with the other devices
        return self._apdus.pop(0)

    async def _send(self, frames: bytes) -> None:
        try:
            self._writer.write(frames)
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()
        except TimeoutError as e:
            raise DeviceError(f"the outstation took no request within {self._timeout} s") from e
        except OSError as e:
            raise DeviceError(f"connection lost: {e}") from e
        raise_if_cancelled()

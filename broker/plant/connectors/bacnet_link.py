"""BACnet/IP requests and answers over one connected UDP socket, for the BACnet connector.

Responsible for the socket and for matching answers to requests. The socket is connected to
the device's (host, port), so the kernel drops datagrams from any other address; every
session of a connector binds the same local port (when it is still free), because a device
keys COV subscriptions on the subscriber's address: a new session then renews the old
entry instead of adding one. One confirmed request is outstanding at a time, each with a
fresh random invoke id; only the answer that matches it is taken: its invoke id, its APDU
type (a Complex-ACK for a read, a Simple-ACK for a subscription), its service and, through
the caller's `matches`, its object and property. A second answer for the invoke id just
answered (what a spoofer racing the device produces, or a duplicated datagram) is dropped
and logged once per session.

It screens each datagram by its headers (`bacnet_frames.peek`, a few octets) before
bacpypes3 decodes it: over-long datagrams are dropped on arrival, anything that answers no
outstanding request is dropped undecoded, and it yields to the event loop between decodes,
so a flood from the device's address cannot stall the other devices' connectors. COV
notifications are decoded only while the connector holds subscriptions, and handed to it.

It must never answer what it receives (a request that reaches the socket is dropped), never
serve a device object (there is no bacpypes3 Application here), and never hand on a
datagram that does not match as an answer.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, Final, cast

from bacpypes3.apdu import (
    APDU,
    AbortPDU,
    AbortReason,
    ConfirmedServiceChoice,
    ErrorPDU,
    RejectPDU,
    RejectReason,
    UnconfirmedServiceChoice,
)
from structlog.typing import FilteringBoundLogger

from broker.errors import DeviceError
from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors.bacnet_frames import FrameError
from broker.plant.connectors.base import Pace, raise_if_cancelled
from broker.policy import BacnetDevice

INBOX: Final = 64  # datagrams held between two reads of the socket; a flood beyond is dropped
YIELD_EVERY: Final = 16  # datagrams dropped undecoded between two yields to the event loop
_COV_NOTIFICATION = int(UnconfirmedServiceChoice("unconfirmedCOVNotification"))
_SIMPLE_ACK, _COMPLEX_ACK, _ERROR = 2, 3, 5
_ANSWERS = frozenset({_SIMPLE_ACK, _COMPLEX_ACK, _ERROR, 6, 7})  # 6 reject, 7 abort
# refusals that mean "the answer would not fit": the request is split and sent again
_TOO_BIG_ABORTS = frozenset(
    int(AbortReason(r)) for r in ("bufferOverflow", "segmentationNotSupported", "apduTooLong")
)
_TOO_BIG_REJECTS = frozenset({int(RejectReason("bufferOverflow"))})


# A request that met no answer is sent again this many times, with the same invoke id (a
# retransmission, as BACnet's Number_Of_APDU_Retries), before the session is given up: one
# datagram lost on the OT network must not take every signal of the device `bad`.
APDU_RETRIES = 1


class _NoAnswer(DeviceError):
    """Nothing answered the request within timeout_s."""


class Refused(Exception):
    """The device answered a request with an error, a reject or an abort; `too_big` when it
    said the answer would not fit its APDU."""

    def __init__(self, words: str, *, too_big: bool = False) -> None:
        super().__init__(words)
        self.too_big = too_big


class _Link(asyncio.DatagramProtocol):
    """The connected socket's receiving end: a bounded inbox, and the error that ended it."""

    def __init__(self) -> None:
        self.inbox: deque[bytes] = deque()
        self.flooded = 0  # datagrams dropped because the inbox was full
        self.oversized = 0  # datagrams dropped for their length, undecoded
        self.arrived = asyncio.Event()
        self.error: Exception | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if len(data) > frames.MAX_DATAGRAM:
            self.oversized += 1  # not BACnet/IP: never queued, never decoded
            return
        if len(self.inbox) >= INBOX:
            self.flooded += 1
        else:
            self.inbox.append(data)
        self.arrived.set()

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        self.error = exc
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc or ConnectionError("socket closed")
        self.arrived.set()


class BacnetLink:
    """A connector's socket to its device, across sessions, and its one outstanding request."""

    def __init__(
        self,
        device: BacnetDevice,
        log: FilteringBoundLogger,
        on_notification: Callable[[APDU], bool],
    ) -> None:
        self._device = device
        self._log = log
        self._on_notification = on_notification  # False: not one of ours
        self.notifications = False  # decode COV notifications (the connector subscribed)
        self.stray = 0  # datagrams that answered no outstanding request: dropped
        self.malformed = 0  # datagrams that were not BACnet/IP for us: dropped
        self.duplicates = 0  # second answers to a request already answered: dropped
        self.requests = 0  # requests sent (a budget check for the tests and the bench)
        self.local_address: tuple[str, int] | None = None  # kept across sessions
        self.closing = False  # sending cancellations while the task stops: no cancel checks
        self._pace = Pace(device.max_requests_per_s)
        self._link: _Link | None = None
        self._invoke = 255  # the first request's id: 0 .. 254
        self._answered: int | None = None  # the invoke id of the last answer taken
        self._duplicate_logged = False
        self._last_drop = ""

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """The socket for one session, bound to the previous session's local port if free."""
        device, loop = self._device, asyncio.get_running_loop()
        remote = (device.host, device.port)
        try:
            try:
                _, link = await loop.create_datagram_endpoint(
                    _Link, remote_addr=remote, local_addr=self.local_address
                )
            except OSError:
                if self.local_address is None:
                    raise
                # the port was taken meanwhile, or the address left: a new port (the old
                # port's subscriptions were cancelled at its session's end, or lapse)
                _, link = await loop.create_datagram_endpoint(_Link, remote_addr=remote)
        except OSError as e:
            raise DeviceError(f"cannot open a UDP socket to {device.address}: {e}") from e
        transport = link.transport
        self.local_address = transport.get_extra_info("sockname") if transport else None
        self._link, self._answered, self._duplicate_logged = link, None, False
        try:
            raise_if_cancelled()
            yield
        finally:
            self._link = None
            if link.transport is not None:
                link.transport.close()

    def _checked(self) -> _Link:
        link = self._link
        if link is None or link.transport is None:
            raise DeviceError(f"{self._device.address}: no session")
        if link.error is not None:
            raise DeviceError(f"{self._device.address}: {link.error}")
        return link

    async def confirmed(
        self,
        service: str,
        build: Callable[[int], bytes],
        matches: Callable[[Any], bool] | None = None,
        *,
        deadline: float | None = None,
    ) -> Any:
        """The device's answer to one confirmed request (`matches` checks a Complex-ACK's
        content); `Refused` for an error, a reject or an abort, DeviceError when no
        matching answer comes within timeout_s (or by `deadline`, loop time)."""
        await self._pace.wait()
        if not self.closing:
            raise_if_cancelled()
        link = self._checked()
        invoke = secrets.randbelow(255)
        invoke += invoke >= self._invoke  # never the previous one: a late answer is not ours
        self._invoke = invoke
        request = build(invoke)
        expect = _SIMPLE_ACK if service == "subscribeCOV" else _COMPLEX_ACK
        loop = asyncio.get_running_loop()
        for retries_left in range(APDU_RETRIES, -1, -1):
            assert link.transport is not None
            link.transport.sendto(request)
            self.requests += 1
            end = loop.time() + self._device.timeout_s
            try:
                answer = await self._receive(
                    link,
                    lambda head: self._ours(
                        head, invoke, int(ConfirmedServiceChoice(service)), expect
                    ),
                    matches,
                    service,
                    end if deadline is None else min(end, deadline),
                )
                break
            except _NoAnswer:
                if not retries_left or (deadline is not None and loop.time() >= deadline):
                    raise
            await self._pace.wait()
            if not self.closing:
                raise_if_cancelled()
            link = self._checked()
        self._answered = invoke
        if isinstance(answer, ErrorPDU):
            error = f"{getattr(answer, 'errorClass', '?')}: {getattr(answer, 'errorCode', '?')}"
            raise Refused(f"error {error}")
        if isinstance(answer, RejectPDU):
            reason = answer.apduAbortRejectReason
            raise Refused(f"reject {reason}", too_big=int(reason) in _TOO_BIG_REJECTS)
        if isinstance(answer, AbortPDU):
            reason = answer.apduAbortRejectReason
            raise Refused(f"abort {reason}", too_big=int(reason) in _TOO_BIG_ABORTS)
        return answer

    def _ours(self, head: frames.Peek, invoke: int, service: int, expect: int) -> str | None:
        """None when the headers answer the outstanding request; else why not."""
        if head.kind not in _ANSWERS:
            return f"an APDU of type {head.kind} that answers no request"
        if head.invoke_id != invoke:
            if head.invoke_id == self._answered:
                return "duplicate"
            return f"an answer for invoke id {head.invoke_id}, not {invoke}"
        if head.kind in (_SIMPLE_ACK, _COMPLEX_ACK) and head.kind != expect:
            return f"a {'Simple' if head.kind == _SIMPLE_ACK else 'Complex'}-ACK to a request"
        if head.kind in (_SIMPLE_ACK, _COMPLEX_ACK, _ERROR) and head.service != service:
            return f"an answer for service {head.service}, not {service}"
        return None

    def _between(self, head: frames.Peek) -> str:
        """Why a datagram that arrived with no request outstanding is dropped."""
        if head.kind in _ANSWERS and head.invoke_id == self._answered:
            return "duplicate"
        return f"an APDU of type {head.kind} while no request was outstanding"

    async def wait(self, timeout_s: float) -> None:
        """Until a datagram arrives or `timeout_s` passes; notifications are then taken, the
        rest dropped (between scans: nothing is outstanding)."""
        link = self._checked()
        if not link.inbox:
            link.arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(link.arrived.wait(), timeout_s)
            raise_if_cancelled()
        loop = asyncio.get_running_loop()
        await self._drain(link, self._between, None, loop.time() + timeout_s)
        self._checked()

    async def _receive(
        self,
        link: _Link,
        ours: Callable[[frames.Peek], str | None],
        matches: Callable[[Any], bool] | None,
        what: str,
        deadline: float,
    ) -> Any:
        loop = asyncio.get_running_loop()
        flooded = link.flooded
        while True:
            answer = await self._drain(link, ours, matches, deadline)
            if answer is not None:
                return answer
            if link.error is not None:
                raise DeviceError(f"{self._device.address}: {link.error}")
            left = deadline - loop.time()
            if left <= 0:
                dropped = link.flooded - flooded
                detail = f"; dropped: the last {self._last_drop}" if self._last_drop else ""
                if dropped:
                    detail += f"; {dropped} datagrams over the inbox limit"
                raise _NoAnswer(
                    f"{self._device.address}: no answer to {what} within "
                    f"{self._device.timeout_s:g} s, {APDU_RETRIES + 1} times{detail}"
                )
            link.arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(link.arrived.wait(), left)
            if not self.closing:
                raise_if_cancelled()

    async def _drain(
        self,
        link: _Link,
        ours: Callable[[frames.Peek], str | None],
        matches: Callable[[Any], bool] | None,
        deadline: float,
    ) -> Any:
        """The first datagram of the inbox that answers (None when none does); the others
        are screened, notifications taken, the rest counted and dropped."""
        loop = asyncio.get_running_loop()
        cheap = 0
        self.malformed += link.oversized
        if link.oversized:
            self._last_drop = f"{link.oversized} datagrams over {frames.MAX_DATAGRAM} octets"
            link.oversized = 0
        while link.inbox and loop.time() <= deadline:  # a flood must not hold us past it
            datagram = link.inbox.popleft()
            try:
                head = frames.peek(datagram)
            except FrameError as e:
                self._dropped("malformed", str(e))
                cheap += 1
            else:
                why = ours(head)
                if why is None or self._notification(head):
                    answer = self._decoded(datagram, head, matches, why is None)
                    await asyncio.sleep(0)  # one decode at a time: the other devices run
                    if answer is not None:
                        return answer
                    continue
                if why == "duplicate":
                    self._duplicate(head)
                else:
                    self._dropped("stray", why)
                cheap += 1
            if cheap % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        return None

    def _notification(self, head: frames.Peek) -> bool:
        return self.notifications and head.kind == 1 and head.service == _COV_NOTIFICATION

    def _decoded(
        self,
        datagram: bytes,
        head: frames.Peek,
        matches: Callable[[Any], bool] | None,
        answer: bool,
    ) -> Any:
        try:
            apdu = frames.parse(datagram)
        except FrameError as e:
            self._dropped("malformed", str(e))
            return None
        if not answer:
            if not self._on_notification(apdu):
                self._dropped("stray", "a COV notification not of our subscriptions")
            return None
        if head.kind == _COMPLEX_ACK and matches is not None and not _safe(matches, apdu):
            self._dropped("stray", f"a {type(apdu).__name__} for another object or property")
            return None
        return apdu

    def _dropped(self, counter: str, why: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        self._last_drop = why

    def _duplicate(self, head: frames.Peek) -> None:
        self.duplicates += 1
        self._last_drop = f"a second answer for invoke id {head.invoke_id}"
        if not self._duplicate_logged:  # once per session: a spoofer must not flood the log
            self._duplicate_logged = True
            self._log.warning(
                "device_answer_duplicated",
                invoke_id=head.invoke_id,
                apdu_type=head.kind,
                detail="a second answer to a request already answered: dropped; "
                "a host on the OT network may be spoofing the device's address",
            )


def _safe(matches: Callable[[Any], bool], apdu: Any) -> bool:
    """`matches` on the device's decoded bytes: a misshapen ACK does not match, never crashes."""
    try:
        return matches(apdu)
    except (AttributeError, TypeError, IndexError, ValueError):
        return False

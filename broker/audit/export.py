"""Audit entries to a SIEM: RFC 5424 syslog messages over TLS (RFC 5425), mutual TLS.

Run by the enterprise half (the IT side, where the collector is), which reads every writer's
segments read-only, as it reads the spool. Octet-counted framing; each message carries the
entry's writer, seq and hash as structured data and the entry itself as the message.

Delivery is at least once. Syslog over TLS has no acknowledgement, so a batch counts as
delivered only once the connection has stayed up `CONFIRM_S` after it was written; only
then does the persisted cursor move past it. After a collector outage (or a restart)
sending resumes in order from the cursor, and the last few seconds before the outage are sent
again (their seq and hash tell the duplicates apart). Reconnects back off, and each outage is
logged once, however often the collector refuses or drops us meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path
from typing import Any

import msgspec
import structlog

from broker.audit.segments import SUFFIX, segment_numbers
from broker.backoff import Backoff
from broker.errors import ChannelError

SD_ID = "dmzbroker@32473"  # 32473: the enterprise number RFC 5612 reserves for examples
FACILITY = 13  # log audit
SEVERITY = {"failure": 4, "unknown": 5, "success": 6}  # warning, notice, informational
BATCH = 500  # entries per write
IDLE_S = 0.5  # how often a caught-up exporter looks for new entries
BACKOFF_FIRST_S = 1.0  # the first wait after a refused or lost connection, doubling …
BACKOFF_MAX_S = 30.0  # … up to this
STABLE_S = 10.0  # a connection that lasted this long ends an episode of failures
CONFIRM_S = 2.0  # a batch is taken as received once the connection outlives it this long
CURSOR_FILE = "siem-cursor.json"

log = structlog.get_logger("siem")


class Cursor(msgspec.Struct):
    segment: int = 0
    offset: int = 0


def frame(entry: dict[str, Any], line: bytes, hostname: str) -> bytes:
    """One octet-counted RFC 5424 message for an entry (whose JSON line is the message)."""
    pri = FACILITY * 8 + SEVERITY.get(str(entry.get("outcome")), 5)
    sd = '[{} writer="{}" seq="{}" hash="{}" outcome="{}"]'.format(
        SD_ID,
        *(_sd_value(entry.get(k)) for k in ("writer", "seq", "hash", "outcome")),
    )
    msgid = str(entry.get("event", "-"))[:32] or "-"
    header = f"<{pri}>1 {entry.get('time', '-')} {hostname} dmzbroker {entry.get('writer', '-')} {msgid} {sd} "
    message = header.encode() + line
    return b"%d %b" % (len(message), message)


def _fields(line: bytes) -> dict[str, Any]:
    """The entry's fields for the header; a damaged line is still sent, with "-" fields."""
    try:
        fields = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _sd_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


class SiemExporter:
    def __init__(
        self,
        audit_dir: Path,
        state_dir: Path,
        address: tuple[str, int],
        context: ssl.SSLContext,
        *,
        server_name: str,
        hostname: str,
    ) -> None:
        self._audit_dir = audit_dir
        self._cursor_file = state_dir / CURSOR_FILE
        self._address = address
        self._context = context
        self._server_name = server_name
        self._hostname = hostname
        self._confirmed = self._load_cursors()  # persisted: what the collector surely has

    async def run(self) -> None:
        """Connect, send, and after a refused or lost connection wait before the next try:
        exponential backoff with jitter, capped at `BACKOFF_MAX_S`, started afresh only
        after a connection that stayed up `STABLE_S`. Each episode of failures is logged
        once (its first failure, then the first connection in it); the rest are counted."""
        where = f"{self._address[0]}:{self._address[1]}"
        loop = asyncio.get_running_loop()
        # Jitter keeps many appliances from reconnecting in step after the collector restarts.
        backoff = Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S, fresh_after_s=STABLE_S, jitter=(0.5, 1))
        failures = 0  # in this episode: connections refused, or lost before STABLE_S
        announced = False  # siem_connected logged in this episode
        while True:
            ran_s = 0.0  # how long the connection stayed up
            try:
                reader, writer = await asyncio.open_connection(
                    *self._address, ssl=self._context, server_hostname=self._server_name
                )
            except (OSError, ssl.SSLError) as e:
                if not failures:
                    log.warning("siem_unreachable", address=where, error=str(e))
                failures += 1
            else:
                if not announced:
                    log.info("siem_connected", address=where, failures=failures)
                    announced = True
                started = loop.time()
                error = await self._send(reader, writer)
                ran_s = loop.time() - started
                if ran_s >= STABLE_S:
                    failures = 0  # it worked: a new episode begins
                if not failures:
                    log.warning("siem_connection_lost", address=where, error=error)
                    announced = False
                failures += 1
            # A collector that accepts and drops at once must not be hammered (nor our audit
            # log filled with the attempts).
            await asyncio.sleep(backoff.after(ran_s))

    async def _send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Send until the connection ends; why it ended."""
        try:
            await self._send_until_closed(reader, writer)
        except (OSError, ssl.SSLError) as e:
            return str(e) or type(e).__name__
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return "the connection ended"

    async def _send_until_closed(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Send from the confirmed cursors on; returns or raises when the connection ends."""
        sending = dict(self._confirmed)  # where this connection has got to
        unconfirmed: list[tuple[float, str, Cursor]] = []
        closed = asyncio.ensure_future(reader.read(1))  # the collector never talks: EOF or error
        loop = asyncio.get_running_loop()
        try:
            while not closed.done():
                sent_any = False
                for name in self._writers():
                    frames, cursor = self._next_batch(name, sending.get(name, Cursor()))
                    if frames:
                        writer.write(b"".join(frames))
                        await writer.drain()
                        sending[name] = cursor
                        unconfirmed.append((loop.time(), name, cursor))
                        sent_any = True
                self._confirm(unconfirmed, loop.time() - CONFIRM_S)
                if not sent_any:
                    await asyncio.wait([closed], timeout=IDLE_S)
        finally:
            closed.cancel()
        raise ConnectionResetError("the collector closed the connection")

    def _confirm(self, unconfirmed: list[tuple[float, str, Cursor]], before: float) -> None:
        confirmed = [entry for entry in unconfirmed if entry[0] <= before]
        if confirmed:
            for _, name, cursor in confirmed:
                self._confirmed[name] = cursor
            del unconfirmed[: len(confirmed)]
            self._save_cursors()

    def _writers(self) -> list[str]:
        try:
            return sorted(p.name for p in self._audit_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def _next_batch(self, name: str, cursor: Cursor) -> tuple[list[bytes], Cursor]:
        """Frames for the next whole lines after `cursor`, and the cursor after them."""
        directory = self._audit_dir / name
        numbers = [n for n in segment_numbers(directory) if n >= cursor.segment]
        for number in numbers:
            offset = cursor.offset if number == cursor.segment else 0
            with open(directory / f"{number:010d}{SUFFIX}", "rb") as f:
                f.seek(offset)
                data = f.read(BATCH * 2048)
            end = data.rfind(b"\n") + 1
            lines = data[:end].split(b"\n")[:-1][:BATCH]
            if lines:
                used = sum(len(line) + 1 for line in lines)
                frames = [frame(_fields(line), line, self._hostname) for line in lines]
                return frames, Cursor(number, offset + used)
            # Nothing whole here: a newer segment means this one is final (a cut-off line
            # after a crash is not sent); otherwise wait for more.
            if number == numbers[-1]:
                break
        return [], cursor

    def _load_cursors(self) -> dict[str, Cursor]:
        try:
            return msgspec.json.decode(self._cursor_file.read_bytes(), type=dict[str, Cursor])
        except FileNotFoundError:
            return {}
        except (OSError, msgspec.DecodeError) as e:
            raise ChannelError(
                f"{self._cursor_file}: unreadable SIEM export cursor ({e}); delete it to send "
                "the whole audit log again"
            ) from e

    def _save_cursors(self) -> None:
        tmp = self._cursor_file.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(self._confirmed))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._cursor_file)

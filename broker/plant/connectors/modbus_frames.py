"""Whether a Modbus response is a well-formed answer to the read that asked for it.

pymodbus skips frames with another transaction or unit id but takes id 0 for any, and
checks neither the function code nor the number of items; a frame it cannot decode it
raises inside the transport, where asyncio logs a traceback and drops the connection. So
the connector (`modbus.py`) decodes with `ResponseDecoder`, which turns every frame into a
PDU, and checks each answer against its request here: `mismatch` says why a frame does not
answer the request at all (the connection no longer lines requests and answers up), and
`refusal` why a well-formed answer gives no data (an exception, or not the items asked for).

Pure functions of the bytes and the request: this module never touches a connection and
never takes a frame it cannot check as data.
"""

from __future__ import annotations

from pymodbus.constants import ExcCodes
from pymodbus.pdu import DecodePDU, ModbusPDU

from broker.plant.connectors.modbus_plan import READ_FUNCTIONS, ReadRequest
from broker.policy.schema import BIT_TABLES

_READ_CODES = frozenset(code for code, _, _ in READ_FUNCTIONS.values())
_REGISTER_CODES = frozenset(
    code for table, (code, _, _) in READ_FUNCTIONS.items() if table not in BIT_TABLES
)


class Unreadable(ModbusPDU):
    """A frame that is no well-formed answer to a read; `problem` says why, for the log."""

    def __init__(self, problem: str) -> None:
        super().__init__()
        self.problem = problem


def malformed(frame: bytes) -> str | None:
    """Why a response PDU (function code onwards) is no well-formed answer to a read."""
    code = frame[0]
    if code & 0x80:
        return None if len(frame) == 2 and code != 0x80 else f"an exception of {len(frame)} bytes"
    if code not in _READ_CODES:
        return f"function code {code}, which answers no read"
    if len(frame) < 2 or frame[1] != len(frame) - 2:
        return "a byte count that disagrees with the frame's length"
    if code in _REGISTER_CODES and frame[1] % 2:
        return f"an odd byte count ({frame[1]}) for registers"
    return None


class ResponseDecoder(DecodePDU):
    """Decodes well-formed read answers and exception responses, and nothing else.

    Every frame gives a PDU: where pymodbus's decoder gives None (which its framer raises
    from inside the transport's data_received), this gives an `Unreadable` that the
    connector refuses as data.
    """

    def __init__(self) -> None:
        super().__init__(is_server=False)

    def decode(self, frame: bytes) -> ModbusPDU | None:
        problem = malformed(frame)
        pdu = None if problem else super().decode(frame)
        return Unreadable(problem or "an undecodable frame") if pdu is None else pdu


def mismatch(response: ModbusPDU, request: ReadRequest, tid: int) -> str | None:
    """Why `response` is not the answer to `request`, sent with transaction id `tid`."""
    if isinstance(response, Unreadable):
        return response.problem
    if response.transaction_id != tid:
        return f"transaction id {response.transaction_id}, not {tid}"
    if response.dev_id != request.unit_id:
        return f"unit id {response.dev_id}"
    if response.function_code & 0x7F != request.function_code:
        return f"function code {response.function_code}"
    return None


def refusal(response: ModbusPDU, request: ReadRequest) -> str | None:
    """Why an answer to `request` gives no data: an exception, or not the items asked for."""
    if response.isError():
        return "exception_response"
    bits = request.table in BIT_TABLES
    items = len(response.bits) if bits else len(response.registers)
    asked = -(-request.count // 8) * 8 if bits else request.count  # bits come in whole bytes
    if items == asked:
        return None
    return "short_response" if items < asked else "long_response"


def exception_name(code: int | None) -> str | None:
    """The Modbus name of an exception code (`illegal_address`), for people reading the log."""
    if code is None:
        return None
    try:
        return ExcCodes(code).name.lower()
    except ValueError:
        return f"code_{code}"

"""What each point of a capture probably is: its type, word order, kind and scale, with how
sure the guess is and the evidence, for the draft policy (docs/discovery.md).

Skeleton (the API other parts build on); the inference itself follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.passive.observations import Description, Peer, Protocol, Value, Values, Warnings

Kind = Literal["measurement", "bool", "constant", "counter", "setpoint", "state"]


@dataclass(frozen=True)
class Guess:
    """One point the draft proposes as a signal (a 32-bit pair is one Guess, width 2)."""

    protocol: Protocol
    server: Peer
    unit: int
    table: str
    address: int
    type: str  # a policy DataType
    word_order: Literal["big", "little"] | None  # 32-bit Modbus types only
    width: int  # registers it takes (1 or 2; 1 for non-Modbus)
    kind: Kind
    confidence: float  # 0..1
    evidence: str  # "float32, words big-endian, 0.2 % noise, 1,204 samples"
    scale: float | None  # suggested (0.1 when an int16 reads like tenths), else None
    minimum: Value | None
    maximum: Value | None
    samples: int
    written: bool  # written by the SCADA
    changes_with: tuple[int, ...]  # addresses (same server, unit, table) changing at once
    name: str | None = None
    units: str | None = None
    description: str | None = None


class Inference:
    def __init__(self, warnings: Warnings | None = None) -> None:
        self._warnings = warnings if warnings is not None else Warnings()
        self._last: dict[tuple[Protocol, Peer, int, str, int], tuple[Value, int, bool]] = {}

    def add(self, observation: Values | Description) -> None:
        if isinstance(observation, Description):
            return
        o = observation
        for i, v in enumerate(o.values):
            key = (o.protocol, o.server, o.unit, o.table, o.start + i)
            _, n, written = self._last.get(key, (v, 0, False))
            self._last[key] = (v, n + 1, written or o.written)

    def guesses(self) -> list[Guess]:
        return [
            Guess(
                protocol=k[0],
                server=k[1],
                unit=k[2],
                table=k[3],
                address=k[4],
                type="bool" if isinstance(v, bool) else "uint16",
                word_order=None,
                width=1,
                kind="setpoint" if w else "measurement",
                confidence=0.1,
                evidence="skeleton",
                scale=None,
                minimum=v,
                maximum=v,
                samples=n,
                written=w,
                changes_with=(),
            )
            for k, (v, n, w) in sorted(self._last.items())
        ]

"""The policy's typed schema: devices, the signals of the semantic model, and assets.

Checks that concern one field live here (ranges, patterns, combinations inside one signal);
checks across the document (references, duplicates) live in `load.py`. Unknown keys are
refused everywhere (ADR 0002). Nothing here touches the network or the file system.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

_SEGMENT = r"[a-z0-9][a-z0-9_-]{0,62}"
_NAME = re.compile(_SEGMENT)
_ASSET_PATH = re.compile(f"{_SEGMENT}(/{_SEGMENT}){{0,6}}")
_SIGNAL_PATH = re.compile(f"{_SEGMENT}(/{_SEGMENT}){{1,7}}")  # an asset path + the measure
_PATTERN = re.compile(r"([a-z0-9][a-z0-9_-]*|\*\*?)(/([a-z0-9][a-z0-9_-]*|\*\*?))*")
_IDENTITY = re.compile(r"[a-z][a-z0-9+.-]*://[^\s]+")
_SPELLING = "lowercase letters, digits, '-' and '_'"


def _check_name(field: str, value: str, pattern: re.Pattern[str], shape: str) -> None:
    if not pattern.fullmatch(value):
        raise ValueError(f"{field} {value!r}: must be {shape} of {_SPELLING}")


Seconds = Annotated[float, Meta(ge=0.05, le=86_400)]

ModbusTable = Literal["coil", "discrete_input", "holding_register", "input_register"]
DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32"]
BIT_TABLES = frozenset({"coil", "discrete_input"})
REGISTER_WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Device(_Strict, frozen=True):
    name: str
    protocol: Literal["modbus"]
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Meta(ge=0, le=255)] = 1
    poll_interval_s: Seconds = 1.0
    timeout_s: Seconds = 1.0

    def __post_init__(self) -> None:
        _check_name("name", self.name, _NAME, "one word")


class ModbusSource(_Strict, frozen=True):
    table: ModbusTable
    address: Annotated[int, Meta(ge=0, le=65535)]
    type: DataType
    word_order: Literal["big", "little"] | None = None  # 32-bit types; default big: high word first

    def __post_init__(self) -> None:
        if (self.table in BIT_TABLES) != (self.type == "bool"):
            raise ValueError(
                f"type {self.type!r} does not fit table {self.table!r}: coils and discrete "
                "inputs are 'bool', registers are a numeric type"
            )
        if self.word_order is not None and self.width == 1:
            raise ValueError(f"word_order does not apply to a one-register {self.type}")
        if self.address + self.width > 65536:
            raise ValueError(f"a {self.type} at address {self.address} runs past 65535")

    @property
    def width(self) -> int:
        """Registers (or bits) this source occupies."""
        return REGISTER_WIDTH.get(self.type, 1)


class Signal(_Strict, frozen=True):
    path: str  # site/area/asset/measure: the name consumers see
    device: str
    source: ModbusSource
    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("path", self.path, _SIGNAL_PATH, "2 to 8 segments separated by '/'")
        if self.source.type == "bool" and (self.scale, self.offset) != (1.0, 0.0):
            raise ValueError("scale and offset do not apply to a bool signal")
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)):
            raise ValueError("scale and offset must be finite numbers")

    @property
    def asset(self) -> str:
        return self.path.rpartition("/")[0]


class Asset(_Strict, frozen=True):
    path: str
    state_signal: str | None = None  # truthy → running, falsy → stopped

    def __post_init__(self) -> None:
        _check_name("path", self.path, _ASSET_PATH, "1 to 7 segments separated by '/'")


class AccessRole(_Strict, frozen=True):
    """What a role of enterprise consumers may see: signal path patterns.

    A pattern is a signal path in which `*` stands for one path segment and `**` for any
    number of them (casbin's globMatch): `coldstore/machine-room/*/motor_power` is the motor
    power of every asset in that area, `coldstore/**` is every signal of the site.
    """

    name: str
    signals: list[str] = []
    metrics: bool = False  # may read /metrics (the broker's own health, no plant values)

    def __post_init__(self) -> None:
        _check_name("name", self.name, _NAME, "one word")
        if not self.signals and not self.metrics:
            raise ValueError(f"role {self.name!r} grants nothing: give it signals or metrics")
        for pattern in self.signals:
            if not _PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"signals pattern {pattern!r}: must be a signal path of {_SPELLING}, "
                    "where a whole segment may be '*' (any one) or '**' (any number)"
                )


class Consumer(_Strict, frozen=True):
    """An enterprise consumer, named by the one URI SAN of its client certificate."""

    identity: str
    roles: Annotated[list[str], Meta(min_length=1)]

    def __post_init__(self) -> None:
        if not _IDENTITY.fullmatch(self.identity):
            raise ValueError(
                f"identity {self.identity!r}: must be a URI such as spiffe://site/consumer/name"
            )


class Policy(_Strict, frozen=True):
    deployment_id: str  # the appliance this policy is for; must equal the trust root's
    version: Annotated[int, Meta(ge=1, le=2**53 - 1)]  # never lower than one accepted here
    expires: Annotated[datetime, Meta(tz=True)]  # RFC 3339 with a zone; refused after it
    devices: Annotated[list[Device], Meta(min_length=1)]
    signals: Annotated[list[Signal], Meta(min_length=1)]
    assets: list[Asset] = []
    roles: list[AccessRole] = []
    consumers: list[Consumer] = []

    def __post_init__(self) -> None:
        _check_name("deployment_id", self.deployment_id, _NAME, "one word")

"""The policy's typed schema: devices, the signals of the semantic model, and assets.

Checks that concern one field live here (ranges, patterns, combinations inside one signal);
checks across the document (references, duplicates) live in `load.py`. Unknown keys are
refused everywhere (ADR 0002). Nothing here touches the network or the file system.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, ClassVar, Literal

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
DataType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64", "string"
]
BIT_TABLES = frozenset({"coil", "discrete_input"})
REGISTER_WIDTH = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4,
}  # fmt: skip


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ModbusDevice(_Strict, frozen=True, tag="modbus", tag_field="protocol"):
    """A Modbus TCP server (a PLC, or a gateway with several unit ids behind it).

    Its request budget: scans start at most every `poll_interval_s`, at most
    `max_requests_per_s` requests go out (unlimited when not set), over at most
    `max_connections` TCP connections.
    """

    name: str
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Meta(ge=0, le=255)] = 1  # the default for this device's signals
    poll_interval_s: Seconds = 1.0
    timeout_s: Seconds = 1.0
    max_requests_per_s: Annotated[float, Meta(gt=0, le=10_000)] | None = None
    max_connections: Annotated[int, Meta(ge=1, le=16)] = 1

    def __post_init__(self) -> None:
        _check_name("name", self.name, _NAME, "one word")

    protocol: ClassVar[str] = "modbus"  # msgspec's tag, readable in code

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


OPCUA_SECURITY_POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
OPCUA_REFUSED_POLICIES = frozenset({"Basic128Rsa15", "Basic256"})  # deprecated: SHA-1
_OPCUA_ENDPOINT = re.compile(r"opc\.tcp://[^\s/]+(/\S*)?")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class OpcUaDevice(_Strict, frozen=True, tag="opcua", tag_field="protocol"):
    """An OPC UA server, read through subscriptions (or polled Read when `read: poll`).

    SignAndEncrypt with Basic256Sha256 unless the policy says otherwise; security `None`
    only when both `security_policy` and `security_mode` say so explicitly. The server's
    certificate must be pinned here (`server_certificate_sha256`) or be in the plant's
    trust list (appliance config): never accepted because it was offered.
    """

    name: str
    endpoint: str  # opc.tcp://host:port/path
    security_policy: str = "Basic256Sha256"
    security_mode: Literal["SignAndEncrypt", "Sign", "None"] = "SignAndEncrypt"
    server_certificate_sha256: str | None = None  # hex SHA-256 of the DER certificate
    user_identity: Literal["anonymous", "username", "certificate"] = "anonymous"
    read: Literal["subscribe", "poll"] = "subscribe"
    poll_interval_s: Seconds = 1.0  # publishing interval, or the Read interval when polled
    timeout_s: Seconds = 5.0

    def __post_init__(self) -> None:
        _check_name("name", self.name, _NAME, "one word")
        if not _OPCUA_ENDPOINT.fullmatch(self.endpoint):
            raise ValueError(f"endpoint {self.endpoint!r}: must be opc.tcp://host:port[/path]")
        if self.security_policy in OPCUA_REFUSED_POLICIES:
            raise ValueError(
                f"security_policy {self.security_policy!r} is deprecated (SHA-1) and refused: "
                f"use one of {', '.join(OPCUA_SECURITY_POLICIES)}"
            )
        if self.security_policy not in (*OPCUA_SECURITY_POLICIES, "None"):
            raise ValueError(
                f"security_policy {self.security_policy!r}: must be one of "
                f"{', '.join(OPCUA_SECURITY_POLICIES)} (or None, with security_mode None)"
            )
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError(
                "security_policy None and security_mode None go together: an unsecured "
                "session must be asked for explicitly with both"
            )
        if self.server_certificate_sha256 is not None and not _SHA256_HEX.fullmatch(
            self.server_certificate_sha256
        ):
            raise ValueError("server_certificate_sha256: must be 64 lowercase hex digits")

    protocol: ClassVar[str] = "opcua"

    @property
    def address(self) -> str:
        return self.endpoint

    @property
    def unsecured(self) -> bool:
        return self.security_mode == "None"


Device = ModbusDevice | OpcUaDevice


class ModbusSource(_Strict, frozen=True, tag="modbus", tag_field="protocol"):
    """Where a Modbus signal lives: table, address, type, and how its bytes are laid out.

    `bit` picks one bit (0 = least significant) of a 16-bit register as a bool; `length` is
    the number of registers of a `string` (two ASCII characters each, NULs trimmed).
    `word_order` applies to 32- and 64-bit types (default big: high word first),
    `byte_order` to the bytes inside each register (default big, as Modbus sends them).
    """

    table: ModbusTable
    address: Annotated[int, Meta(ge=0, le=65535)]
    type: DataType
    unit_id: Annotated[int, Meta(ge=0, le=255)] | None = None  # else the device's
    word_order: Literal["big", "little"] | None = None
    byte_order: Literal["big", "little"] | None = None
    bit: Annotated[int, Meta(ge=0, le=15)] | None = None
    length: Annotated[int, Meta(ge=1, le=125)] | None = None

    def __post_init__(self) -> None:
        bit_table = self.table in BIT_TABLES
        if bit_table and (self.type != "bool" or self.bit is not None):
            raise ValueError(
                f"type {self.type!r} does not fit table {self.table!r}: coils and discrete "
                "inputs are 'bool', registers are a numeric type or a bool with 'bit'"
            )
        if not bit_table and self.type == "bool" and self.bit is None:
            raise ValueError(
                f"a bool in table {self.table!r} needs 'bit' (0-15): which bit of the register"
            )
        if (self.length is not None) != (self.type == "string"):
            raise ValueError("'length' (registers) is required for a string, and only for it")
        if self.word_order is not None and (self.width == 1 or self.type == "string"):
            raise ValueError(f"word_order does not apply to a one-register {self.type}")
        if self.byte_order is not None and bit_table:
            raise ValueError("byte_order does not apply to coils and discrete inputs")
        if self.address + self.width > 65536:
            raise ValueError(f"a {self.type} at address {self.address} runs past 65535")

    protocol: ClassVar[str] = "modbus"

    @property
    def width(self) -> int:
        """Registers (or bits) this source occupies."""
        return self.length if self.length is not None else REGISTER_WIDTH.get(self.type, 1)


_OPCUA_NODE = re.compile(r"(ns=\d{1,5};)?[isgb]=\S.*")


class Deadband(_Strict, frozen=True):
    kind: Literal["absolute", "percent"]
    value: Annotated[float, Meta(ge=0)]

    def __post_init__(self) -> None:
        if self.kind == "percent" and self.value > 100:
            raise ValueError("a percent deadband is at most 100")


class OpcUaSource(_Strict, frozen=True, tag="opcua", tag_field="protocol"):
    """An OPC UA node (`ns=2;s=Compressor1.Power`, `i=2258`) and how to monitor it.

    Without `sampling_interval_ms` the server samples at the device's publishing interval.
    """

    node: str
    sampling_interval_ms: Annotated[float, Meta(ge=0, le=3_600_000)] | None = None
    queue_size: Annotated[int, Meta(ge=1, le=1000)] = 1
    deadband: Deadband | None = None

    def __post_init__(self) -> None:
        if not _OPCUA_NODE.fullmatch(self.node):
            raise ValueError(
                f"node {self.node!r}: must be an OPC UA node id such as 'ns=2;s=Name' or 'i=2258'"
            )

    protocol: ClassVar[str] = "opcua"

    @property
    def type(self) -> str:
        return "variant"  # the value keeps the type the server gives it


Source = ModbusSource | OpcUaSource


class Signal(_Strict, frozen=True):
    path: str  # site/area/asset/measure: the name consumers see
    device: str
    source: Source  # its shape follows the device's protocol (docs/policy.md)
    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("path", self.path, _SIGNAL_PATH, "2 to 8 segments separated by '/'")
        if self.source.type in ("bool", "string") and (self.scale, self.offset) != (1.0, 0.0):
            raise ValueError(f"scale and offset do not apply to a {self.source.type} signal")
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

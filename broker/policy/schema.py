"""The policy's typed schema: the signals of the semantic model and their sources, assets,
access, and the document that holds them with its devices (`device_schema`).

Checks that concern one field live here (ranges, patterns, combinations inside one signal);
checks across the document (references, duplicates) live in `parse.py`. Unknown keys are
refused everywhere (ADR 0002). Nothing here touches the network or the file system.
"""

from __future__ import annotations

import builtins
import itertools
import math
import re
from datetime import datetime
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from broker.policy.device_schema import Device
from broker.policy.fields import NAME, SEGMENT, SPELLING, Strict, check_finite, check_name

_ASSET_PATH = re.compile(f"{SEGMENT}(/{SEGMENT}){{0,6}}")
_SIGNAL_PATH = re.compile(f"{SEGMENT}(/{SEGMENT}){{1,7}}")  # an asset path + the measure
_PATTERN = re.compile(r"([a-z0-9][a-z0-9_-]*|\*\*?)(/([a-z0-9][a-z0-9_-]*|\*\*?))*")
_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,62}")  # a name expressions can use
_IDENTITY = re.compile(r"[a-z][a-z0-9+.-]*://[^\s]+")


def written(value: float) -> str:
    """A number of the policy as a signer reads it: the shortest text that parses back to the
    same float (`0.1`, `2`, `1e-05`), never rounded, so that what is shown is what runs."""
    text = repr(float(value))
    return text.removesuffix(".0")


ModbusTable = Literal["coil", "discrete_input", "holding_register", "input_register"]
DataType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64", "string"
]
BIT_TABLES = frozenset({"coil", "discrete_input"})
REGISTER_WIDTH = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4,
}  # fmt: skip


class ModbusSource(Strict, frozen=True, tag="modbus", tag_field="protocol"):
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
        # `bit` first: a key the decoder would ignore must never reach a signer's screen.
        if bit_table and self.bit is not None:
            raise ValueError(
                f"bit: does not apply to a {self.table}, which is a single bit already "
                "(type 'bool'): leave 'bit' out"
            )
        if self.bit is not None and self.type != "bool":
            article = "an" if self.type.startswith("int") else "a"
            raise ValueError(
                f"bit: applies only to type 'bool' (one bit of a register); {article} "
                f"{self.type} is read whole: leave 'bit' out, or make the signal type 'bool'"
            )
        if bit_table and self.type != "bool":
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


class Deadband(Strict, frozen=True):
    kind: Literal["absolute", "percent"]
    value: Annotated[float, Meta(ge=0)]

    def __post_init__(self) -> None:
        check_finite("value", self.value)
        if self.kind == "percent" and self.value > 100:
            raise ValueError("a percent deadband is at most 100")


class OpcUaSource(Strict, frozen=True, tag="opcua", tag_field="protocol"):
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


class DerivedSource(Strict, frozen=True, kw_only=True, tag="derived", tag_field="protocol"):
    """A signal computed at the edge from other values of its asset (no device).

    The expression (docs/model.md) may name the asset's measures, its ambient names and
    `load`; it is checked when the policy is compiled and never run through `eval`.
    `decimals` rounds its value; without it, the precision follows from the inputs
    (broker/policy/precision.py).
    """

    expression: str
    decimals: Annotated[int, Meta(ge=0, le=12)] | None = None

    protocol: ClassVar[str] = "derived"

    @property
    def type(self) -> str:
        return "derived"


# DNP3 static object groups the broker reads, each with the variations it may ask for (0: the
# outstation's default). Events (groups 2, 4, 11, 22, 23, 32, 42) report a point of these.
DNP3_VARIATIONS: dict[int, tuple[int, ...]] = {
    1: (0, 1, 2),  # binary input
    3: (0, 1, 2),  # double-bit binary input
    10: (0, 1, 2),  # binary output status
    20: (0, 1, 2, 5, 6),  # counter
    21: (0, 1, 2, 5, 6, 9, 10),  # frozen counter
    30: (0, 1, 2, 3, 4, 5, 6),  # analog input
    40: (0, 1, 2, 3, 4),  # analog output status
}
_DNP3_TYPES = {  # (group, variation) → the value's type; a group alone for all its variations
    1: "bool", 10: "bool", 3: "string", 20: "uint32", 21: "uint32",
    (30, 1): "int32", (30, 2): "int16", (30, 3): "int32", (30, 4): "int16",
    (30, 5): "float32", (30, 6): "float64",
    (40, 1): "int32", (40, 2): "int16", (40, 3): "float32", (40, 4): "float64",
}  # fmt: skip


class Dnp3Source(Strict, frozen=True, tag="dnp3", tag_field="protocol"):
    """A DNP3 point: its static object group, variation (0: the outstation's default) and
    index. Binary inputs and output status are `bool`; a double-bit input is one of the
    words `off`, `on`, `intermediate`, `indeterminate`; counters and analogs are numbers.
    """

    group: int
    index: Annotated[int, Meta(ge=0, le=65535)]
    variation: int = 0

    def __post_init__(self) -> None:
        variations = DNP3_VARIATIONS.get(self.group)
        if variations is None:
            raise ValueError(
                f"group {self.group}: the broker reads the static groups "
                f"{', '.join(map(str, DNP3_VARIATIONS))} (events report points of these)"
            )
        if self.variation not in variations:
            raise ValueError(
                f"variation {self.variation}: group {self.group} has variations "
                f"{', '.join(map(str, variations))} (0: the outstation's default)"
            )

    protocol: ClassVar[str] = "dnp3"

    @property
    def type(self) -> str:
        found = _DNP3_TYPES.get(self.group) or _DNP3_TYPES.get((self.group, self.variation))
        return str(found) if found is not None else "variant"


BacnetObjectType = Literal[
    "analog-input", "analog-output", "analog-value", "binary-input", "binary-output",
    "binary-value", "multi-state-input", "multi-state-output", "multi-state-value", "accumulator",
]  # fmt: skip
BACNET_OBJECT_TYPES: dict[str, str] = {  # object type → the type of its present-value
    "analog-input": "float32", "analog-output": "float32", "analog-value": "float32",
    "binary-input": "bool", "binary-output": "bool", "binary-value": "bool",
    "multi-state-input": "uint32", "multi-state-output": "uint32", "multi-state-value": "uint32",
    "accumulator": "uint32",
}  # fmt: skip
_BACNET_PROPERTY = re.compile(r"[a-z][a-z0-9-]{0,62}")


class BacnetSource(Strict, frozen=True, tag="bacnet", tag_field="protocol"):
    """A BACnet object's property (`present-value` unless said otherwise), by object type
    and instance. A binary object's value is `bool`, an analog one a number, a multi-state
    one its state number (1…)."""

    object_type: BacnetObjectType
    instance: Annotated[int, Meta(ge=0, le=4_194_302)]
    property: str = "present-value"

    def __post_init__(self) -> None:
        if not _BACNET_PROPERTY.fullmatch(self.property):
            raise ValueError(
                f"property {self.property!r}: must be a BACnet property identifier such as "
                "'present-value'"
            )

    protocol: ClassVar[str] = "bacnet"

    @builtins.property  # `property` is a field here
    def type(self) -> str:
        if self.property != "present-value":
            return "variant"
        return BACNET_OBJECT_TYPES[self.object_type]


Source = ModbusSource | OpcUaSource | Dnp3Source | BacnetSource | DerivedSource


_DURATION = re.compile(r"([1-9][0-9]{0,5})([smhd])")
_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """Seconds of a duration written as `90s`, `15m`, `24h` or `7d`."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"duration {text!r}: must be a number and s, m, h or d, e.g. '15m'")
    return int(match[1]) * _DURATION_UNIT_S[match[2]]


Outcome = Literal["energy", "product_quality", "asset_life", "safety"]
Lifecycle = Literal["proposed", "approved"]


class Range(Strict, frozen=True, kw_only=True):
    """The physically valid range of a value; outside it a value is `uncertain`."""

    min: float
    max: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise ValueError(f"range: min ({self.min}) must be below max ({self.max})")


class Checks(Strict, frozen=True, kw_only=True):
    """Continuous data-quality checks of one signal; a failed check makes a value `uncertain`."""

    flatline: str | None = None  # unchanged this long is suspicious (a frozen sensor)
    max_rate_per_s: Annotated[float, Meta(gt=0)] | None = None  # a faster change is a spike
    max_noise: Annotated[float, Meta(gt=0)] | None = None  # std dev of successive changes

    def __post_init__(self) -> None:
        if self.flatline is not None:
            duration_s(self.flatline)
        for name, limit in (("max_rate_per_s", self.max_rate_per_s), ("max_noise", self.max_noise)):
            if limit is not None:
                check_finite(name, limit)


class Signal(Strict, frozen=True, kw_only=True):
    """One named value of the semantic model: what it means, its unit, where it comes from.

    `lifecycle: proposed` signals are read and validated in the plant half and never
    published; naming a signal in a co-signed policy approves it unless it says otherwise.
    """

    path: str  # site/area/asset/measure: the name consumers see
    source: Source  # its shape follows the device's protocol (docs/policy.md)
    device: str | None = None  # None only for a derived signal
    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    description: str = ""
    quantity: str = ""  # e.g. pressure, temperature, power
    range: Range | None = None
    outcomes: list[Outcome] = []  # the business outcomes this signal bears on
    lifecycle: Lifecycle = "approved"
    checks: Checks = Checks()

    def __post_init__(self) -> None:
        check_name("path", self.path, _SIGNAL_PATH, "2 to 8 segments separated by '/'")
        if (self.device is None) != isinstance(self.source, DerivedSource):
            raise ValueError(
                "a signal read from a device names its 'device'; a derived signal "
                "(source: {expression: ...}) names none"
            )
        if self.source.type in ("bool", "string") and (self.scale, self.offset) != (1.0, 0.0):
            raise ValueError(f"scale and offset do not apply to a {self.source.type} signal")
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)):
            raise ValueError("scale and offset must be finite numbers")
        if self.scale == 0:
            raise ValueError("scale: 0 would publish the offset whatever the device sends")

    @property
    def asset(self) -> str:
        return self.path.rpartition("/")[0]

    @property
    def measure(self) -> str:
        return self.path.rpartition("/")[2]


class StateRule(Strict, frozen=True, kw_only=True):
    state: str
    when: str  # an expression over the asset's values

    def __post_init__(self) -> None:
        check_name("state", self.state, NAME, "one word")


class LoadReference(Strict, frozen=True, kw_only=True):
    """The signal that measures the asset's load, and the windows of its history to carry."""

    signal: str
    windows: Annotated[list[str], Meta(min_length=1, max_length=4)] = msgspec.field(
        default_factory=lambda: ["15m", "24h"]
    )

    def __post_init__(self) -> None:
        for window in self.windows:
            duration_s(window)


class Baseline(Strict, frozen=True, kw_only=True):
    """Expected value of one measure as a piecewise-linear function of ambient and load.

    `expected[i][j]` is the value at `ambient_points[i]` and `load_points[j]` (one column
    when there are no load points); in between it is interpolated, outside it is clamped.
    """

    measure: str
    ambient: str  # a name of the asset's `ambient`
    ambient_points: Annotated[list[float], Meta(min_length=2)]
    load_points: list[float] = []
    expected: Annotated[list[list[float]], Meta(min_length=2)]
    worse: Literal["higher", "lower", "both"] = "both"
    drifting_pct: Annotated[float, Meta(gt=0)] = 10.0
    abnormal_pct: Annotated[float, Meta(gt=0)] = 25.0
    states: list[str] = []  # assessed only in these asset states (all when empty)
    # The old name of drifting_pct: refused naming the new one, not as an unknown key
    # (UNSET: never in a compiled payload).
    below_expected_pct: float | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        check_finite("ambient_points", *self.ambient_points)
        check_finite("load_points", *self.load_points)
        for row in self.expected:
            check_finite("expected", *row)
        check_finite("drifting_pct", self.drifting_pct)
        check_finite("abnormal_pct", self.abnormal_pct)
        for name, points in (
            ("ambient_points", self.ambient_points),
            ("load_points", self.load_points),
        ):
            if any(b <= a for a, b in itertools.pairwise(points)):
                raise ValueError(f"{name} must increase strictly")
        columns = max(1, len(self.load_points))
        if len(self.expected) != len(self.ambient_points) or any(
            len(row) != columns for row in self.expected
        ):
            raise ValueError(
                f"expected must have {len(self.ambient_points)} rows (one per ambient point) "
                f"of {columns} value(s) (one per load point)"
            )
        if self.below_expected_pct is not msgspec.UNSET:
            raise ValueError(
                "below_expected_pct is now drifting_pct (the label below_expected is now "
                "drifting, with a direction above or below): rename the key"
            )
        if self.abnormal_pct <= self.drifting_pct:
            raise ValueError("abnormal_pct must be above drifting_pct")


class Rule(Strict, frozen=True, kw_only=True):
    """A condition over state, deviation, trend and maintenance → an alert and what to do."""

    name: str
    when: str
    alert: str  # what is wrong, in words
    action: str  # the recommended action
    outcome: Outcome
    severity: Literal["info", "warning", "critical"] = "warning"

    def __post_init__(self) -> None:
        check_name("name", self.name, NAME, "one word")


class Asset(Strict, frozen=True, kw_only=True):
    """An asset of the site → area → asset hierarchy and the knowledge that gives its
    values meaning: its states, ambient conditions, load, baselines and rules."""

    path: str
    type: str = "other"  # compressor, condenser, evaporator, cold-room, pump, fan, …
    description: str = ""
    states: list[StateRule] = []  # in order, the first true wins
    otherwise: str = "stopped"  # the state when none is true
    ambient: dict[str, str] = {}  # name → signal path of the conditions around it
    load: LoadReference | None = None
    baselines: list[Baseline] = []
    rules: list[Rule] = []
    trend_window: str = "1h"

    def __post_init__(self) -> None:
        check_name("path", self.path, _ASSET_PATH, "1 to 7 segments separated by '/'")
        check_name("type", self.type, NAME, "one word")
        check_name("otherwise", self.otherwise, NAME, "one word")
        duration_s(self.trend_window)
        for name in self.ambient:
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(
                    f"ambient name {name!r}: must be lowercase letters, digits and '_'"
                )


class AccessRole(Strict, frozen=True):
    """What a role of enterprise consumers may see: signal path patterns.

    A pattern is a signal path in which `*` stands for one path segment and `**` for any
    number of them (casbin's globMatch): `coldstore/machine-room/*/motor_power` is the motor
    power of every asset in that area, `coldstore/**` is every signal of the site.
    """

    name: str
    signals: list[str] = []
    metrics: bool = False  # may read /metrics (the broker's own health, no plant values)

    def __post_init__(self) -> None:
        check_name("name", self.name, NAME, "one word")
        if not self.signals and not self.metrics:
            raise ValueError(f"role {self.name!r} grants nothing: give it signals or metrics")
        for pattern in self.signals:
            if not _PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"signals pattern {pattern!r}: must be a signal path of {SPELLING}, "
                    "where a whole segment may be '*' (any one) or '**' (any number)"
                )


class Consumer(Strict, frozen=True):
    """An enterprise consumer, named by the one URI SAN of its client certificate."""

    identity: str
    roles: Annotated[list[str], Meta(min_length=1)]

    def __post_init__(self) -> None:
        if not _IDENTITY.fullmatch(self.identity):
            raise ValueError(
                f"identity {self.identity!r}: must be a URI such as spiffe://site/consumer/name"
            )


class Policy(Strict, frozen=True):
    deployment_id: str  # the appliance this policy is for; must equal the trust root's
    version: Annotated[int, Meta(ge=1, le=2**53 - 1)]  # never lower than one accepted here
    expires: Annotated[datetime, Meta(tz=True)]  # RFC 3339 with a zone; refused after it
    devices: Annotated[list[Device], Meta(min_length=1)]
    signals: Annotated[list[Signal], Meta(min_length=1)]
    assets: list[Asset] = []
    roles: list[AccessRole] = []
    consumers: list[Consumer] = []

    def __post_init__(self) -> None:
        check_name("deployment_id", self.deployment_id, NAME, "one word")

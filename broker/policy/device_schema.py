"""The devices of the policy: the Modbus TCP and OPC UA servers, DNP3 outstations and BACnet/IP
devices the plant half reads, with their request budget and, for OPC UA, their security.

Checks that concern one device's fields live here; checks across the document live in
`parse.py`. Unknown keys are refused (ADR 0002). Nothing here touches the network or the file
system.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from msgspec import Meta

from broker.policy.fields import NAME, Seconds, Strict, check_name

# A device's budget when its policy sets none (ADR 0008): what a small PLC (S7-1200 or
# Modicon M221 class) or a 9600-baud serial line behind a gateway carries without its owner
# noticing. Raising either is the co-signers' decision, and `plan`/`policy show` say so.
DEFAULT_MAX_REQUESTS_PER_S = 20.0
DEFAULT_MAX_CONNECTIONS = 1
MAX_REQUESTS_PER_S = 10_000.0
# A value not confirmed for this many of its device's poll intervals is served `stale` (ADR 0004).
STALE_AFTER_INTERVALS = 3
# How often a DNP3 device read by events is integrity-polled when its policy does not say.
DNP3_DEFAULT_INTEGRITY_S = 3600.0


def _check_rate(device: str, per_s: float) -> None:
    if not 0 < per_s <= MAX_REQUESTS_PER_S:  # NaN fails too
        raise ValueError(
            f"device {device!r}: max_requests_per_s {per_s:g} must be above 0 and at most "
            f"{MAX_REQUESTS_PER_S:g} requests per second (leave it out for the default "
            f"{DEFAULT_MAX_REQUESTS_PER_S:g})"
        )


class ModbusDevice(Strict, frozen=True, tag="modbus", tag_field="protocol"):
    """A Modbus TCP server (a PLC, or a gateway with several unit ids behind it).

    Its request budget: scans start at most every `poll_interval_s`, at most
    `max_requests_per_s` requests go out, over at most `max_connections` TCP connections.
    Both have conservative defaults that protect a small PLC when the policy says nothing
    (ADR 0008); there is no "unlimited".
    """

    name: str
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Meta(ge=0, le=255)] = 1  # the default for this device's signals
    poll_interval_s: Seconds = 1.0
    timeout_s: Seconds = 1.0
    max_requests_per_s: float = DEFAULT_MAX_REQUESTS_PER_S  # range checked below, by name
    max_connections: Annotated[int, Meta(ge=1, le=16)] = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        check_name("name", self.name, NAME, "one word")
        _check_rate(self.name, self.max_requests_per_s)

    protocol: ClassVar[str] = "modbus"  # msgspec's tag, readable in code

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


OPCUA_SECURITY_POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
OPCUA_REFUSED_POLICIES = frozenset({"Basic128Rsa15", "Basic256"})  # deprecated: SHA-1
_OPCUA_ENDPOINT = re.compile(r"opc\.tcp://[^\s/]+(/\S*)?")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class OpcUaDevice(Strict, frozen=True, tag="opcua", tag_field="protocol"):
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
        check_name("name", self.name, NAME, "one word")
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


class Dnp3Device(Strict, frozen=True, tag="dnp3", tag_field="protocol"):
    """A DNP3 outstation over TCP, read by this master (docs/dnp3.md, ADR 0023).

    `read: static` (the default) reads the policy's points, and only them, every
    `poll_interval_s` (range reads of their groups). `read: events` polls `event_classes` every
    `poll_interval_s`, after an integrity poll (class 0 and the event classes) at the start of
    each session and every `integrity_interval_s`; its events are confirmed, as the protocol
    requires (so it needs a master address of its own, never the SCADA's), and every named
    point must be in one of `event_classes` (else only the integrity poll refreshes it).
    Unsolicited responses with objects are taken only with `unsolicited: true`, and never
    enabled by the broker (that is a write to the outstation).
    """

    name: str
    host: str
    outstation_address: Annotated[int, Meta(ge=0, le=65519)]
    port: Annotated[int, Meta(ge=1, le=65535)] = 20000
    master_address: Annotated[int, Meta(ge=0, le=65519)] = 1
    read: Literal["static", "events"] = "static"
    event_classes: tuple[Literal[1, 2, 3], ...] | None = None  # `read: events`; none: 1, 2, 3
    integrity_interval_s: Seconds | None = None  # `read: events` only; none: 3600
    unsolicited: bool = False
    poll_interval_s: Seconds = 1.0
    timeout_s: Seconds = 2.0

    def __post_init__(self) -> None:
        check_name("name", self.name, NAME, "one word")
        if self.master_address == self.outstation_address:
            raise ValueError(  # at the outstation's line: master_address is often left out
                f"outstation_address {self.outstation_address} is also the broker's "
                "master_address (default 1): the two link addresses must differ"
            )
        classes = self.event_classes
        if classes == ():  # an empty list must not read as "none" and run as "all three"
            raise ValueError(
                "event_classes: [] would poll no class: name the classes (1, 2, 3) to poll, "
                "or leave it out for all three"
            )
        if classes is not None and (twice := [c for c in classes if classes.count(c) > 1]):
            raise ValueError(f"event_classes: class {twice[0]} is named twice")
        given = [
            key
            for key, value in (
                ("event_classes", classes),
                ("integrity_interval_s", self.integrity_interval_s),
            )
            if value is not None
        ]
        if self.read == "static" and given:
            verb, them = ("apply", "them") if len(given) > 1 else ("applies", "it")
            raise ValueError(
                f"{' and '.join(given)} {verb} only to `read: events`: leave {them} out, "
                "or set `read: events`"
            )
        if self.unsolicited and self.read == "static":
            raise ValueError(
                "unsolicited: true applies only to `read: events` (unsolicited responses "
                "carry events): set `read: events`, or leave it out"
            )

    protocol: ClassVar[str] = "dnp3"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def classes_polled(self) -> tuple[int, ...]:
        """The event classes of an event poll: those named, else all three."""
        if self.read != "events":
            return ()
        return tuple(sorted(self.event_classes or (1, 2, 3)))

    @property
    def integrity_every_s(self) -> float | None:
        if self.read != "events":
            return None
        return self.integrity_interval_s or DNP3_DEFAULT_INTEGRITY_S


class BacnetDevice(Strict, frozen=True, tag="bacnet", tag_field="protocol"):
    """A BACnet/IP device, read with ReadProperty and ReadPropertyMultiple (docs/bacnet.md).

    `device_instance` is checked against the device at the start of each session: a device
    that answers with another instance is not read. `read: cov` subscribes to changes of
    value (SubscribeCOV), which changes the device's state (its subscription list), so it
    is only done when the policy says so; `read: poll` (the default) only reads. Request
    starts are spaced to at most `max_requests_per_s` (default as for Modbus, ADR 0008).
    """

    name: str
    host: str
    device_instance: Annotated[int, Meta(ge=0, le=4_194_302)]
    port: Annotated[int, Meta(ge=1, le=65535)] = 47808
    read: Literal["poll", "cov"] = "poll"
    poll_interval_s: Seconds = 1.0
    timeout_s: Seconds = 3.0
    max_requests_per_s: float = DEFAULT_MAX_REQUESTS_PER_S  # range checked below, by name

    def __post_init__(self) -> None:
        check_name("name", self.name, NAME, "one word")
        _check_rate(self.name, self.max_requests_per_s)

    protocol: ClassVar[str] = "bacnet"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


Device = ModbusDevice | OpcUaDevice | Dnp3Device | BacnetDevice

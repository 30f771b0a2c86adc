"""The devices of the policy: the Modbus TCP and OPC UA servers the plant half reads, with
their request budget (Modbus) and their security (OPC UA).

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
        if not 0 < self.max_requests_per_s <= MAX_REQUESTS_PER_S:  # NaN fails too
            raise ValueError(
                f"device {self.name!r}: max_requests_per_s {self.max_requests_per_s:g} must be "
                f"above 0 and at most {MAX_REQUESTS_PER_S:g} requests per second (leave it out "
                f"for the default {DEFAULT_MAX_REQUESTS_PER_S:g})"
            )

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


Device = ModbusDevice | OpcUaDevice

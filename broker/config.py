"""The appliance configuration (`broker.yaml`): where things are, and the caps that bound them.

Typed, validated once at start, unknown keys refused (ADR 0002). Relative paths are resolved
against the directory of the config file, so a unit file can point at one file and be done.
The config never holds data-path decisions: what crosses is the policy's job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from broker import documents

Port = Annotated[int, Meta(ge=1, le=65535)]
MiB = Annotated[int, Meta(ge=1, le=1024 * 1024)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class SpoolConfig(_Section, frozen=True):
    dir: Path
    segment_mib: MiB = 16  # a segment is closed and a new one started past this size
    retention_mib: MiB = 1024  # oldest segments are deleted past this total size

    def __post_init__(self) -> None:
        if self.retention_mib < 2 * self.segment_mib:
            raise ValueError(
                f"retention_mib ({self.retention_mib}) must be at least twice segment_mib "
                f"({self.segment_mib}): the spool always keeps the newest full segment"
            )


class OpcUaUserConfig(_Section, frozen=True, kw_only=True):
    """One OPC UA device's user identity: a username and password, or a user certificate."""

    username: str | None = None
    password_file: Path | None = None  # the password on its first line; never in the policy
    certificate: Path | None = None  # a user certificate and its key, PEM (`.pem`)
    private_key: Path | None = None

    def __post_init__(self) -> None:
        by_password = self.username is not None or self.password_file is not None
        by_certificate = self.certificate is not None or self.private_key is not None
        if by_password == by_certificate:
            raise ValueError("give username and password_file, or certificate and private_key")
        if by_password and None in (self.username, self.password_file):
            raise ValueError("username and password_file go together")
        if by_certificate and None in (self.certificate, self.private_key):
            raise ValueError("certificate and private_key go together")


class OpcUaConfig(_Section, frozen=True, kw_only=True):
    """The plant half's OPC UA client: its certificate, and whom it trusts."""

    certificate: Path  # application instance certificate (`dmzbroker certs issue opcua`), PEM
    private_key: Path
    trust_list: list[Path] = []  # trusted server certificates or their CAs: files or folders
    users: dict[str, OpcUaUserConfig] = {}  # device name → its user identity credentials


class MaintenanceConfig(_Section, frozen=True):
    file: Path  # CSV or YAML exported by the CMMS (docs/model.md); re-read when it changes
    due_within_days: Annotated[int, Meta(ge=0, le=365)] = 7  # "due" this close to next_due


class PlantConfig(_Section, frozen=True):
    state_dir: Path  # accepted policy version, island mode; writable by the plant user only
    maintenance: MaintenanceConfig | None = None
    opcua: OpcUaConfig | None = None  # needed when the policy names a secured OPC UA device


class ListenConfig(_Section, frozen=True):
    """The consumer port and what one outsider may hold of it (ADR 0014)."""

    host: str = "127.0.0.1"
    port: Port = 8443
    # Open at once; at the limit, the oldest connection without a request yet is closed.
    # Lowered at start (with a warning) when the open-file limit has no room for it.
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    max_connections_per_address: Annotated[int, Meta(ge=1, le=1_000_000)] = 64
    header_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0  # accept → first request
    idle_timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 60.0  # between requests

    def __post_init__(self) -> None:
        if self.max_connections_per_address > self.max_connections:
            raise ValueError(
                f"max_connections_per_address ({self.max_connections_per_address}) cannot "
                f"exceed max_connections ({self.max_connections})"
            )


class TlsConfig(_Section, frozen=True, kw_only=True):
    cert: Path  # server certificate chain, PEM
    key: Path  # server private key, PEM
    client_ca: Path  # only consumers with a certificate from this CA get in
    profile: Literal["modern", "intermediate"] = "modern"  # TLS 1.3 only / TLS 1.2 and 1.3
    crl: Path | None = None  # the CA's CRL (`dmzbroker certs crl`): revoked consumers refused
    stale_crl: Literal["refuse", "accept"] = "refuse"  # past its nextUpdate: refuse everyone,
    # or keep refusing only the serials it lists


class MqttConfig(_Section, frozen=True, kw_only=True):
    host: str  # an existing MQTT broker (MQTT 5 over TLS)
    port: Port = 8883
    server_name: str = ""  # the name in its certificate; default: host
    ca: Path  # verifies the MQTT broker
    cert: Path  # this appliance's client certificate there
    key: Path
    identity: str  # the policy consumer whose grant decides what is published
    topic_prefix: str = "dmzbroker"
    client_id: str = "dmzbroker"


class PostgresLogin(_Section, frozen=True, kw_only=True):
    """A PostgreSQL role and how it proves itself: a client certificate whose CN is the role,
    or a password file (the password on its first line)."""

    user: str
    cert: Path | None = None  # sslcert; its CN must be `user` (PostgreSQL's `cert` method)
    key: Path | None = None  # sslkey
    password_file: Path | None = None

    def __post_init__(self) -> None:
        by_certificate = self.cert is not None or self.key is not None
        if by_certificate == (self.password_file is not None):
            raise ValueError("give cert and key, or password_file")
        if by_certificate and None in (self.cert, self.key):
            raise ValueError("cert and key go together")


class PostgresConfig(PostgresLogin, frozen=True, kw_only=True):
    """The PostgreSQL historian sink (docs/outputs.md#postgresql): TLS with
    sslmode=verify-full, INSERT-only as `user`; `owner` creates the schema on first start."""

    host: str
    port: Port = 5432
    server_name: str = ""  # the name in its certificate (verify-full); default: host
    database: str
    ca: Path  # verifies the PostgreSQL server (sslrootcert)
    identity: str  # the policy consumer whose grant decides what is written
    schema: str = "dmzbroker"
    owner: PostgresLogin | None = None  # creates the schema and grants `user` INSERT, once


class OpcUaServerConfig(_Section, frozen=True, kw_only=True):
    """The read-only OPC UA server (docs/outputs.md#opc-ua). Client application
    certificates are checked against `enterprise.tls.client_ca` and `.crl`."""

    host: str = "127.0.0.1"
    port: Port = 4840
    certificate: Path  # the server's application instance certificate (RSA), PEM
    private_key: Path
    max_sessions: Annotated[int, Meta(ge=1, le=10_000)] = 64


class EnterpriseConfig(_Section, frozen=True):
    state_dir: Path  # spool position, accepted policy version; enterprise user only
    tls: TlsConfig
    listen: ListenConfig = ListenConfig()
    stream_queue: Annotated[int, Meta(ge=16, le=1_000_000)] = 10_000  # records per SSE consumer
    max_streams: Annotated[int, Meta(ge=1, le=100_000)] = 256  # open /v1/stream connections
    mqtt: MqttConfig | None = None  # publish to an MQTT broker as well
    postgres: PostgresConfig | None = None  # write into a PostgreSQL historian as well
    opcua: OpcUaServerConfig | None = None  # serve a read-only OPC UA mirror as well


class SiemConfig(_Section, frozen=True, kw_only=True):
    host: str  # the syslog collector (RFC 5425, TLS)
    port: Port = 6514
    server_name: str = ""  # the name in its certificate; default: host
    ca: Path  # verifies the collector
    cert: Path  # this appliance's client certificate for the collector
    key: Path


class AuditConfig(_Section, frozen=True):
    dir: Path  # one folder per writer (plant, enterprise, supervisor, validate, cli), each
    # locked by its writer
    key: Path  # the appliance's audit key (`dmzbroker audit keygen`): signs checkpoints
    checkpoint_every: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000  # entries
    checkpoint_s: Annotated[float, Meta(ge=1, le=86_400)] = 60.0  # seconds
    capacity_mib: MiB = 1024  # per writer; past 80 %: a warning, throttled events only counted;
    # past 90 %: oldest segments deleted down to 70 % (ADR 0015)
    retention_days: Annotated[int, Meta(ge=1, le=36_500)] = 365  # older segments are deleted
    siem: SiemConfig | None = None  # export to a syslog collector, from the enterprise half


class LogConfig(_Section, frozen=True):
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, else JSON


class SupervisorConfig(_Section, frozen=True):
    """How `dmzbroker run` restarts a half that exited (ADR 0013)."""

    restart_initial_s: Annotated[float, Meta(ge=0.01, le=60)] = 0.5  # first delay, jittered
    restart_max_s: Annotated[float, Meta(ge=0.01, le=3600)] = 30.0  # doubling stops here
    restart_reset_s: Annotated[float, Meta(ge=0.1, le=86_400)] = 60.0  # ran this long: back to
    # the first delay

    def __post_init__(self) -> None:
        if self.restart_max_s < self.restart_initial_s:
            raise ValueError(
                f"restart_max_s ({self.restart_max_s}) cannot be below restart_initial_s "
                f"({self.restart_initial_s})"
            )


class DiodeConfig(_Section, frozen=True, kw_only=True):
    """Two hosts with a hardware data diode between them (ADR 0019): `diode send` on the OT
    host reads the spool and sends UDP datagrams; `diode receive` on the IT host writes them
    into its own spool (`spool.dir` there), which the enterprise half reads as usual."""

    host: str  # the receiver's address: the sender sends there, the receiver binds it
    port: Port = 7600
    state_dir: Path  # sender: its read position in the spool; receiver: its own state
    datagram_bytes: Annotated[int, Meta(ge=512, le=65_000)] = 1400  # whole datagram, headers in
    max_datagrams_s: Annotated[int, Meta(ge=1, le=1_000_000)] = 20_000  # the sender's rate bound
    copies: Annotated[int, Meta(ge=1, le=5)] = 1  # each datagram sent this many times
    heartbeat_s: Annotated[float, Meta(ge=0.05, le=60)] = 1.0  # sender → receiver, always
    heartbeat_alarm_after: Annotated[int, Meta(ge=1, le=1000)] = 3  # silent intervals → alarm
    resync_s: Annotated[float, Meta(ge=1, le=86_400)] = 60.0  # full latest-value resync period


class BrokerConfig(_Section, frozen=True):
    policy: Path  # the signed policy envelope
    trust_root: Path  # the owner keys that may sign it, and how many of each
    spool: SpoolConfig
    plant: PlantConfig
    enterprise: EnterpriseConfig
    audit: AuditConfig
    log: LogConfig = LogConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    diode: DiodeConfig | None = None  # only on the two hosts of a hardware data diode


def load(path: Path, check: Callable[[BrokerConfig], Iterable[str]] | None = None) -> BrokerConfig:
    """Load and validate `broker.yaml`; raises ConfigError naming file, line and key. `check`
    (broker.preflight) yields problems no single key shows, such as a file that is missing."""
    return documents.load(path, BrokerConfig, check=check)

"""The running security settings of the appliance, as `dmzbroker posture` reports them.

Finds each running half by the pid its audit writer recorded in its folder's lock
(broker.folder_lock.holder), and reads what it is: its user, the sockets it listens on, what
it accepted (broker.policy.accepted), island mode, the audit writers' tails; then compares the
sockets with the manifest the configuration declares (the plant half listens on nothing, the
enterprise half on its `listen` address, a diode receiver on its UDP port).

It only reads: it never writes, signals or keeps a lock of a half (the lock test lasts an
instant), and never proves integrity (`dmzbroker audit verify` does). What it cannot read (a
folder of another user, a process it may not inspect) is reported as `Unknown` with the
reason, never raised.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import psutil
from cryptography import x509

from broker import island
from broker.audit.entry import CHECKPOINT
from broker.audit.log import MIN_FREE_BYTES
from broker.audit.segments import MAX_SEGMENT_BYTES, segment_numbers, segment_path
from broker.config import BrokerConfig
from broker.deployment import sockets
from broker.deployment.sockets import Socket, SocketCheck
from broker.errors import DmzBrokerError
from broker.folder_lock import holder
from broker.metrics import PLANT_FILE
from broker.policy import accepted as records
from broker.policy import envelope as envelopes
from broker.policy import parse, trustroot, verify
from broker.safe_files import read_regular
from broker.trust.revocation import read_crl

HALVES = ("plant", "enterprise")
DIODE_RECEIVER = "diode-receive"
METRICS_STALE_S = 30.0  # the plant half rewrites its metrics every 2 s: older is not current
SEGMENTS_READ = 2  # a writer's newest segment may be empty (its next one, made ahead)

T = TypeVar("T")


class Unknown(msgspec.Struct, frozen=True):
    """What could not be read, and why."""

    unknown: str


class Process(msgspec.Struct, frozen=True):
    pid: int
    user: str | Unknown
    uid: int | Unknown  # effective
    listening: list[Socket] | Unknown


class Crl(msgspec.Struct, frozen=True):
    path: str
    issuer: str
    number: int | None
    next_update: str | None
    stale: bool  # past its next update


class Tls(msgspec.Struct, frozen=True):
    profile: str
    client_ca: list[str] | Unknown  # the subject of each CA certificate in the file
    crl: Crl | Unknown | None  # None: no CRL configured


class Signer(msgspec.Struct, frozen=True):
    name: str
    role: str
    keyid: str


class Accepted(msgspec.Struct, frozen=True):
    version: int
    sha256: str


class PolicyState(msgspec.Struct, frozen=True):
    file: str
    version: int | None  # the file's, once its signatures verified
    sha256: str | None  # of its signed payload
    expires: str | None
    signers: list[Signer]  # trust root keys whose signature over it verifies
    verified: bool  # thresholds met, this deployment, not expired
    problem: str | None
    accepted: dict[str, Accepted | Unknown | None]  # per half, its state dir's record
    differences: list[str]  # where a half's record is not the file


class TrustRootState(msgspec.Struct, frozen=True):
    file: str
    version: int | None
    sha256: str | None
    problem: str | None  # the file does not verify alone
    accepted: dict[str, Accepted | Unknown | None]
    differences: list[str]


class WriterState(msgspec.Struct, frozen=True):
    running: bool  # a process holds the folder's lock
    last_seq: int | None
    last_time: str | None
    last_checkpoint_seq: int | None  # the seq its newest checkpoint covers
    last_checkpoint_age_s: float | None
    failing: bool | Unknown | None  # None: not running


class FileSystem(msgspec.Struct, frozen=True):
    free_bytes: int
    free_pct: float
    read_only: bool


class AuditState(msgspec.Struct, frozen=True):
    dir: str
    file_system: FileSystem | Unknown
    writers: dict[str, WriterState | Unknown]


class Posture(msgspec.Struct, frozen=True):
    tls: Tls
    policy: PolicyState
    trust_root: TrustRootState
    halves: dict[str, Process | Unknown | None]  # None: not running
    island_mode: bool | Unknown
    audit: AuditState
    manifest: dict[str, list[Socket] | Unknown]
    sockets: dict[str, SocketCheck | Unknown | None]
    listening_matches_manifest: bool
    mismatches: list[str]  # why it does not match, one sentence each


Resolver = Callable[[str, int, int], list[tuple[str, int]]]


def collect(cfg: BrokerConfig, resolve: Resolver | None = None) -> Posture:
    """The posture of the appliance `cfg` configures, as it runs now."""
    processes = list(HALVES) + ([DIODE_RECEIVER] if cfg.diode is not None else [])
    halves = {name: find(cfg.audit.dir / name) for name in processes}
    manifest = declared(cfg, resolve or _resolve)
    checks = {name: _check(manifest[name], halves[name]) for name in processes}
    mismatches = judge(halves, checks, diode=cfg.diode is not None)
    return Posture(
        tls=tls_state(cfg),
        policy=policy_state(cfg),
        trust_root=trust_root_state(cfg),
        halves=halves,
        island_mode=_guarded(lambda: island.is_on(cfg.plant.state_dir)),
        audit=audit_state(cfg.audit.dir, cfg.spool.dir),
        manifest=manifest,
        sockets=checks,
        listening_matches_manifest=not mismatches,
        mismatches=mismatches,
    )


# -- the manifest -------------------------------------------------------------------------------


def declared(cfg: BrokerConfig, resolve: Resolver) -> dict[str, list[Socket] | Unknown]:
    """What each process may listen on, from the configuration."""
    listen = cfg.enterprise.listen
    manifest: dict[str, list[Socket] | Unknown] = {
        "plant": [],
        "enterprise": _addresses("tcp", listen.host, listen.port, resolve),
    }
    if cfg.diode is not None:
        manifest[DIODE_RECEIVER] = _addresses("udp", cfg.diode.host, cfg.diode.port, resolve)
    return manifest


def judge(
    halves: dict[str, Process | Unknown | None],
    sockets: dict[str, SocketCheck | Unknown | None],
    *,
    diode: bool,
) -> list[str]:
    """Why the running processes do not match the manifest; empty when they do. Without a
    diode both halves must run; with one, a host runs one side: the plant half (OT host), or
    the enterprise half and the diode receiver (IT host)."""
    required: Sequence[str] = HALVES
    if diode:
        required = ("plant",) if halves.get("plant") is not None else ("enterprise", DIODE_RECEIVER)
    found = []
    for name in required:
        if halves.get(name) is None:
            found.append(f"{name}: not running")
    for name, check in sockets.items():
        if isinstance(check, Unknown):
            found.append(f"{name}: listening sockets unknown ({check.unknown})")
        elif check is not None:
            found.extend(f"{name}: listens on {s}, not in the manifest" for s in check.extra)
            found.extend(f"{name}: does not listen on {s}" for s in check.missing)
    return found


def _check(
    expected: list[Socket] | Unknown, half: Process | Unknown | None
) -> SocketCheck | Unknown | None:
    if half is None:
        return None
    if isinstance(half, Unknown):
        return half
    if isinstance(expected, Unknown):
        return expected
    if isinstance(half.listening, Unknown):
        return half.listening
    return sockets.compare(expected, half.listening)


def _addresses(
    protocol: Literal["tcp", "udp"], host: str, port: int, resolve: Resolver
) -> list[Socket] | Unknown:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    try:
        found = resolve(host, port, kind)
    except OSError as e:
        return Unknown(f"{host}: cannot be resolved: {e.strerror or e}")
    return sorted({Socket(protocol, sockets.ip(address), p) for address, p in found})


def _resolve(host: str, port: int, kind: int) -> list[tuple[str, int]]:
    """As the halves resolve what they bind (broker.enterprise.listener: AI_PASSIVE)."""
    infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    return [(str(info[4][0]), int(info[4][1])) for info in infos]


# -- the running processes ----------------------------------------------------------------------


def find(writer_dir: Path) -> Process | Unknown | None:
    """The process whose audit writer holds `writer_dir`; None when none does."""
    try:
        pid = holder(writer_dir)
    except (OSError, DmzBrokerError) as e:
        return Unknown(f"{writer_dir}: cannot read its lock: {_reason(e)}")
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        uid = process.uids().effective
    except psutil.NoSuchProcess:
        return Unknown(f"pid {pid}, recorded in {writer_dir}'s lock, is not visible here")
    except psutil.Error as e:
        return Unknown(f"pid {pid}: cannot be inspected: {e}")
    try:
        user: str | Unknown = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = Unknown(f"uid {uid} has no user name")
    return Process(pid, user, uid, listening_of(process))


def listening_of(process: psutil.Process) -> list[Socket] | Unknown:
    try:
        return sockets.listening(process)
    except psutil.AccessDenied:
        return Unknown(f"pid {process.pid}: its sockets may be read only by root or its user")
    except (psutil.Error, OSError) as e:
        return Unknown(f"pid {process.pid}: cannot read its sockets: {_reason(e)}")


# -- what is configured and accepted ------------------------------------------------------------


def tls_state(cfg: BrokerConfig) -> Tls:
    tls = cfg.enterprise.tls
    subjects = _guarded(
        lambda: [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(
            read_regular(tls.client_ca, 1024 * 1024))]
    )  # fmt: skip
    crl: Crl | Unknown | None = None
    if tls.crl is not None:
        path = tls.crl
        crl = _guarded(lambda: _crl(path, tls.client_ca))
    return Tls(tls.profile, subjects, crl)


def _crl(path: Path, client_ca: Path) -> Crl:
    facts = read_crl(path, client_ca)
    next_update = facts.next_update
    stale = next_update is not None and next_update <= datetime.now(UTC)
    when = next_update.isoformat() if next_update is not None else None
    return Crl(str(path), facts.issuer, facts.number, when, stale)


def policy_state(cfg: BrokerConfig) -> PolicyState:
    accepted = {half: _accepted(_state_dir(cfg, half), lambda f: f.policy) for half in HALVES}
    version = sha256 = expires = problem = None
    signers: list[Signer] = []
    verified = False
    try:
        trust = trustroot.load(cfg.trust_root)
        envelope = envelopes.read(cfg.policy)
        result = verify.check(envelope, trust)
        signers = [Signer(k.name, k.role, k.keyid) for k in result.signers]
        if result.ok:
            # Parsed only now, its signatures verified (as the halves do).
            policy = parse.from_payload(envelope.untrusted_payload, str(cfg.policy))
            version, expires = policy.version, policy.expires.isoformat()
            sha256 = hashlib.sha256(envelope.untrusted_payload).hexdigest()
            if policy.deployment_id != trust.deployment_id:
                problem = f"for deployment {policy.deployment_id!r}, not {trust.deployment_id!r}"
            elif policy.expires <= datetime.now(UTC):
                problem = f"expired at {expires}"
            verified = problem is None
        else:
            problem = verify.describe_shortfall(result)
    except DmzBrokerError as e:
        problem = str(e)
    return PolicyState(
        str(cfg.policy), version, sha256, expires, signers, verified, problem, accepted,
        _differences(accepted, version, sha256),
    )  # fmt: skip


def trust_root_state(cfg: BrokerConfig) -> TrustRootState:
    accepted = {half: _accepted(_state_dir(cfg, half), lambda f: f.root) for half in HALVES}
    version = sha256 = problem = None
    try:
        root = trustroot.load(cfg.trust_root)
        version, sha256 = root.version, root.sha256
    except DmzBrokerError as e:
        problem = str(e)
    return TrustRootState(
        str(cfg.trust_root), version, sha256, problem, accepted,
        _differences(accepted, version, sha256),
    )  # fmt: skip


def _state_dir(cfg: BrokerConfig, half: str) -> Path:
    return cfg.plant.state_dir if half == "plant" else cfg.enterprise.state_dir


def _accepted(
    state_dir: Path,
    pick: Callable[[records.Floor], records.AcceptedPolicy | records.AcceptedRoot | None],
) -> Accepted | Unknown | None:
    """The half's state dir record (without its audit log's: that needs the audit key)."""
    try:
        record = pick(records.floor(state_dir, state_dir, None))
    except DmzBrokerError as e:
        return Unknown(str(e))
    return None if record is None else Accepted(record.version, record.sha256)


def _differences(
    accepted: dict[str, Accepted | Unknown | None], version: int | None, sha256: str | None
) -> list[str]:
    found = []
    for half, record in accepted.items():
        if isinstance(record, Accepted) and sha256 is not None and record.sha256 != sha256:
            found.append(
                f"{half} accepted version {record.version}, the file is version {version}"
                + (" with other content" if record.version == version else "")
            )
    return found


# -- audit --------------------------------------------------------------------------------------


def audit_state(audit_dir: Path, spool_dir: Path) -> AuditState:
    file_system = _guarded(lambda: _file_system(audit_dir))
    writers: dict[str, WriterState | Unknown] = {}
    try:
        names = sorted(n for n in os.listdir(audit_dir) if (audit_dir / n).is_dir())
    except OSError as e:
        return AuditState(str(audit_dir), file_system, {"*": Unknown(_reason(e))})
    full = isinstance(file_system, FileSystem) and (
        file_system.read_only or file_system.free_bytes < MIN_FREE_BYTES
    )
    for name in names:
        writers[name] = _guarded(functools.partial(_writer, audit_dir / name, spool_dir, full=full))
    return AuditState(str(audit_dir), file_system, writers)


def _file_system(path: Path) -> FileSystem:
    fs = os.statvfs(path)
    free = fs.f_bavail * fs.f_frsize
    share = fs.f_bavail / fs.f_blocks if fs.f_blocks else 1.0
    return FileSystem(free, round(share * 100, 1), bool(fs.f_flag & os.ST_RDONLY))


def _writer(directory: Path, spool_dir: Path, *, full: bool) -> WriterState:
    running = holder(directory) is not None
    last, checkpoint = None, None
    for number in list(reversed(segment_numbers(directory)))[:SEGMENTS_READ]:
        data = read_regular(segment_path(directory, number), MAX_SEGMENT_BYTES)
        found_last, found_checkpoint = tail(data)
        last = last or found_last
        checkpoint = checkpoint or found_checkpoint
        if checkpoint is not None:
            break
    failing: bool | Unknown | None = None
    if running:
        failing = True if full else _failing(directory.name, spool_dir)
    covers = checkpoint.get("details", {}).get("covers_seq") if checkpoint else None
    return WriterState(
        running,
        last.get("seq") if last else None,
        last.get("time") if last else None,
        covers if isinstance(covers, int) else None,
        _age(checkpoint.get("time")) if checkpoint else None,
        failing,
    )


def tail(segment: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A segment's last whole entry and its last checkpoint, decoded (not verified)."""
    end = segment.rfind(b"\n")
    if end < 0:
        return None, None
    last = _entry(segment[segment.rfind(b"\n", 0, end) + 1 : end])
    at = segment.rfind(b'"event":"' + CHECKPOINT.encode() + b'"', 0, end)
    checkpoint = None
    if at >= 0:
        stop = segment.find(b"\n", at)
        checkpoint = _entry(segment[segment.rfind(b"\n", 0, at) + 1 : stop])
    return last, checkpoint


def _entry(line: bytes) -> dict[str, Any] | None:
    try:
        entry = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    return entry if isinstance(entry, dict) else None


def _age(when: object) -> float | None:
    if not isinstance(when, str):
        return None
    try:
        moment = datetime.fromisoformat(when)
    except ValueError:
        return None
    return round((datetime.now(UTC) - moment).total_seconds(), 1)


def _failing(writer: str, spool_dir: Path) -> bool | Unknown:
    """Only the plant half says it in a file (its metrics, in the spool)."""
    if writer != "plant":
        return Unknown(f"the {writer} writer reports it only at /metrics")
    path = spool_dir / PLANT_FILE
    try:
        age = time.time() - os.stat(path).st_mtime
        text = read_regular(path, 16 * 1024 * 1024).decode(errors="replace")
    except OSError as e:
        return Unknown(f"{path}: {_reason(e)}")
    if age > METRICS_STALE_S:
        return Unknown(f"{path} is {age:.0f} s old: the plant half does not write it")
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "dmzbroker_plant_audit_failing":
            return value.strip() not in ("0", "0.0")
    return Unknown(f"{path}: no dmzbroker_plant_audit_failing")


# -- helpers ------------------------------------------------------------------------------------


def _guarded(read: Callable[[], T]) -> T | Unknown:
    try:
        return read()
    except (OSError, ValueError, DmzBrokerError) as e:
        return Unknown(_reason(e))


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return str(error)

"""The running security settings of the appliance, as `dmzbroker posture` reports them.

Finds each running half by the kernel's holder of its audit folder's lock, with its user's
processes (broker.deployment.halves), and reads what it is: its user, the sockets those
processes listen on, what it accepted (broker.policy.accepted), island mode, the audit writers'
tails (broker.deployment.audit_tail); then compares the sockets with the manifest the
configuration declares (the plant half listens on nothing, the enterprise half on its `listen`
address and, with `enterprise.opcua`, the OPC UA server's, a diode receiver on its UDP port), and each half's user with the layout's
(broker.deployment.layout).

It only reads: it never writes, signals or keeps a lock of a half (the lock test lasts an
instant), and never proves integrity (`dmzbroker audit verify` does). What it cannot read (a
folder of another user, a process it may not inspect) is reported as `Unknown` with the
reason (broker.deployment.unknown), never raised. Everything in a half's folders is the half's
to write, so it is read as hostile: a file of the wrong kind or size, or content of the wrong
type, is `Unknown` too.
"""

from __future__ import annotations

import hashlib
import pwd
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec
import psutil
from cryptography import x509

from broker import island
from broker.config import BrokerConfig
from broker.deployment import halves as holders
from broker.deployment import layout, sockets
from broker.deployment.audit_tail import AuditState, audit_state
from broker.deployment.sockets import Socket, SocketCheck
from broker.deployment.unknown import Unknown, guarded, reason
from broker.errors import DmzBrokerError
from broker.policy import accepted as records
from broker.policy import envelope as envelopes
from broker.policy import parse, trustroot, verify
from broker.safe_files import read_regular
from broker.trust.revocation import read_crl

HALVES = ("plant", "enterprise")
DIODE_RECEIVER = "diode-receive"


class Process(msgspec.Struct, frozen=True):
    pid: int  # the kernel's holder of its audit folder's lock
    user: str  # effective; `uid N` when it has no name
    uid: int  # effective
    real_uid: int
    processes: list[int]  # whose sockets count as its own (broker.deployment.halves)
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
    separated: bool  # each running half as its layout user, no two sharing one
    separation: list[str]  # why not, one sentence each
    mismatches: list[str]  # why the exit code is not 0, one sentence each


Resolver = Callable[[str, int, int], list[tuple[str, int]]]


def collect(
    cfg: BrokerConfig, resolve: Resolver | None = None, *, same_user: bool = False
) -> Posture:
    """The posture of the appliance `cfg` configures, as it runs now. `same_user`: halves
    that share a user or run as another than the layout's (`run --same-user`, a demo) are
    reported in `separation` but are no mismatch."""
    processes = list(HALVES) + ([DIODE_RECEIVER] if cfg.diode is not None else [])
    halves = running(cfg.audit.dir, processes)
    manifest = declared(cfg, resolve or _resolve)
    checks = {name: _check(manifest[name], halves[name]) for name in processes}
    listening = judge(halves, checks, diode=cfg.diode is not None)
    users = separation(halves)
    return Posture(
        tls=tls_state(cfg),
        policy=policy_state(cfg),
        trust_root=trust_root_state(cfg),
        halves=halves,
        island_mode=guarded(lambda: island.is_on(cfg.plant.state_dir)),
        audit=audit_state(cfg.audit.dir, cfg.spool.dir),
        manifest=manifest,
        sockets=checks,
        listening_matches_manifest=not listening,
        separated=not users,
        separation=users,
        mismatches=listening + ([] if same_user else users),
    )


# -- the manifest -------------------------------------------------------------------------------


def declared(cfg: BrokerConfig, resolve: Resolver) -> dict[str, list[Socket] | Unknown]:
    """What each process may listen on, from the configuration."""
    listen, opcua = cfg.enterprise.listen, cfg.enterprise.opcua
    enterprise = _addresses("tcp", listen.host, listen.port, resolve)
    if opcua is not None and not isinstance(enterprise, Unknown):
        served = _addresses("tcp", opcua.host, opcua.port, resolve)
        enterprise = served if isinstance(served, Unknown) else sorted({*enterprise, *served})
    manifest: dict[str, list[Socket] | Unknown] = {"plant": [], "enterprise": enterprise}
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


def running(
    audit_dir: Path, names: Sequence[str], user_of: Callable[[str], str] = layout.user_of
) -> dict[str, Process | Unknown | None]:
    """Each process of `names` found by its audit folder's lock; None when not running. A
    half running as its own user (`user_of`), shared with no other half, is every process of
    that user; any other (root, a user of `run --same-user`, which run more than the half) is
    its holder and its holder's descendants only, and `separation` says why."""
    held = {name: find(audit_dir / name) for name in names}
    found: dict[str, Process | Unknown | None] = {}
    for name, half in held.items():
        if not isinstance(half, holders.Holder):
            found[name] = half
            continue
        others = [h for n, h in held.items() if n != name and isinstance(h, holders.Holder)]
        shared = any(_uids(half) & _uids(other) for other in others)
        found[name] = _process(half, shared=shared or _uids(half) != {_uid(user_of(name))})
    return found


def find(writer_dir: Path) -> holders.Holder | Unknown | None:
    """The kernel's holder of `writer_dir`'s lock; None when none holds it."""
    try:
        return holders.holder(writer_dir)
    except (OSError, DmzBrokerError) as e:
        return Unknown(f"{writer_dir}: cannot read its lock: {reason(e)}")


def separation(halves: dict[str, Process | Unknown | None]) -> list[str]:
    """Why the running halves are not each their layout user, alone; empty when they are."""
    found = []
    running = [(name, half) for name, half in halves.items() if isinstance(half, Process)]
    for name, half in running:
        expected = layout.user_of(name)
        real = "" if half.real_uid == half.uid else f" (real user {_name(half.real_uid)})"
        if half.user != expected or real:
            found.append(f"{name}: runs as {half.user}{real}, expected {expected}")
    for at, (name, half) in enumerate(running):
        for other, other_half in running[at + 1 :]:
            for uid in sorted({half.uid, half.real_uid} & {other_half.uid, other_half.real_uid}):
                found.append(f"{name} and {other} share user {_name(uid)}: not separated")
    return found


def _process(half: holders.Holder, *, shared: bool) -> Process | Unknown:
    try:
        members = holders.members(half, shared=shared)
    except psutil.Error as e:
        return Unknown(f"pid {half.pid}: cannot be inspected: {e}")
    listening: set[Socket] = set()
    for member in members:
        found = listening_of(member)
        if isinstance(found, Unknown):
            if member.is_running():
                return Process(*_ids(half), [m.pid for m in members], found)
            continue  # exited meanwhile: it listens on nothing now
        listening.update(found)
    return Process(*_ids(half), [m.pid for m in members], sorted(listening))


def _ids(half: holders.Holder) -> tuple[int, str, int, int]:
    return half.pid, _name(half.effective_uid), half.effective_uid, half.real_uid


def _uids(half: holders.Holder) -> set[int]:
    return {half.real_uid, half.effective_uid}


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None  # not installed: no process runs as it


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def listening_of(process: psutil.Process) -> list[Socket] | Unknown:
    try:
        return sockets.listening(process)
    except psutil.AccessDenied:
        return Unknown(f"pid {process.pid}: its sockets may be read only by root or its user")
    except (psutil.Error, OSError) as e:
        return Unknown(f"pid {process.pid}: cannot read its sockets: {reason(e)}")


# -- what is configured and accepted ------------------------------------------------------------


def tls_state(cfg: BrokerConfig) -> Tls:
    tls = cfg.enterprise.tls
    subjects = guarded(
        lambda: [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(
            read_regular(tls.client_ca, 1024 * 1024))]
    )  # fmt: skip
    crl: Crl | Unknown | None = None
    if tls.crl is not None:
        path = tls.crl
        crl = guarded(lambda: _crl(path, tls.client_ca))
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
    record = guarded(lambda: pick(records.floor(state_dir, state_dir, None)))
    if record is None or isinstance(record, Unknown):
        return record
    return Accepted(record.version, record.sha256)


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

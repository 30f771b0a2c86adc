"""`dmzbroker posture`: real halves found by their folder locks, their sockets against the
manifest, what they accepted, island mode; the manifest comparison on its own."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import yaml

from broker import config
from broker.deployment import halves, posture, sockets
from broker.deployment.layout import ENTERPRISE_USER, PLANT_USER
from broker.deployment.posture import Process
from broker.deployment.sockets import Socket, SocketCheck
from broker.deployment.unknown import Unknown
from broker.folder_lock import FolderLock
from broker.policy import trustroot
from tests.harness import (
    Deployment,
    Owners,
    Pki,
    dmzbroker,
    eventually,
    sign_policy,
    write_config,
)

pytestmark = pytest.mark.timeout(90)

VERSION = 7  # not the demo's 1: the version reported must be the one signed


def run_posture(deployment: Deployment, *extra: str) -> tuple[int, str]:
    done = dmzbroker("posture", "--config", str(deployment.config), *extra, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout


def both_running(cfg: config.BrokerConfig) -> bool:
    found = posture.collect(cfg)
    enterprise = found.halves["enterprise"]
    return (
        isinstance(found.halves["plant"], Process)
        and isinstance(enterprise, Process)
        and enterprise.listening != []
    )


async def test_posture_of_running_halves_matches_the_manifest(
    deployment: Deployment, owners: Owners, start_broker: Any
) -> None:
    document = {**deployment.document, "version": VERSION}
    signers = [owners.ot_key, owners.it_key, owners.second_ot_key]
    assert sign_policy(deployment.directory, document, signers) == deployment.policy
    cfg = config.load(deployment.config)
    start_broker("plant", deployment.config)
    enterprise = start_broker("enterprise", deployment.config)
    await eventually(lambda: both_running(cfg), timeout=30, interval=0.2)

    me = pwd.getpwuid(os.geteuid()).pw_name
    not_separated = [
        f"plant: runs as {me}, expected {PLANT_USER}",
        f"enterprise: runs as {me}, expected {ENTERPRISE_USER}",
        f"plant and enterprise share user {me}: not separated",
    ]
    code, out = run_posture(deployment, "--json")
    found = json.loads(out)
    assert code == 1 and found["listening_matches_manifest"] is True
    assert found["separated"] is False
    assert found["separation"] == not_separated == found["mismatches"]
    code, out = run_posture(deployment, "--json", "--same-user")
    found = json.loads(out)
    assert code == 0, found["mismatches"]
    assert found["listening_matches_manifest"] is True and found["mismatches"] == []
    assert found["separation"] == not_separated
    plant, api = found["halves"]["plant"], found["halves"]["enterprise"]
    assert plant["listening"] == [] == found["manifest"]["plant"]
    port = {"protocol": "tcp", "address": "127.0.0.1", "port": deployment.api_port}
    assert api["listening"] == [port] == found["manifest"]["enterprise"]
    assert api["pid"] == enterprise.process.pid
    # Sharing a user, each half is its lock holder and its descendants only.
    assert api["processes"][0] == enterprise.process.pid
    assert (plant["user"], plant["uid"]) == (api["user"], api["uid"]) == (me, os.geteuid())

    policy = found["policy"]
    assert policy["version"] == VERSION and policy["verified"] is True
    assert sorted(s["name"] for s in policy["signers"]) == ["Ivan IT", "Olga OT", "Otto OT"]
    accepted = {"version": VERSION, "sha256": policy["sha256"]}
    assert policy["accepted"] == {"plant": accepted, "enterprise": accepted}
    assert policy["differences"] == []
    root = trustroot.load(owners.trust_root)
    assert found["trust_root"]["version"] == root.version
    assert found["trust_root"]["accepted"]["plant"]["version"] == root.version
    assert found["tls"]["profile"] == "modern" and found["tls"]["crl"] is None
    assert found["tls"]["client_ca"] and "Unknown" not in str(found["tls"]["client_ca"])

    writers = found["audit"]["writers"]
    for name in ("plant", "enterprise"):
        assert writers[name]["running"] is True
        assert writers[name]["last_seq"] > writers[name]["last_checkpoint_seq"] >= 0
        assert writers[name]["last_checkpoint_age_s"] < 600
    assert found["audit"]["file_system"]["free_bytes"] > 0
    assert found["island_mode"] is False

    dmzbroker("island", "on", "--config", str(deployment.config), "--reason", "test")
    code, out = run_posture(deployment, "--json", "--same-user")
    assert json.loads(out)["island_mode"] is True and code == 0

    assert enterprise.stop() == 0
    # A policy signed anew while the enterprise half is stopped (the running plant half may
    # reload it): the file is not what the enterprise half accepted.
    sign_policy(deployment.directory, {**document, "version": VERSION + 1}, signers)
    differences = posture.collect(cfg).policy.differences
    assert f"enterprise accepted version {VERSION}, the file is version {VERSION + 1}" in (
        differences
    )
    code, out = run_posture(deployment, "--json", "--same-user")
    found = json.loads(out)
    assert code == 1 and found["halves"]["enterprise"] is None
    assert found["sockets"]["enterprise"] is None
    assert "enterprise: not running" in found["mismatches"]
    assert found["audit"]["writers"]["enterprise"]["running"] is False

    code, out = run_posture(deployment, "--same-user")
    assert code == 1
    lines = out.splitlines()
    assert any(line.startswith("enterprise: NOT RUNNING") for line in lines), out
    assert "plant: pid " in out and "listening on nothing" in out
    assert lines[-1] == "posture: DOES NOT MATCH: enterprise: not running"
    assert f"separation: NOT SEPARATED: plant: runs as {me}, expected {PLANT_USER}" in lines


def test_a_socket_beyond_the_manifest_is_named_by_its_address() -> None:
    api = Socket("tcp", "127.0.0.1", 8443)
    extra = Socket("tcp", "0.0.0.0", 9999)
    check = sockets.compare([api], [api, extra])
    assert check == SocketCheck([api], [extra], [], matches=False)
    halves: dict[str, Process | Unknown | None] = {
        "plant": Process(1, "p", 1, 1, [1], [Socket("udp", "0.0.0.0", 47808)]),
        "enterprise": Process(2, "e", 2, 2, [2], [api, extra]),
    }
    checks: dict[str, SocketCheck | Unknown | None] = {
        "plant": sockets.compare([], [Socket("udp", "0.0.0.0", 47808)]),
        "enterprise": check,
    }
    assert posture.judge(halves, checks, diode=False) == [
        "plant: listens on udp 0.0.0.0:47808, not in the manifest",
        "enterprise: listens on tcp 0.0.0.0:9999, not in the manifest",
    ]
    missing = sockets.compare([api], [])
    assert not missing.matches and missing.missing == [api]
    assert sockets.compare([api], [api]).matches


def test_the_opcua_server_is_in_the_enterprise_manifest(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    """The enterprise half listens on its consumer port and, when it serves OPC UA, on the
    OPC UA port as well (both resolved as the half binds them); an address that cannot be
    resolved makes the whole manifest unknown, never a shorter one."""
    path = write_config(tmp_path, tmp_path / "policy.dsse.json", pki, 8443, owners)
    document = yaml.safe_load(path.read_text())
    server = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)}
    assert posture.declared(config.load(path), posture._resolve)["enterprise"] == [
        Socket("tcp", "127.0.0.1", 8443)
    ]
    document["enterprise"]["opcua"] = {**server, "host": "::", "port": 4850}
    path.write_text(yaml.safe_dump(document))
    cfg = config.load(path)
    assert posture.declared(cfg, posture._resolve)["enterprise"] == [
        Socket("tcp", "127.0.0.1", 8443),
        Socket("tcp", "::", 4850),
    ]

    def unresolvable(host: str, port: int, kind: int) -> list[tuple[str, int]]:
        if host == "::":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return posture._resolve(host, port, kind)

    assert posture.declared(cfg, unresolvable)["enterprise"] == Unknown(
        "::: cannot be resolved: Name or service not known"
    )


def test_sockets_read_from_a_real_process(tmp_path: Path) -> None:
    """This test process listens on TCP, UDP and a unix path, and holds a connected pair
    and a client connection: only the three listening ones are listed."""
    with (
        socket.socket() as tcp,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_UNIX) as unix,
        socket.create_server(("127.0.0.1", 0)) as server,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("::1", 0))
        unix.bind(str(tmp_path / "listening.sock"))
        unix.listen()
        pair = socket.socketpair()
        client = socket.create_connection(server.getsockname())
        client_port = client.getsockname()[1]
        try:
            found = posture.listening_of(psutil.Process())
        finally:
            for s in (*pair, client):
                s.close()
        assert isinstance(found, list)
        mine = {
            Socket("tcp", "127.0.0.1", tcp.getsockname()[1]),
            Socket("tcp", "127.0.0.1", server.getsockname()[1]),
            Socket("udp", "::1", udp.getsockname()[1]),
            Socket("unix", str(tmp_path / "listening.sock")),
        }
        assert mine <= set(found)
        assert all(s.port != client_port for s in found)
        assert [s for s in found if s.protocol == "unix"] == [
            Socket("unix", str(tmp_path / "listening.sock"))
        ]


def test_a_folder_never_locked_has_no_holder(tmp_path: Path) -> None:
    assert posture.find(tmp_path / "audit" / "plant") is None


def as_nobody(read: Callable[[], object]) -> Any:
    """`read()` in a forked child that has become nobody, its result as JSON (a fork needs no
    interpreter that nobody may execute)."""
    nobody = pwd.getpwnam("nobody")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(reader)
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            os.write(writer, msgspec.json.encode(read()))
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: reads as another user (nobody)")
def test_another_user_is_told_what_it_cannot_read(tmp_path: Path) -> None:
    writer = tmp_path / "audit" / "plant"
    writer.mkdir(parents=True, mode=0o700)
    me = psutil.Process()
    with FolderLock(writer):
        lock, sockets = as_nobody(lambda: [posture.find(writer), posture.listening_of(me)])
    assert lock == {"unknown": f"{writer}: cannot read its lock: {writer}/.lock: Permission denied"}
    assert sockets == {"unknown": f"pid {me.pid}: its sockets may be read only by root or its user"}


# -- each half is its user's processes, found by the kernel's lock holder -----------------------


class Spawned:
    """Processes forked by a test, each told to exit when the test closes its pipe."""

    def __init__(self) -> None:
        self.children: list[int] = []
        self.controls: list[int] = []

    def start(
        self,
        user: str,
        *,
        lock: Path | None = None,
        listen: bool = False,
        child_listens: bool = False,
    ) -> list[tuple[int, int]]:
        """A process that takes `lock`'s folder lock as root (so the kernel records it), then
        becomes `user`; it listens with `listen`, and forks a listening child with
        `child_listens`. (pid, port or 0) of each, the process first."""
        control, stop = os.pipe()
        report, reported = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.closerange(3, control)
                os.closerange(control + 1, reported)
                os.closerange(reported + 1, 4096)
                _serve(user, lock, listen, child_listens, control, reported)
                code = 0
            finally:
                os._exit(code)
        self.children.append(pid)
        self.controls.append(stop)
        os.close(control)
        os.close(reported)
        with os.fdopen(report, "rb") as lines:
            found = [tuple(map(int, line.split())) for line in lines.read().splitlines()]
        assert len(found) == 1 + child_listens, found
        return [(p, port) for p, port in found]

    def stop(self) -> None:
        for stop in self.controls:
            os.close(stop)
        for pid in self.children:
            deadline = time.monotonic() + 10
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)


def _serve(
    user: str, lock: Path | None, listen: bool, child_listens: bool, control: int, report: int
) -> None:
    held = FolderLock(lock) if lock is not None else None
    account = pwd.getpwnam(user)
    os.setgroups([])
    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
    server = socket.create_server(("127.0.0.1", 0)) if listen else None
    port = server.getsockname()[1] if server is not None else 0
    os.write(report, f"{os.getpid()} {port}\n".encode())
    grandchild = os.fork() if child_listens else -1
    if grandchild == 0:
        code = 1
        try:
            own = socket.create_server(("127.0.0.1", 0))
            os.write(report, f"{os.getpid()} {own.getsockname()[1]}\n".encode())
            os.close(report)
            os.read(control, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(report)
    os.read(control, 1)  # until the test closes its end
    if grandchild > 0:
        os.waitpid(grandchild, 0)
    del held, server


@pytest.fixture
def spawned() -> Iterator[Spawned]:
    processes = Spawned()
    try:
        yield processes
    finally:
        processes.stop()


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: halves as other users")


@ROOT_ONLY
def test_every_process_of_a_halfs_user_is_counted_and_its_user_checked(
    tmp_path: Path, spawned: Spawned
) -> None:
    """The plant half as daemon, the enterprise half as nobody; another process of nobody's
    listens beside it, and the enterprise half wrote a decoy pid into its lock."""
    audit = tmp_path / "audit"
    [(plant, _)] = spawned.start("daemon", lock=audit / "plant")
    [(api, api_port)] = spawned.start("nobody", lock=audit / "enterprise", listen=True)
    [(helper, helper_port)] = spawned.start("nobody", listen=True)
    (audit / "enterprise" / ".lock").write_text("1\n")  # the file says pid 1; the kernel not

    users = {"plant": "daemon", "enterprise": "nobody"}.__getitem__  # as if the layout's
    found = posture.running(audit, ["plant", "enterprise"], users)
    enterprise = found["enterprise"]
    assert isinstance(enterprise, Process) and enterprise.pid == api
    assert {api, helper} <= set(enterprise.processes)
    assert isinstance(enterprise.listening, list)
    own, beside = Socket("tcp", "127.0.0.1", api_port), Socket("tcp", "127.0.0.1", helper_port)
    assert {own, beside} <= set(enterprise.listening)
    assert beside in sockets.compare([own], enterprise.listening).extra
    plant_half = found["plant"]
    assert isinstance(plant_half, Process) and plant_half.pid == plant
    assert plant_half.user == "daemon" and helper not in plant_half.processes
    # With the layout's users, which these are not: counted as their holders only.
    found = posture.running(audit, ["plant", "enterprise"])
    assert isinstance(enterprise := found["enterprise"], Process) and enterprise.processes == [api]
    assert posture.separation(found) == [
        f"plant: runs as daemon, expected {PLANT_USER}",
        f"enterprise: runs as nobody, expected {ENTERPRISE_USER}",
    ]


@ROOT_ONLY
def test_halves_sharing_a_user_are_each_their_holder_and_its_descendants(
    tmp_path: Path, spawned: Spawned
) -> None:
    audit = tmp_path / "audit"
    [(plant, _)] = spawned.start("nobody", lock=audit / "plant")
    (api, _), (child, child_port) = spawned.start(
        "nobody", lock=audit / "enterprise", child_listens=True
    )
    [(other, other_port)] = spawned.start("nobody", listen=True)

    users = {"plant": "nobody", "enterprise": "nobody"}.__getitem__
    found = posture.running(audit, ["plant", "enterprise"], users)
    enterprise, plant_half = found["enterprise"], found["plant"]
    assert isinstance(enterprise, Process) and isinstance(plant_half, Process)
    assert enterprise.processes == [api, child] and plant_half.processes == [plant]
    assert enterprise.listening == [Socket("tcp", "127.0.0.1", child_port)]
    assert plant_half.listening == []
    assert other_port and other not in enterprise.processes + plant_half.processes
    assert "plant and enterprise share user nobody: not separated" in posture.separation(found)


def test_the_lock_holder_is_read_from_the_kernels_record(tmp_path: Path) -> None:
    folder = tmp_path / "audit" / "plant"
    assert halves.holder(folder) is None  # never locked
    with FolderLock(folder):
        held = halves.holder(folder)
        assert held is not None and held.pid == os.getpid()
        lock = os.stat(folder / ".lock")
        text = halves.LOCKS.read_text()
        assert halves.writers(text, lock) == [os.getpid()]
        waiter = f"9: -> FLOCK  ADVISORY  WRITE 4242 {text.split()[5]} 0 EOF\n"
        assert halves.writers(waiter, lock) == []
    assert halves.holder(folder) is None  # released


# -- a writer's hostile audit segment -----------------------------------------------------------


def _checkpoint(**fields: object) -> bytes:
    entry = {"seq": 3, "time": "2026-01-01T00:00:00+00:00", "event": "audit_checkpoint"}
    entry["details"] = {"covers_seq": 2}
    return msgspec.json.encode({**entry, **fields}) + b"\n"


HOSTILE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "a time without its zone": (
        lambda s: s.write_bytes(_checkpoint(time="2026-12-05T00:00:00")),
        "last_checkpoint_age_s",
        "time of an entry has no time zone",
    ),
    "details not an object": (
        lambda s: s.write_bytes(_checkpoint(details="x")),
        "last_checkpoint_seq",
        "details of an entry is not an object",
    ),
    "a seq not an integer": (
        lambda s: s.write_bytes(_checkpoint(seq="3")),
        "last_seq",
        "seq of an entry is not an integer",
    ),
    "a seq that is a boolean": (
        lambda s: s.write_bytes(_checkpoint(seq=True)),
        "last_seq",
        "seq of an entry is not an integer",
    ),
    "invalid UTF-8": (
        lambda s: s.write_bytes(b'{"seq":1,"time":"\xff\xfe"}\n'),
        "last_seq",
        "an entry is not JSON",
    ),
    "deep nesting": (lambda s: s.write_bytes(b"[" * 100_000 + b"\n"), "last_seq", "not JSON"),
    "a huge segment": (
        lambda s: os.truncate(s, 0) if s.touch() else os.truncate(s, 257 * 2**20),
        "last_seq",
        "larger than",
    ),
    "a FIFO": (os.mkfifo, "last_seq", "not a regular file"),
    "a symbolic link": (
        lambda s: s.symlink_to("/dev/zero"),
        "last_seq",
        "Too many levels of symbolic links",
    ),
}


def test_hostile_audit_content_never_crashes_posture(deployment: Deployment) -> None:
    """Each case the newest segment of a writer folder of its own, all read by one run."""
    audit = config.load(deployment.config).audit.dir
    folders = {case: audit / f"hostile-{n}" for n, case in enumerate(HOSTILE)}
    for case, (plant_it, _, _) in HOSTILE.items():
        folders[case].mkdir(parents=True)
        plant_it(folders[case] / "0000000001.jsonl")
    started = time.monotonic()
    code, out = run_posture(deployment, "--json")  # no traceback: asserted there
    assert time.monotonic() - started < 30
    assert code == 1  # the halves do not run
    writers = json.loads(out)["audit"]["writers"]
    for case, (_, key, reason) in HOSTILE.items():
        found = writers[folders[case].name]
        assert reason in found.get(key, {}).get("unknown", ""), (case, found)
        assert found["running"] is False, case
    code, out = run_posture(deployment)
    assert code == 1
    lines = {line.split(":", 1)[0]: line for line in out.splitlines()}
    for folder in folders.values():
        line = lines[f"audit {folder.name}"]
        assert line.startswith(f"audit {folder.name}: not running, ") and "unknown (" in line

"""`dmzbroker posture`: real halves found by their folder locks, their sockets against the
manifest, what they accepted, island mode; the manifest comparison on its own."""

from __future__ import annotations

import json
import os
import pwd
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from broker import config
from broker.deployment import posture, sockets
from broker.deployment.posture import Process, Unknown
from broker.deployment.sockets import Socket, SocketCheck
from broker.folder_lock import FolderLock
from broker.policy import trustroot
from tests.harness import Deployment, Owners, dmzbroker, eventually, sign_policy

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

    code, out = run_posture(deployment, "--json")
    found = json.loads(out)
    assert code == 0, found["mismatches"]
    assert found["listening_matches_manifest"] is True and found["mismatches"] == []
    plant, api = found["halves"]["plant"], found["halves"]["enterprise"]
    assert plant["listening"] == [] == found["manifest"]["plant"]
    port = {"protocol": "tcp", "address": "127.0.0.1", "port": deployment.api_port}
    assert api["listening"] == [port] == found["manifest"]["enterprise"]
    assert api["pid"] == enterprise.process.pid
    me = pwd.getpwuid(os.geteuid()).pw_name
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
    code, out = run_posture(deployment, "--json")
    assert json.loads(out)["island_mode"] is True and code == 0

    assert enterprise.stop() == 0
    # A policy signed anew while the enterprise half is stopped (the running plant half may
    # reload it): the file is not what the enterprise half accepted.
    sign_policy(deployment.directory, {**document, "version": VERSION + 1}, signers)
    differences = posture.collect(cfg).policy.differences
    assert f"enterprise accepted version {VERSION}, the file is version {VERSION + 1}" in (
        differences
    )
    code, out = run_posture(deployment, "--json")
    found = json.loads(out)
    assert code == 1 and found["halves"]["enterprise"] is None
    assert found["sockets"]["enterprise"] is None
    assert "enterprise: not running" in found["mismatches"]
    assert found["audit"]["writers"]["enterprise"]["running"] is False

    code, out = run_posture(deployment)
    assert code == 1
    lines = out.splitlines()
    assert any(line.startswith("enterprise: NOT RUNNING") for line in lines), out
    assert "plant: pid " in out and "listening on nothing" in out
    assert lines[-1] == "posture: DOES NOT MATCH: enterprise: not running"


def test_a_socket_beyond_the_manifest_is_named_by_its_address() -> None:
    api = Socket("tcp", "127.0.0.1", 8443)
    extra = Socket("tcp", "0.0.0.0", 9999)
    check = sockets.compare([api], [api, extra])
    assert check == SocketCheck([api], [extra], [], matches=False)
    halves: dict[str, Process | Unknown | None] = {
        "plant": Process(1, "p", 1, [Socket("udp", "0.0.0.0", 47808)]),
        "enterprise": Process(2, "e", 2, [api, extra]),
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

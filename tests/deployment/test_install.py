"""deploy/install.sh and `dmzbroker run` as root: each half its own user, and the OS keeps the
enterprise user off everything of the plant's (ADR 0018).

Installs into a temporary root (the users are created on this system, as a package would, and
removed again if this test created them), provisions a full site there, builds an interpreter
the half users can run, starts `run` as root and probes as the enterprise user what it can
and cannot do to the plant half; every refusal has a positive control beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from broker.audit.segments import SUFFIX as AUDIT_SUFFIX
from broker.channel.spool import SUFFIX as SPOOL_SUFFIX
from broker.config import load
from broker.deployment.layout import (
    DIODE_USER,
    ENTERPRISE_USER,
    PLANT_USER,
    user_of,
    written_paths,
)
from broker.island import FLAG
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import (
    REPO,
    Owners,
    Pki,
    consumer_ssl,
    demo_policy,
    eventually,
    free_port,
    get_json,
    sign_policy,
    stop_process,
    write_config,
)

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0, reason="creates system users and runs the halves as them: needs root"
    ),
    pytest.mark.timeout(120),
]

INSTALL = REPO / "deploy" / "install.sh"
USERS = (ENTERPRISE_USER, DIODE_USER, PLANT_USER)  # the plant's group last: others are in it
STATE = Path("var/lib/dmzbroker")
ETC = Path("etc/dmzbroker")
SYSTEM_PYTHON = Path("/usr/bin/python3.11")  # the venv's is under /root, which they cannot enter

# Run as a half user: each probe is [name, operation, target, argument]; prints name → "ok" or
# the errno's name. Only the standard library, so the system interpreter runs it as anyone.
PROBE = r"""
import ctypes, errno, fcntl, json, os, sys
results = {}
for name, op, target, arg in json.loads(sys.argv[1]):
    try:
        if op == "create":
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        elif op == "append":
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND))
        elif op == "replace":  # a file of ours on the same file system, renamed over target
            os.close(os.open(arg, os.O_WRONLY | os.O_CREAT, 0o600))
            os.replace(arg, target)
        elif op == "flock":  # flock(2) needs only a descriptor, of any access mode
            fd = os.open(target, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        elif op == "read":
            with open(target, "rb") as f:
                f.read(1)
        elif op == "list":
            os.listdir(target)
        elif op == "kill":
            os.kill(int(target), int(arg))
        elif op == "ptrace":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
            if libc.ptrace(16, int(target), None, None) != 0:  # PTRACE_ATTACH
                raise OSError(ctypes.get_errno(), "ptrace")
            libc.ptrace(17, int(target), None, None)  # PTRACE_DETACH (never reached, we hope)
        elif op == "mem":
            os.close(os.open(f"/proc/{target}/mem", os.O_RDONLY))
        results[name] = "ok"
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(results))
"""


def _exists(database: Any, name: str) -> bool:
    try:
        database(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def system_users() -> Iterator[None]:
    """Remove, at the end, the users and groups install.sh created (never ones that existed)."""
    users = {u for u in USERS if not _exists(pwd.getpwnam, u)}
    groups = {g for g in USERS if not _exists(grp.getgrnam, g)}
    yield
    for user in USERS:  # members of the plant group before the plant user
        if user in users and _exists(pwd.getpwnam, user):
            subprocess.run(["userdel", user], check=True, capture_output=True)
    for group in USERS:
        if group in groups and _exists(grp.getgrnam, group):
            subprocess.run(["groupdel", group], check=True, capture_output=True)


@pytest.fixture
def root(system_users: None) -> Iterator[Path]:
    """A temporary root the half users can traverse (pytest's tmp_path is 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="dmzbroker-root-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True, text=True, timeout=60, check=check,
    )  # fmt: skip


def owner_and_mode(path: Path) -> tuple[str, str, int]:
    st = path.lstat()
    return (
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
        stat.S_IMODE(st.st_mode),
    )


def tree(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """Every path under root: owner, group, mode, mtime and content digest."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path)] = (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns, digest)
    return found


def test_install_creates_the_contracts_folders_and_a_second_run_changes_nothing(
    root: Path,
) -> None:
    first = install(root)
    assert "installed /etc/systemd/system/dmzbroker-plant.service" in first.stdout
    before = tree(root)
    second = install(root)
    assert tree(root) == before
    said = [line.removeprefix("install.sh: ") for line in second.stdout.splitlines()]
    assert [line.split()[0] for line in said] == ["role", "kept", "note:", "done;"], said
    assert set(os.listdir(root / "etc/systemd/system")) == {
        "dmzbroker-plant.service",
        "dmzbroker-enterprise.service",
    }
    state = root / STATE
    assert {
        str(path.relative_to(root)): owner_and_mode(path) for path in [state, *state.rglob("*")]
    } == {
        "var/lib/dmzbroker": ("root", "root", 0o755),
        "var/lib/dmzbroker/spool": (PLANT_USER, PLANT_USER, 0o750),
        "var/lib/dmzbroker/plant": (PLANT_USER, PLANT_USER, 0o700),
        "var/lib/dmzbroker/enterprise": (ENTERPRISE_USER, ENTERPRISE_USER, 0o700),
        "var/lib/dmzbroker/audit": ("root", PLANT_USER, 0o750),
        "var/lib/dmzbroker/audit/plant": (PLANT_USER, PLANT_USER, 0o750),
        "var/lib/dmzbroker/audit/enterprise": (ENTERPRISE_USER, ENTERPRISE_USER, 0o700),
        "var/lib/dmzbroker/audit/supervisor": ("root", PLANT_USER, 0o750),
    }
    # The same table as broker.deployment.layout, for the shipped configuration's folders.
    for process, folders in written_paths(load(REPO / "deploy" / "broker.yaml")).items():
        for folder in folders:
            assert owner_and_mode(root / folder.relative_to("/"))[0] == user_of(process), folder
    assert PLANT_USER in [g.gr_name for g in grp.getgrall() if ENTERPRISE_USER in g.gr_mem]
    assert pwd.getpwnam(PLANT_USER).pw_shell == "/usr/sbin/nologin"


def test_install_gives_the_enterprise_outputs_secrets_to_the_enterprise_user_alone(
    root: Path,
) -> None:
    install(root)
    etc = root / ETC
    secrets = [etc / "postgres" / "sink.key", etc / "postgres" / "owner-password",
               etc / "opcua-server" / "server-key.pem"]  # fmt: skip
    public = [etc / "postgres" / "sink.crt", etc / "opcua-server" / "server.pem"]
    for path in secrets + public:
        path.parent.mkdir(exist_ok=True)
        path.write_text("provisioned\n")
        path.chmod(0o644)
    link = etc / "postgres" / "linked-password"
    link.symlink_to(etc / "postgres" / "sink.crt")
    refused = install(root, check=False)
    assert refused.returncode != 0
    assert "is a symbolic link" in refused.stderr + refused.stdout
    link.unlink()
    install(root)
    for path in secrets:
        assert owner_and_mode(path) == (ENTERPRISE_USER, ENTERPRISE_USER, 0o600), path
    for path in public:  # certificates are not secrets: left as provisioned
        assert owner_and_mode(path) == ("root", "root", 0o644), path


def test_install_refuses_a_role_whose_unit_is_missing_before_changing_anything(
    root: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", copy, ignore=shutil.ignore_patterns("*diode-receive*"))
    result = subprocess.run(
        ["bash", str(copy / "install.sh"), "--root", str(root), "--role", "it-host"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"install.sh: error: role it-host needs {copy}/systemd/dmzbroker-diode-receive.service, "
        "which this copy of dmzbroker does not have\n"
    )
    assert os.listdir(root) == []
    assert install(root, "--role", "diode", check=False).returncode == 2


def provision(root: Path, pki: Pki, owners: Owners, device_port: int) -> tuple[Path, int]:
    """A full site under root/etc/dmzbroker, pointed at root/var/lib/dmzbroker: the config."""
    etc = root / ETC
    copies: dict[str, Path] = {}
    for name, source in (
        ("ca", pki.ca), ("server_cert", pki.server_cert), ("server_key", pki.server_key)
    ):  # fmt: skip
        copies[name] = Path(shutil.copy(source, etc / "tls" / source.name))
    trust_root = Path(shutil.copy(owners.trust_root, etc / "trust-root.yaml"))
    audit_key = Path(shutil.copy(owners.audit_key, etc / "audit.key"))
    shutil.copy(owners.audit_key.with_suffix(".pub"), etc / "audit.pub")
    envelope = sign_policy(etc, demo_policy(device_port), [owners.ot_key, owners.it_key])
    for public in (copies["ca"], copies["server_cert"], trust_root, etc / "audit.pub", envelope):
        public.chmod(0o644)
    api_port = free_port()
    config = write_config(
        etc,
        envelope,
        dataclasses.replace(pki, **copies),
        api_port,
        dataclasses.replace(owners, trust_root=trust_root, audit_key=audit_key),
    )
    document = yaml.safe_load(config.read_text())
    state = root / STATE
    document["spool"]["dir"] = str(state / "spool")
    document["plant"]["state_dir"] = str(state / "plant")
    document["enterprise"]["state_dir"] = str(state / "enterprise")
    document["audit"]["dir"] = str(state / "audit")
    config.write_text(yaml.safe_dump(document))
    config.chmod(0o644)
    return config, api_port


def runnable_interpreter(root: Path) -> Path:
    """A venv under root/opt/dmzbroker that any user can run, seeing this checkout's packages."""
    developed = Path(sysconfig.get_paths()["purelib"])
    for folder in (developed, REPO):
        blocked = [p for p in (folder, *folder.parents) if not p.stat().st_mode & stat.S_IXOTH]
        if blocked:
            pytest.skip(f"{blocked[0]} cannot be entered by the half users (not o+x)")
    venv = root / "opt" / "dmzbroker"
    subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "dmzbroker-dev.pth").write_text(
        f"import site; site.addsitedir({str(developed)!r})\n"
    )
    return python


def probe(user: str, probes: list[list[Any]]) -> dict[str, str]:
    entry = pwd.getpwnam(user)
    extra = [grp.getgrnam(PLANT_USER).gr_gid] if user == ENTERPRISE_USER else []
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-I", "-c", PROBE, json.dumps(probes)],
        user=entry.pw_uid, group=entry.pw_gid, extra_groups=extra, cwd="/",
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def listening(pid: int) -> list[str]:
    """Every listening socket of process `pid`: inet and inet6 (psutil), and unix ones (the
    kernel's flag for a listening socket in /proc/PID/net/unix, matched by inode)."""
    process = psutil.Process(pid)
    found = [
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in process.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000 and fields[6] in inodes:  # __SO_ACCEPTCON
            found.append(f"unix:{fields[7] if len(fields) > 7 else '(unnamed)'}")
    return found


ROOTS_SECRET = "DMZBROKER_TEST_ROOTS_SECRET"  # in run's environment, never in a half's


def start_run(python: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`dmzbroker run` as root (this process's user), as an operator or a unit would start it,
    with a variable of root's session in its environment and its stderr a regular file."""
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [str(python), "-m", "broker", "run", "--config", str(config), "--reset-state"],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=log.parent, start_new_session=True,
            env={**os.environ, ROOTS_SECRET: "s3cr3t", "HOME": "/root"},
        )  # fmt: skip


def dmzbroker_as_root(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI of the installed interpreter, as root."""
    return subprocess.run(
        [str(python), "-m", "broker", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def environment_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if p)


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name}: line for pid {pid}")


def supplementary_groups(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    raise AssertionError(f"no Groups: line for pid {pid}")


def halves_running(supervisor: psutil.Process) -> dict[str, psutil.Process]:
    """The supervisor's children that are halves (`-m broker plant|enterprise`), by half. Its
    other children come and go (the interpreter probe) and may be zombies when asked."""
    halves = {}
    for child in supervisor.children():
        with contextlib.suppress(psutil.NoSuchProcess):  # ZombieProcess is one
            argv = child.cmdline()
            if argv[2:4] == ["-m", "broker"] and argv[4:5] in (["plant"], ["enterprise"]):
                halves[argv[4]] = child
    return halves


async def test_run_as_root_starts_each_half_as_its_user_and_the_enterprise_cannot_touch_the_plant(
    root: Path, plant_sim: RefrigerationPlant, pki: Pki, owners: Owners
) -> None:
    install(root)
    config, api_port = provision(root, pki, owners, plant_sim.address[1])
    install(root)  # again, after provisioning: the secrets get their owners and modes
    etc = root / ETC
    assert owner_and_mode(etc / "tls" / "server.key") == (ENTERPRISE_USER, ENTERPRISE_USER, 0o600)
    # Root's alone (review r1 #5): the halves' first epochs are certified by root.
    assert owner_and_mode(etc / "audit.key") == ("root", "root", 0o600)
    python = runnable_interpreter(root)
    # By hand for the plant; `run` enrolls the enterprise half itself.
    enrolled = dmzbroker_as_root(
        python, "audit", "enroll", "--config", str(config), "--writer", "plant"
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert enrolled.stdout == f"plant: epoch 1 certified; its key belongs to {PLANT_USER}\n"
    plant_key = root / STATE / "audit" / "plant" / "epoch.key"
    assert owner_and_mode(plant_key) == (PLANT_USER, PLANT_USER, 0o600)

    log = root / "run.log"
    run = start_run(python, config, log)
    try:
        supervisor = psutil.Process(run.pid)
        halves: dict[str, psutil.Process] = {}

        async def data_crossed() -> bool:
            assert run.poll() is None, log.read_text()
            halves.update(halves_running(supervisor))
            with contextlib.suppress(OSError):
                status, body = await get_json(
                    f"https://localhost:{api_port}/v1/snapshot", consumer_ssl(pki)
                )
                return status == 200 and bool(body["records"])
            return False

        await eventually(data_crossed, timeout=40)
        plant, enterprise = halves["plant"], halves["enterprise"]
        plant_uid, enterprise_uid = (pwd.getpwnam(u).pw_uid for u in (PLANT_USER, ENTERPRISE_USER))
        assert tuple(plant.uids()) == (plant_uid,) * 3
        assert tuple(enterprise.uids()) == (enterprise_uid,) * 3
        assert supplementary_groups(enterprise.pid) == {grp.getgrnam(PLANT_USER).gr_gid}
        assert supplementary_groups(plant.pid) == set()
        assert supervisor.uids().effective == 0
        assert ROOTS_SECRET in environment_of(supervisor.pid)
        for half in (plant, enterprise):  # review r1 #6
            environment = environment_of(half.pid)
            assert ROOTS_SECRET not in environment
            assert environment["HOME"] == "/nonexistent"
            assert status_field(half.pid, "NoNewPrivs") == "1"
            # root's log file is not theirs to truncate: they write into a pipe run reads
            assert os.readlink(f"/proc/{half.pid}/fd/2").startswith("pipe:")

        state = root / STATE
        spool, plant_state, plant_audit = (
            state / "spool",
            state / "plant",
            state / "audit" / "plant",
        )
        segment = sorted(spool.glob(f"*{SPOOL_SUFFIX}"))[-1]
        audit_segment = sorted(plant_audit.glob(f"*{AUDIT_SUFFIX}"))[-1]
        # UMask 0027: the spool's segments are the plant's, readable by its group only.
        assert owner_and_mode(segment) == (PLANT_USER, PLANT_USER, 0o640)
        assert (plant_state / "policy-accepted.json").exists()
        scratch = str(state / "enterprise" / "probe")  # the enterprise user's own, same fs
        pid = plant.pid
        denied = probe(
            ENTERPRISE_USER,
            [
                ["create_in_spool", "create", str(spool / "intruder"), None],
                ["append_to_segment", "append", str(segment), None],
                ["replace_segment", "replace", str(segment), scratch],
                ["create_in_plant_state", "create", str(plant_state / "intruder"), None],
                ["replace_island_flag", "replace", str(plant_state / FLAG), scratch],
                ["create_in_plant_audit", "create", str(plant_audit / "intruder"), None],
                ["append_to_plant_audit", "append", str(audit_segment), None],
                ["signal_plant", "kill", pid, int(signal.SIGTERM)],
                ["ptrace_plant", "ptrace", pid, None],
                ["open_plant_memory", "mem", pid, None],
                # review r1 #1: holding a plant lock keeps the plant half from starting
                ["flock_spool_lock", "flock", str(spool / ".lock"), None],
                ["flock_plant_audit_lock", "flock", str(plant_audit / ".lock"), None],
                # review r1 #5: with the root key, it could rebuild its own log
                ["read_audit_key", "read", str(etc / "audit.key"), None],
                # positive controls: what the enterprise half needs
                ["list_spool", "list", str(spool), None],
                ["read_segment", "read", str(segment), None],
                ["read_plant_audit", "read", str(audit_segment), None],
            ],
        )
        assert denied == {
            "create_in_spool": "EACCES",
            "append_to_segment": "EACCES",
            "replace_segment": "EACCES",
            "create_in_plant_state": "EACCES",
            "replace_island_flag": "EACCES",
            "create_in_plant_audit": "EACCES",
            "append_to_plant_audit": "EACCES",
            "signal_plant": "EPERM",
            "ptrace_plant": "EPERM",
            "open_plant_memory": "EACCES",
            "flock_spool_lock": "EACCES",
            "flock_plant_audit_lock": "EACCES",
            "read_audit_key": "EACCES",
            "list_spool": "ok",
            "read_segment": "ok",
            "read_plant_audit": "ok",
        }
        # Positive controls: the same operations as the plant user succeed (signal 0 only
        # checks permission; the plant's own state stays untouched).
        assert probe(
            PLANT_USER,
            [
                ["append_to_segment", "append", str(segment), None],
                ["append_to_plant_audit", "append", str(audit_segment), None],
                ["signal_plant", "kill", pid, 0],
                ["open_plant_memory", "mem", pid, None],
            ],
        ) == dict.fromkeys(
            ["append_to_segment", "append_to_plant_audit", "signal_plant", "open_plant_memory"],
            "ok",
        )
        assert plant.is_running() and not (plant_state / FLAG).exists()

        # The plant half listens on nothing; the check finds the enterprise half's port.
        assert listening(plant.pid) == []
        assert f"127.0.0.1:{api_port}" in listening(enterprise.pid)

        assert stop_process(run, timeout=20) == 0
        assert not plant.is_running() and not enterprise.is_running()
    finally:
        stop_process(run, timeout=20)
    text = log.read_text()
    assert '"halves_share_user"' not in text
    assert '"audit_epoch_enrolled"' in text and '"plant_started"' in text  # halves' lines relayed
    verified = dmzbroker_as_root(
        python, "audit", "verify", str(root / STATE / "audit"), "--pubkey", str(etc / "audit.pub")
    )
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.splitlines()[-1] == "INTACT"

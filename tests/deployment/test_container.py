"""deploy/container/: two containers keep the halves apart as two users do on one host.

No container engine runs here, so the files are checked as documents: `problems()` reads the
compose file, the Containerfile, folders.sh, the containers' broker.yaml and the units' limits
together and names every way they would let one half reach the other's data, network or keys.
The shipped files give none; each broken variant gives its own.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import config
from broker.deployment.layout import written_paths

REPO = Path(__file__).parents[2]
CONTAINER = REPO / "deploy" / "container"
SYSTEMD = REPO / "deploy" / "systemd"
HALVES = ("plant", "enterprise")
NETWORK_OF = {"plant": "ot", "enterprise": "it"}
SECRETS_OF = {
    "plant": {"audit-key", "opcua-client-key"},
    "enterprise": {"audit-key", "tls-server-key"},
}
RUN_SECRETS = Path("/run/secrets")
INSTALLS = re.compile(r"\b(apt-get|apt|apk|dnf|yum|microdnf)\s+(-\S+\s+)*(install|add)\b")
COMPILER = re.compile(
    r"(?<![\w.-])(gcc|g\+\+|cc|clang|build-essential|make|cmake|rustc|cargo|[\w.+]+-dev)(?![\w.-])"
)
PLANT_ID, ENTERPRISE_ID = 10001, 10002


@dataclass(frozen=True)
class Shipped:
    compose: dict[str, Any]
    containerfile: str
    folders: str  # folders.sh
    cfg: config.BrokerConfig
    limits: dict[str, tuple[int, int]]  # half -> the unit's (TasksMax, MemoryMax in bytes)


def _unit_limits(half: str) -> tuple[int, int]:
    text = (SYSTEMD / f"dmzbroker-{half}.service").read_text()
    tasks = re.search(r"^TasksMax=(\d+)$", text, re.M)
    memory = re.search(r"^MemoryMax=(\S+)$", text, re.M)
    assert tasks and memory, f"dmzbroker-{half}.service: no TasksMax= or MemoryMax="
    return int(tasks[1]), _bytes(memory[1])


def _bytes(size: str | int) -> int:
    if isinstance(size, int):
        return size
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)[bB]?", size).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** " kmg".index(unit.lower() or " ")


def load_shipped() -> Shipped:
    return Shipped(
        compose=yaml.safe_load((CONTAINER / "compose.yaml").read_text()),
        containerfile=(CONTAINER / "Containerfile").read_text(),
        folders=(CONTAINER / "folders.sh").read_text(),
        cfg=config.load(CONTAINER / "etc" / "broker.yaml"),
        limits={half: _unit_limits(half) for half in HALVES},
    )


def _ids(user: object) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+):(\d+)", str(user))
    return (int(match[1]), int(match[2])) if match else None


def _mounts(service: dict[str, Any]) -> dict[Path, dict[str, Any]]:
    """Target -> mount (long syntax; the short one is refused, its modes are easy to misread)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if not isinstance(volume, dict):
            raise AssertionError(f"write volumes in the long syntax: {volume!r}")
        mounts[Path(volume["target"])] = volume
    return mounts


def _secret_paths(service: dict[str, Any]) -> dict[Path, str]:
    """Path in the container -> secret name."""
    paths = {}
    for secret in service.get("secrets", []):
        source, target = (
            (secret, secret)
            if isinstance(secret, str)
            else (
                secret["source"],
                secret.get("target", secret["source"]),
            )
        )
        paths[RUN_SECRETS / target] = source
    return paths


def _hardening(name: str, service: dict[str, Any]) -> list[str]:
    found = []
    if service.get("read_only") is not True:
        found.append(f"{name}: root file system not read-only")
    if "ALL" not in service.get("cap_drop", []):
        found.append(f"{name}: capabilities not all dropped")
    if service.get("cap_add"):
        found.append(f"{name}: adds capabilities {service['cap_add']}")
    options = {o.replace("=", ":") for o in service.get("security_opt", [])}
    if not options & {"no-new-privileges", "no-new-privileges:true"}:
        found.append(f"{name}: no no-new-privileges")
    if service.get("privileged"):
        found.append(f"{name}: privileged")
    for namespace in ("network_mode", "pid", "ipc", "userns_mode", "uts"):
        if service.get(namespace) == "host":
            found.append(f"{name}: shares the host's {namespace}")
    if not any(str(t).split(":")[0] == "/tmp" for t in service.get("tmpfs", [])):
        found.append(f"{name}: no tmpfs /tmp")
    ids = _ids(service.get("user"))
    if ids is None or 0 in ids:
        found.append(f"{name}: runs as root or as no fixed uid:gid ({service.get('user')!r})")
    if not service.get("restart"):
        found.append(f"{name}: no restart policy")
    etc = _mounts(service).get(Path("/etc/dmzbroker"))
    if etc is None or etc.get("read_only") is not True:
        found.append(f"{name}: configuration not mounted read-only at /etc/dmzbroker")
    return found


def _separation(services: dict[str, Any], cfg: config.BrokerConfig) -> list[str]:
    found = []
    plant, enterprise = services["plant"], services["enterprise"]
    plant_ids, enterprise_ids = _ids(plant.get("user")), _ids(enterprise.get("user"))
    if plant_ids and enterprise_ids and set(plant_ids) & set(enterprise_ids):
        found.append("plant and enterprise share a user or group")
    writes = written_paths(cfg)
    # The operator's commands (`island on`: the `cli` audit writer) run in the plant container.
    writes["plant"] += (cfg.audit.dir / "cli",)
    for half in HALVES:
        mounts = _mounts(services[half])
        writable = {t for t, m in mounts.items() if m["type"] != "bind" and not m.get("read_only")}
        for path in writes[half]:
            if path not in writable:
                found.append(f"{half}: writes {path}, but no writable volume is mounted there")
        for path in sorted(writable - set(writes[half])):
            found.append(f"{half}: {path} is writable, which the {half} half never writes")
    spool = _mounts(enterprise).get(cfg.spool.dir)
    if spool is None or spool.get("read_only") is not True:
        found.append(f"enterprise: the spool is not mounted read-only at {cfg.spool.dir}")
    elif spool["source"] != _mounts(plant).get(cfg.spool.dir, {}).get("source"):
        found.append("enterprise: its spool is not the volume the plant writes")
    if plant_ids and str(plant_ids[1]) not in map(str, enterprise.get("group_add", [])):
        found.append("enterprise: not in the plant's group: cannot read the spool")
    if enterprise_ids and str(enterprise_ids[1]) in map(str, plant.get("group_add", [])):
        found.append("plant: in the enterprise's group")
    return found


def _networks(services: dict[str, Any], port: int) -> list[str]:
    found = []
    for half in HALVES:
        service = services[half]
        networks = set(service.get("networks", {}))
        if networks != {NETWORK_OF[half]} or "network_mode" in service:
            found.append(
                f"{half}: on {sorted(networks) or service.get('network_mode')}, "
                f"not only {NETWORK_OF[half]}"
            )
    if services["plant"].get("ports") or services["plant"].get("expose"):
        found.append("plant: publishes ports (it listens on nothing)")
    ports = services["enterprise"].get("ports", [])
    targets = [p["target"] if isinstance(p, dict) else p for p in ports]
    if targets != [port]:
        found.append(f"enterprise: publishes {targets}, not only the listen port {port}")
    return found


def _secrets(services: dict[str, Any], cfg: config.BrokerConfig) -> list[str]:
    found = []
    needs = {
        "plant": [cfg.audit.key] + ([cfg.plant.opcua.private_key] if cfg.plant.opcua else []),
        "enterprise": [cfg.audit.key, cfg.enterprise.tls.key],
    }
    for half in HALVES:
        paths = _secret_paths(services[half])
        extra = set(paths.values()) - SECRETS_OF[half]
        if extra:
            found.append(f"{half}: gets the secrets {sorted(extra)}")
        for key in needs[half]:
            if key not in paths:
                found.append(f"{half}: {key} (in broker.yaml) is not one of its secrets")
    return found


def _limits(services: dict[str, Any], limits: dict[str, tuple[int, int]]) -> list[str]:
    found = []
    for half in HALVES:
        service = services[half]
        tasks, memory = limits[half]
        if service.get("pids_limit") != tasks:
            found.append(f"{half}: pids_limit {service.get('pids_limit')}, the unit's {tasks}")
        if _bytes(service.get("mem_limit", 0)) != memory:
            found.append(f"{half}: mem_limit {service.get('mem_limit')}, the unit's {memory}")
        if service.get("ulimits", {}).get("nofile", {}).get("hard") != 4096:
            found.append(f"{half}: no nofile limit of 4096 (the unit's LimitNOFILE=)")
    return found


def _others(services: dict[str, Any]) -> list[str]:
    """Any other service is a one-shot: started on demand only, on no network, keyless."""
    found = []
    for name, service in services.items():
        if name in HALVES:
            continue
        if not service.get("profiles"):
            found.append(f"{name}: started by `up` (no profile)")
        if service.get("network_mode") != "none" or service.get("networks"):
            found.append(f"{name}: on a network")
        if service.get("ports") or service.get("secrets"):
            found.append(f"{name}: publishes ports or gets secrets")
        if "ALL" not in service.get("cap_drop", []):
            found.append(f"{name}: capabilities not all dropped")
    return found


def _instructions(containerfile: str) -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", containerfile)
    lines = (line.strip() for line in text.splitlines())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _image(shipped: Shipped) -> list[str]:
    found = []
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(shipped.containerfile):
        if instruction[0] == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append(instruction)
    final = dict(stages[-1]) if stages else {}
    entrypoint = final.get("ENTRYPOINT", "")
    try:
        argv = json.loads(entrypoint)
    except json.JSONDecodeError:
        argv = []  # the shell form runs /bin/sh, not dmzbroker
    if not argv or Path(argv[0]).name != "dmzbroker":
        found.append(f"image: ENTRYPOINT {entrypoint!r} does not run dmzbroker")
    for instruction, arguments in stages[-1] if stages else []:
        if instruction == "RUN" and INSTALLS.search(arguments) and COMPILER.search(arguments):
            found.append(f"image: the final stage installs a compiler: {arguments}")
    if _ids(final.get("USER")) in (None, (0, 0)):
        found.append(f"image: final USER {final.get('USER')!r} is not a non-root uid:gid")
    uids = {}
    for instruction, arguments in stages[-1] if stages else []:
        for command in arguments.split("&&") if instruction == "RUN" else []:
            words = shlex.split(command)
            if words and words[0] == "useradd":
                uids[words[-1]] = int(words[words.index("--uid") + 1])
    script = dict(re.findall(r"^(PLANT|ENTERPRISE)=(\d+)", shipped.folders, re.M))
    for half in HALVES:
        ids = _ids(shipped.compose["services"][half].get("user"))
        uid = ids[0] if ids else None
        if uids.get(f"dmzbroker-{half}") != uid:
            found.append(
                f"image: dmzbroker-{half} is uid {uids.get(f'dmzbroker-{half}')}, not {uid}"
            )
        if script.get(half.upper()) != str(uid):
            found.append(f"folders.sh: {half} is {script.get(half.upper())}, not {uid}")
    return found


def problems(shipped: Shipped) -> list[str]:
    """Every way the container files break the separation; empty when they keep it."""
    services = shipped.compose.get("services", {})
    missing = [f"{half}: no such service" for half in HALVES if half not in services]
    if missing:
        return missing
    found = [p for half in HALVES for p in _hardening(half, services[half])]
    found += _separation(services, shipped.cfg)
    found += _networks(services, shipped.cfg.enterprise.listen.port)
    found += _secrets(services, shipped.cfg)
    found += _limits(services, shipped.limits)
    found += _others(services)
    found += _image(shipped)
    return found


@pytest.fixture(scope="module")
def shipped() -> Shipped:
    return load_shipped()


def test_the_shipped_files_keep_the_halves_apart(shipped: Shipped) -> None:
    assert problems(shipped) == []


def test_both_halves_share_one_hardened_base(shipped: Shipped) -> None:
    """The YAML anchor is what both services get: a change to it reaches both."""
    for half in HALVES:
        service = shipped.compose["services"][half]
        assert service["image"] == "dmzbroker:0.1.0"
        assert service["pull_policy"] == "never"
        assert service["command"][0] == half


def _service(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Shipped], Shipped]:
    def mutate(shipped: Shipped) -> Shipped:
        compose = copy.deepcopy(shipped.compose)
        change(compose["services"][name])
        return replace(shipped, compose=compose)

    return mutate


def _mount(target: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(service: dict[str, Any]) -> None:
        (mount,) = [v for v in service["volumes"] if v["target"] == target]
        mount.update(changes)

    return change


def _set(**changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda service: service.update(changes)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda service: service.pop(key)


def _containerfile(old: str, new: str) -> Callable[[Shipped], Shipped]:
    def mutate(shipped: Shipped) -> Shipped:
        assert old in shipped.containerfile
        return replace(shipped, containerfile=shipped.containerfile.replace(old, new))

    return mutate


SPOOL = "/var/lib/dmzbroker/spool"
BROKEN = {
    "enterprise writes the spool": (
        _service("enterprise", _mount(SPOOL, read_only=False)),
        "enterprise: /var/lib/dmzbroker/spool is writable",
    ),
    "enterprise without the spool": (
        _service("enterprise", lambda s: s["volumes"].pop(0)),
        "enterprise: the spool is not mounted read-only",
    ),
    "plant cannot write the spool": (
        _service("plant", _mount(SPOOL, read_only=True)),
        "plant: writes /var/lib/dmzbroker/spool, but no writable volume",
    ),
    "enterprise writes the plant's audit": (
        _service("enterprise", _mount("/var/lib/dmzbroker/audit/plant", read_only=False)),
        "enterprise: /var/lib/dmzbroker/audit/plant is writable",
    ),
    "enterprise reads another spool": (
        _service("enterprise", _mount(SPOOL, source="enterprise-state")),
        "not the volume the plant writes",
    ),
    "one user for both": (
        _service("enterprise", _set(user="10001:10001")),
        "plant and enterprise share a user or group",
    ),
    "plant as root": (_service("plant", _set(user="0:0")), "plant: runs as root"),
    "plant by name": (_service("plant", _set(user="dmzbroker-plant")), "plant: runs as root"),
    "enterprise not in the plant's group": (
        _service("enterprise", _drop("group_add")),
        "enterprise: not in the plant's group",
    ),
    "plant publishes a port": (
        _service("plant", _set(ports=["9100:9100"])),
        "plant: publishes ports",
    ),
    "plant on the IT network": (
        _service("plant", _set(networks={"ot": {}, "it": {}})),
        "plant: on ['it', 'ot'], not only ot",
    ),
    "plant on the host's network": (
        _service("plant", _set(network_mode="host")),
        "plant: shares the host's network_mode",
    ),
    "enterprise on the OT network": (
        _service("enterprise", _set(networks={"it": {}, "ot": {}})),
        "enterprise: on ['it', 'ot'], not only it",
    ),
    "enterprise publishes another port": (
        _service("enterprise", lambda s: s["ports"][0].update(target=8080)),
        "enterprise: publishes [8080], not only the listen port 8443",
    ),
    "plant root writable": (
        _service("plant", _set(read_only=False)),
        "plant: root file system not read-only",
    ),
    "enterprise root writable": (
        _service("enterprise", _drop("read_only")),
        "enterprise: root file system not read-only",
    ),
    "plant keeps capabilities": (
        _service("plant", _drop("cap_drop")),
        "plant: capabilities not all dropped",
    ),
    "enterprise adds one": (
        _service("enterprise", _set(cap_add=["NET_RAW"])),
        "enterprise: adds capabilities",
    ),
    "enterprise may gain privileges": (
        _service("enterprise", _set(security_opt=[])),
        "enterprise: no no-new-privileges",
    ),
    "plant privileged": (_service("plant", _set(privileged=True)), "plant: privileged"),
    "configuration writable": (
        _service("plant", _mount("/etc/dmzbroker", read_only=False)),
        "plant: configuration not mounted read-only",
    ),
    "TLS key in the plant": (
        _service("plant", lambda s: s["secrets"].append({"source": "tls-server-key"})),
        "plant: gets the secrets ['tls-server-key']",
    ),
    "OPC UA key in the enterprise": (
        _service("enterprise", lambda s: s["secrets"].append("opcua-client-key")),
        "enterprise: gets the secrets ['opcua-client-key']",
    ),
    "audit key missing from the enterprise": (
        _service("enterprise", lambda s: s["secrets"].pop(0)),
        "enterprise: /run/secrets/audit.key (in broker.yaml) is not one of its secrets",
    ),
    "plant without a task limit": (
        _service("plant", _drop("pids_limit")),
        "plant: pids_limit None, the unit's 64",
    ),
    "enterprise with more memory": (
        _service("enterprise", _set(mem_limit="4g")),
        "enterprise: mem_limit 4g",
    ),
    "init started by up": (_service("init", _drop("profiles")), "init: started by `up`"),
    "init on a network": (
        _service("init", _set(networks={"it": {}})),
        "init: on a network",
    ),
    "a compiler in the final stage": (
        _containerfile(
            "RUN /opt/dmzbroker/libexec/dmzbroker-folders",
            "RUN apt-get install -y --no-install-recommends gcc libffi-dev",
        ),
        "image: the final stage installs a compiler",
    ),
    "the entrypoint is a shell": (
        _containerfile(
            'ENTRYPOINT ["/opt/dmzbroker/bin/dmzbroker"]', 'ENTRYPOINT ["/bin/sh", "-c"]'
        ),
        "image: ENTRYPOINT",
    ),
    "the image runs as root": (_containerfile("USER 10001:10001", "USER 0:0"), "image: final USER"),
    "the image's ids differ": (
        _containerfile("--uid 10002", "--uid 10003"),
        "image: dmzbroker-enterprise is uid 10003, not 10002",
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_variant_is_named(shipped: Shipped, name: str) -> None:
    mutate, expected = BROKEN[name]
    found = problems(mutate(shipped))
    assert any(expected in problem for problem in found), found


def test_the_build_context_holds_only_what_the_containerfile_copies() -> None:
    """The context is the repository's root, where .venv and .demo (keys) also live."""
    ignore = (CONTAINER / "Containerfile.dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*"
    copied = [
        word
        for instruction, arguments in _instructions((CONTAINER / "Containerfile").read_text())
        if instruction == "COPY" and not arguments.startswith("--from")
        for word in shlex.split(arguments)[:-1]
    ]
    assert copied and all(f"!{path}" in rules for path in copied), (copied, rules)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the containers' ids needs root")
def test_folders_sh_gives_the_owners_and_modes_of_one_host(tmp_path: Path) -> None:
    """The table of docs/deployment.md (install.sh's), with the image's ids; run twice, and
    over a volume whose files a root process left behind."""
    root = tmp_path / "var" / "lib" / "dmzbroker"
    (root / "spool").mkdir(parents=True)
    left = root / "spool" / "00000001.seg"
    left.write_bytes(b"")
    script = CONTAINER / "folders.sh"
    for _ in range(2):
        subprocess.run(["sh", str(script), str(root)], check=True, timeout=30)
    plant, enterprise = PLANT_ID, ENTERPRISE_ID
    expected = {
        "": (0, 0, 0o755),
        "spool": (plant, plant, 0o750),
        "plant": (plant, plant, 0o700),
        "enterprise": (enterprise, enterprise, 0o700),
        "audit": (0, plant, 0o750),
        "audit/plant": (plant, plant, 0o750),
        "audit/cli": (plant, plant, 0o750),
        "audit/enterprise": (enterprise, enterprise, 0o700),
    }
    for folder, (uid, gid, mode) in expected.items():
        st = (root / folder).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), folder
    assert (left.stat().st_uid, left.stat().st_gid) == (plant, plant)

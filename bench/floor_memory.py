"""The floor bench's memory part: what the modules each of the three processes holds cost.

The modules each process held as deployed: `python -I -m broker run` (the supervisor) and
each half started on its own with the same config, through tests/test_footprint.py's runner
(sys.modules when the process ends), on a throwaway appliance at the like-for-like load with
the MQTT sink on, once records have reached MQTT and a /v1/stream consumer. They are then
imported into a fresh `python -I` in groups (asyncio and ssl; the rest of the standard
library; each library; the broker's own modules), RSS after each group, next to the RSS of
the processes as they ran (`run`, 5 s after the first record reached MQTT). bench/floor.py
runs it (`--parts memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
from footprint import MqttProbe, processes
from support import REPO, rss_bytes

from tests.test_footprint import LISTING_RUNNER

STARTED_TIMEOUT_S = 90.0  # for records to reach MQTT after the broker starts (a loaded machine)
LIBRARIES = {  # top-level module -> the library it is counted with, in the order added
    "cryptography": "cryptography", "_cffi_backend": "cryptography", "_openssl": "cryptography",
    "structlog": "structlog", "msgspec": "msgspec", "yaml": "PyYAML", "_yaml": "PyYAML",
    "pymodbus": "pymodbus", "serial": "pymodbus",
    "aiohttp": "aiohttp", "multidict": "aiohttp", "yarl": "aiohttp", "frozenlist": "aiohttp",
    "aiosignal": "aiohttp", "propcache": "aiohttp", "aiohappyeyeballs": "aiohttp",
    "idna": "aiohttp", "attr": "aiohttp",
    "aiomqtt": "aiomqtt/paho", "paho": "aiomqtt/paho",
    "prometheus_client": "prometheus_client", "casbin": "casbin", "simpleeval": "casbin",
    "wcmatch": "casbin", "bracex": "casbin",
}  # fmt: skip
# Imports the groups of modules named in a file (a line: label TAB names), printing the RSS
# after each. It imports nothing before the bare figure (`__import__` is a builtin), and
# refuses what `python -m broker` refuses (broker/__main__.py: rich, an optional import of
# structlog). Last line: the top-level packages it holds that the process did not.
IMPORTER = """
import sys
def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
print("bare python -I", rss(), "", sep="\\t")
sys.modules["rich"] = None
with open(sys.argv[1]) as lines:
    steps = [line.split("\\t") for line in lines.read().splitlines()]
for label, names in steps:
    failed = []
    for name in names.split():
        try:
            __import__(name)
        except Exception:
            failed.append(name)
    print(label, rss(), " ".join(failed), sep="\\t")
held = {name.partition(".")[0] for _, names in steps for name in names.split()}
extra = {name.partition(".")[0] for name, module in sys.modules.items() if module} - held
print("extra", 0, " ".join(sorted(extra)), sep="\\t")
"""


def imported(listing: Path) -> list[str]:
    """The modules in a process's sys.modules when it ended (tests/test_footprint.py's
    runner writes them), less the entry points."""
    return [n for n in listing.read_text().split() if not n.endswith(("__main__", "__mp_main__"))]


def import_steps(modules: list[str]) -> list[tuple[str, list[str]]]:
    """The modules in the groups they are imported and measured by."""
    stdlib, own, other = [], [], []
    libraries: defaultdict[str, list[str]] = defaultdict(list)
    for name in modules:
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            stdlib.append(name)
        elif top == "broker":
            own.append(name)
        elif top in LIBRARIES:
            libraries[LIBRARIES[top]].append(name)
        else:
            other.append(name)
    ordered = sorted(libraries, key=list(LIBRARIES.values()).index)
    others = sorted({n.partition(".")[0] for n in other})
    return [
        ("+ asyncio, ssl", ["asyncio", "ssl"]),
        ("+ rest of the stdlib it imports", stdlib),
        *((f"+ {library}", libraries[library]) for library in ordered),
        *([(f"+ other libraries ({', '.join(others)})", other)] if other else []),
        ("+ the broker's own modules", own),
    ]


def rss_after_imports(modules: list[str], workdir: Path, name: str) -> list[tuple[str, float, str]]:
    steps = workdir / f"{name}.steps"
    steps.write_text("".join(f"{label}\t{' '.join(n)}\n" for label, n in import_steps(modules)))
    out = subprocess.run([sys.executable, "-I", "-c", IMPORTER, str(steps)], check=True,
                         capture_output=True, text=True, cwd=REPO).stdout  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines()]
    return [(label, float(mb), failed) for label, mb, failed in rows]


@contextlib.contextmanager
def listed(workdir: Path, name: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`python -I -m broker ARGS` through tests/test_footprint.py's runner, which writes its
    sys.modules to `workdir/NAME.modules` when it ends (its children start as they would);
    stderr in `workdir/NAME.stderr`; SIGTERM at the end (SIGKILL after 30 s)."""
    with (workdir / f"{name}.stderr").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", LISTING_RUNNER, str(workdir / f"{name}.modules"),
             *args, "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
        )  # fmt: skip
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def until_flowing(
    api: int, context: ssl.SSLContext, probe: MqttProbe, running: list[subprocess.Popen[bytes]]
) -> None:
    """Until records reached MQTT and one /v1/stream read gave bytes (so every module the
    data path imports late is in); raises if a process ended or STARTED_TIMEOUT_S passed."""
    deadline = time.monotonic() + STARTED_TIMEOUT_S
    streamed = False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while not (streamed and probe.events):
            if time.monotonic() > deadline or any(p.poll() is not None for p in running):
                raise RuntimeError("the broker did not deliver records: see the .stderr files")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                url = f"https://127.0.0.1:{api}/v1/stream"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    streamed = r.status == 200 and bool(await r.content.readany())
            await asyncio.sleep(0.2)


def measure_memory(
    workdir: Path, config: Path, api: int, mqtt: int, context: ssl.SSLContext
) -> None:
    """Prints the RSS of each process's imports, group by group, and of the processes as
    they ran: the appliance of `config` in `workdir`, its API on port `api` (a consumer's
    `context`), Mosquitto on port `mqtt`."""
    common = ("--config", str(config), "--reset-state")
    probe = MqttProbe(mqtt, context)
    try:
        with listed(workdir, "supervisor", "run", *common, "--same-user") as run:
            asyncio.run(until_flowing(api, context, probe, [run]))
            time.sleep(5)
            running = {role: rss_bytes(p.pid) / 1e6
                       for role, p in processes(psutil.Process(run.pid)).items()}  # fmt: skip
        probe.events.clear()
        with (
            listed(workdir, "plant", "plant", *common) as plant,
            listed(workdir, "enterprise", "enterprise", *common) as enterprise,
        ):
            asyncio.run(until_flowing(api, context, probe, [plant, enterprise]))
    finally:
        probe.close()
    modules = {role: imported(workdir / f"{role}.modules") for role in running}
    modules["one process, all three's"] = list(
        dict.fromkeys(name for names in modules.values() for name in names)
    )
    print("\nRSS (MB) of a fresh `python -I` after importing, group by group, the modules each "
          "process held as deployed")  # fmt: skip
    for role, names in modules.items():
        print(f"\n{role}: {len(names)} modules")
        for label, mb, failed in rss_after_imports(names, workdir, role.split()[0]):
            if label == "extra":
                extra = [
                    n
                    for n in failed.split()
                    if n not in (*sys.stdlib_module_names, "__main__", "__mp_main__")
                ]
                if extra:
                    print(f"  held here, not by the process: {', '.join(extra)}")
                continue
            note = f"  (not importable by name: {failed})" if failed else ""
            print(f"  {mb:6.1f}  {label}{note}")
        if role in running:
            print(f"  {running[role]:6.1f}  the process as it ran (`run`, like-for-like load)")
    print(
        f"\n  {sum(running.values()):6.1f}  the three processes as they ran, together "
        "(target <= 67)"
    )

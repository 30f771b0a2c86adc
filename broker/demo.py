"""`dmzbroker demo`: a throwaway PKI and owner keys, the example policy co-signed, the
simulated plant, and the broker running on it.

Everything lives in a work directory that is recreated on each run (only if it holds the
demo's marker file, so a mistyped --workdir never deletes someone's files).
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
from pathlib import Path

import aiohttp
import structlog
import yaml

from broker import policy
from broker.errors import ConfigError, DmzBrokerError
from broker.policy import Policy, trustroot
from broker.policy import envelope as envelopes
from broker.sim.refrigeration import RefrigerationPlant
from broker.supervisor import Supervisor
from broker.trust import certs, keys, tls

MARKER = ".dmzbroker-demo"
CONSUMER_URI = "spiffe://demo/consumer/historian"
READY_TIMEOUT_S = 30.0

log = structlog.get_logger("demo")


async def run_demo(workdir: Path, policy_path: Path, seconds: float | None, port: int) -> int:
    demo_policy = policy.load(policy_path)
    device = demo_policy.devices[0]
    _recreate(workdir)
    pki = workdir / "certs"
    ca = certs.init_ca(pki, "dmzbroker demo CA", days=30)
    certs.issue_server(pki, pki, name="server", dns=["localhost"], ips=["127.0.0.1"], days=30)
    client = certs.issue_client(pki, pki, name="historian", uri=CONSUMER_URI, days=30)
    _co_sign(demo_policy, workdir)
    config_path = _write_config(workdir, port)

    plant = RefrigerationPlant(device.host, device.port, device.unit_id)
    try:
        await plant.start()
    except RuntimeError as e:
        raise ConfigError(
            f"cannot start the simulated plant on {device.host}:{device.port}: is the port in use?"
        ) from e
    supervisor = Supervisor(config_path, "auto")
    try:
        await supervisor.start()
        url = f"https://localhost:{port}/v1/snapshot"
        ready = asyncio.create_task(_wait_ready(url, ca.cert, client.cert, client.key))
        exited = asyncio.create_task(supervisor.wait())
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            ready.cancel()
            return exited.result()
        ready.result()
        print(
            "\nThe broker is running. Ask it for the latest value of every signal:\n\n"
            f"curl --cert {shlex.quote(str(client.cert))} --key {shlex.quote(str(client.key))} "
            f"--cacert {shlex.quote(str(ca.cert))} {url}\n",
            flush=True,
        )
        try:
            async with asyncio.timeout(seconds):  # None: no limit
                return await exited
        except TimeoutError:
            return 0
    finally:
        await supervisor.stop()
        await plant.stop()


def _recreate(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists():
            raise ConfigError(
                f"{workdir}: exists and is not a demo directory; choose another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()


def _co_sign(demo_policy: Policy, workdir: Path) -> None:
    """What an OT owner and an IT owner do by hand (docs/policy.md), done for the demo."""
    owners = workdir / "owners"
    ot = keys.generate(owners, "Demo OT owner", "ot", passphrase=None)
    it = keys.generate(owners, "Demo IT owner", "it", passphrase=None)
    (workdir / "trust-root.yaml").write_text(
        trustroot.render(
            demo_policy.deployment_id,
            [("Demo OT owner", "ot", ot.public), ("Demo IT owner", "it", it.public)],
        )
    )
    envelope = envelopes.compile_policy(demo_policy)
    for owner in (ot, it):
        envelope = envelopes.sign(envelope, keys.load_private(owner.private, passphrase=None))
    envelopes.write(envelope, workdir / "policy.dsse.json")


def _write_config(workdir: Path, port: int) -> Path:
    path = workdir / "broker.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "policy": "policy.dsse.json",
                "trust_root": "trust-root.yaml",
                "spool": {"dir": "spool"},
                "plant": {"state_dir": "plant-state"},
                "enterprise": {
                    "state_dir": "enterprise-state",
                    "listen": {"host": "127.0.0.1", "port": port},
                    "tls": {
                        "cert": "certs/server.crt",
                        "key": "certs/server.key",
                        "client_ca": "certs/ca.crt",
                    },
                },
            },
            sort_keys=False,
        )
    )
    return path


async def _wait_ready(url: str, ca: Path, cert: Path, key: Path) -> None:
    """Until the API answers over mTLS with at least one record (proves the whole path)."""
    ssl_context = tls.client_context(ca, cert, key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            try:
                async with session.get(url, ssl=ssl_context) as response:
                    if response.status == 200 and (await response.json())["records"]:
                        return
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.2)
    raise DmzBrokerError(f"no data at {url} after {READY_TIMEOUT_S:.0f} s; see the log above")

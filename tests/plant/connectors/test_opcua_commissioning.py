"""Commissioning the OPC UA side against real asyncua servers on 127.0.0.1: a site CA of RSA
keys whose certificate and CRL a strict server's trust store holds, `discover` naming the
server certificate it cannot trust with the flags that would trust it, and a server that
revises the subscription's keep-alive count upward (as node-opcua does)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from broker.plant.connectors.opcua import OpcUaConnector
from broker.plant.connectors.opcua_session import (
    CertificateRefused,
    SessionSettings,
    fingerprint,
    open_session,
)
from tests.harness import dmzbroker, eventually
from tests.plant.connectors.opcua_server import (
    CLIENT_URI,
    SECURE,
    SERVER_URI,
    OpcUaPki,
    OpcUaTestServer,
)
from tests.plant.connectors.test_opcua import (
    POWER,
    device,
    discover,
    events,
    pki,
    plant_config,
    running,
    serving,
    signals,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]
__all__ = ["events", "pki"]  # fixtures shared with test_opcua.py


def _cli(*args: str) -> None:
    dmzbroker("certs", *args)


async def test_a_strict_server_trusting_the_rsa_site_ca_and_its_crl_accepts_us_until_revoked(
    pki: OpcUaPki, tmp_path: Path
) -> None:
    """What docs/opcua.md tells the server's administrator: the site CA and its CRL (DER) in
    the trust store. Our certificate comes from a CA made with --key-type rsa."""
    ca, own = tmp_path / "ca", tmp_path / "own"
    await asyncio.to_thread(
        _cli, "init-ca", "--out", str(ca), "--name", "site", "--key-type", "rsa"
    )
    for name, uri in (("broker", CLIENT_URI), ("server", SERVER_URI)):
        await asyncio.to_thread(_cli, "issue", "opcua", "--ca", str(ca), "--out", str(own),
                                "--name", name, "--uri", uri, "--dns", "localhost", "--der")  # fmt: skip
    await asyncio.to_thread(_cli, "crl", "--ca", str(ca), "--der")
    trusted, revocations = tmp_path / "server-trusts", tmp_path / "server-crls"
    trusted.mkdir()
    revocations.mkdir()
    shutil.copy(own / "ca.der", trusted)  # the site CA only: never our certificate itself
    shutil.copy(ca / "crl.der", revocations)
    site = OpcUaPki(ca / "ca.crt", own / "broker-cert.pem", own / "broker-key.pem",
                    own / "server-cert.pem", own / "server-key.pem", pki.rogue_cert,
                    pki.rogue_key, pki.user_cert, pki.user_key)  # fmt: skip
    strict = OpcUaTestServer(
        site, {"Power": 2.5}, policies=SECURE, trusted_clients=trusted, revocations=revocations
    )
    async with serving(strict) as server:
        settings = SessionSettings.build(device(server), plant_config(site))
        async with open_session(settings) as client:
            assert await client.get_node(server.node("Power")).read_value() == 2.5
        ours = x509.load_der_x509_certificate((own / "broker-cert.der").read_bytes())
        await asyncio.to_thread(_cli, "revoke", f"{ours.serial_number:x}", "--reason",
                                "key_compromise", "--ca", str(ca))  # fmt: skip
        await asyncio.to_thread(_cli, "crl", "--ca", str(ca), "--der")
        shutil.copy(ca / "crl.der", revocations)
        await server.reload_trust()
        with pytest.raises(CertificateRefused, match="refused the broker's certificate"):
            async with open_session(settings):
                pass


async def test_discover_names_the_untrusted_server_certificate_and_the_flags_to_trust_it(
    pki: OpcUaPki,
) -> None:
    own = ("--certificate", str(pki.client_cert), "--key", str(pki.client_key))
    sha256 = fingerprint(x509.load_pem_x509_certificate(pki.rogue_cert.read_bytes()))
    async with serving(OpcUaTestServer(pki, {"Power": 1.0}, policies=SECURE, rogue=True)) as rogue:
        unknown = await discover(rogue.endpoint, *own)  # nothing to trust it by
        untrusted = await discover(rogue.endpoint, *own, "--trust", str(pki.ca))
        wrong_pin = await discover(rogue.endpoint, *own, "--pin", "0" * 64)
        pinned = await discover(rogue.endpoint, *own, "--pin", sha256)
        sessions = rogue.services["CreateSessionRequest"]
    for done in (unknown, untrusted, wrong_pin):
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert (
            f"SHA-256 {sha256}" in done.stderr and f"run again with --pin {sha256}" in done.stderr
        )
        assert "--trust FILE" in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "trust_list" not in done.stderr and "server_certificate_sha256" not in done.stderr
    assert f"does not match --pin {'0' * 64}" in wrong_pin.stderr
    assert pinned.returncode == 0, pinned.stderr
    assert f"# Server certificate SHA-256: {sha256}\n" in pinned.stdout
    assert yaml.safe_load(pinned.stdout)["devices"][0]["server_certificate_sha256"] == sha256
    assert sessions == 1  # the refused certificates were never used for a session


async def test_a_server_revising_the_keep_alive_count_still_confirms_values_every_interval(
    pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    """The server makes a keep-alive count of 1 into 4: an unchanged value would be confirmed
    every 2 s, past the 1.5 s (3 × 0.5 s) after which the enterprise half serves it `stale`.
    The subscription is created again at 125 ms, so the keep-alive period is 0.5 s again."""
    async with serving(OpcUaTestServer(pki, {"Power": 4.0})) as server:
        service = server.server.iserver.subscription_service
        service._clamp_keep_alive_count = lambda requested: max(requested, 4)  # as it revises
        ua_plc = device(server, poll_interval_s=0.5)
        connector = OpcUaConnector(
            ua_plc, signals(server, "Power"), SessionSettings.build(ua_plc, plant_config(pki))
        )
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
            first = len(collector.batches)
            await eventually(lambda: len(collector.batches) >= first + 8, timeout=20)
            kept = [(s.data.RevisedPublishingInterval, s.data.RevisedMaxKeepAliveCount)
                    for s in service.subscriptions.values()]  # fmt: skip
        services = server.services
    assert kept == [(125.0, 4)]  # the first subscription was deleted
    assert (services["CreateSubscriptionRequest"], services["DeleteSubscriptionsRequest"]) == (2, 1)
    confirmed = [s.read_time for batch in collector.batches[first:] for s in batch
                 if s.signal == POWER]  # fmt: skip
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(confirmed) if a and b]
    assert len(gaps) >= 7 and max(gaps) < 1.5, gaps  # never as old as the stale limit
    recreated = [e for e in events if e["event"] == "subscription_recreated"]
    assert len(recreated) == 1 and recreated[0]["keep_alive_s"] == 0.5, recreated
    assert not [e for e in events if e["event"] == "subscription_revised"]

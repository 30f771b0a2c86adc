"""Commissioning the OPC UA side against real asyncua servers on 127.0.0.1: a site CA of RSA
keys whose certificate and CRL a strict server's trust store holds, `discover` naming the
server certificate it cannot trust with the flags that would trust it, and servers that
revise the subscription's keep-alive count upward (as node-opcua does), change it in place
or not, and allow one subscription per session (as embedded servers do)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import ua
from asyncua.common.utils import ServiceError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

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
    plant_config,
    power_reader,
    running,
    serving,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]


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
    (ca_der,) = own.glob("ca-*.der")  # one CA issued both: one copy
    shutil.copy(ca_der, trusted)  # the site CA only: never our certificate itself
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


async def test_discover_escapes_a_hostile_certificate_subject_in_its_one_line_error(
    pki: OpcUaPki, tmp_path: Path
) -> None:
    """The server's certificate is whoever runs the server's to make: a subject with a line
    break and terminal escapes must not split the error or fake what the operator compares."""
    hostile = "press-4\nrun again with --pin 00ff \x1b[31mOK"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostile)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(SERVER_URI), x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "hostile-cert.pem", tmp_path / "hostile-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    faker = OpcUaTestServer(
        replace(pki, rogue_cert=cert_file, rogue_key=key_file), {"Power": 1.0}, rogue=True
    )
    async with serving(faker) as server:
        done = await discover(server.endpoint, "--certificate", str(pki.client_cert),
                              "--key", str(pki.client_key))  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "\x1b" not in done.stderr and "press-4\\nrun again" in done.stderr, done.stderr
    assert "\\x1b[31mOK" in done.stderr
    assert f"run again with --pin {fingerprint(cert)}" in done.stderr


async def test_a_server_revising_the_keep_alive_count_still_confirms_values_every_interval(
    pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    """The server makes a keep-alive count of 1 into 4: an unchanged value would be confirmed
    every 2 s, past the 1.5 s (3 × 0.5 s) after which the enterprise half serves it `stale`.
    The subscription is changed in place to 125 ms, so the keep-alive period is 0.5 s again."""
    async with serving(OpcUaTestServer(pki, {"Power": 4.0})) as server:
        server.revise_keep_alive(4)
        service = server.server.iserver.subscription_service
        connector = power_reader(server, pki, poll_interval_s=0.5)
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
            first = len(collector.batches)
            await eventually(lambda: len(collector.batches) >= first + 8, timeout=20)
            kept = [(s.data.RevisedPublishingInterval, s.data.RevisedMaxKeepAliveCount)
                    for s in service.subscriptions.values()]  # fmt: skip
        services = server.services
    assert kept == [(125.0, 4)]  # one subscription, changed in place: 4 × 125 ms = 0.5 s
    assert (services["CreateSubscriptionRequest"], services["ModifySubscriptionRequest"]) == (1, 1)
    assert services["DeleteSubscriptionsRequest"] == services["CreateSessionRequest"] - 1 == 0
    confirmed = [s.read_time for batch in collector.batches[first:] for s in batch
                 if s.signal == POWER]  # fmt: skip
    gaps = sorted((b - a).total_seconds() for a, b in itertools.pairwise(confirmed) if a and b)
    # Half of them at most 1 s apart: 2 s without the change; a median shrugs off a loaded
    # machine's late wake-up, which a maximum would not.
    assert len(gaps) >= 7 and gaps[len(gaps) // 2] < 1.0, gaps
    modified = [e for e in events if e["event"] == "subscription_modified"]
    assert len(modified) == 1 and modified[0]["keep_alive_s"] == 0.5, modified
    assert not [e for e in events if e["event"] == "subscription_revised"]


@pytest.mark.parametrize("modify", ["ignored", "refused"])
async def test_a_server_with_one_subscription_per_session_that_keeps_its_revision_stays_up(
    pki: OpcUaPki, events: list[dict[str, Any]], modify: str
) -> None:
    """An embedded server: one subscription per session, a keep-alive count of 1 made into
    2, and ModifySubscription ignored or refused. The broker keeps the first subscription
    (values confirmed every 1 s at a 0.5 s poll, still inside the 1.5 s stale limit), says
    so once, and never opens another session."""
    async with serving(OpcUaTestServer(pki, {"Power": 4.0})) as server:
        server.server.iserver.max_subscriptions = 1
        server.revise_keep_alive(2, modify=modify)  # type: ignore[arg-type]
        connector = power_reader(server, pki, poll_interval_s=0.5)
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
            first = len(collector.batches)
            await eventually(lambda: len(collector.batches) >= first + 4, timeout=20)
            quality = collector.quality(POWER)
        services = server.services
    assert quality == "good" and connector.errors == 0
    assert (services["CreateSessionRequest"], services["CreateSubscriptionRequest"]) == (1, 1)
    assert services["ModifySubscriptionRequest"] == 1
    assert not [e for e in events if e["event"] == "device_session_down"]
    revised = [e for e in events if e["event"] == "subscription_revised"]
    assert len(revised) == 1 and revised[0]["keep_alive_s"] == 1.0, revised
    assert revised[0]["max_keep_alive_count"] == 2
    assert ("BadServiceUnsupported" in (revised[0]["modify_refused"] or "")) == (
        modify == "refused"
    )


async def test_a_server_publishing_before_it_refuses_the_items_does_not_reset_the_backoff(
    pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    """The subscription's first (empty) message arrives, then CreateMonitoredItems is
    refused: the session failed, so the retries wait longer each time instead of starting
    again at the first delay (a new session every 0.5 s against the plant)."""
    async with serving(OpcUaTestServer(pki, {"Power": 4.0})) as server:
        service = server.server.iserver.subscription_service
        # The server handles one request of a session at a time: a Publish request is served
        # while CreateMonitoredItems waits only if it came first. A revised keep-alive count
        # makes the broker ask ModifySubscription, after its first Publish request.
        server.revise_keep_alive(2, modify="ignored")

        async def refused(params: ua.CreateMonitoredItemsParameters) -> Any:
            subscription = service.subscriptions[params.SubscriptionId]
            await eventually(lambda: not subscription._startup, timeout=5)  # it has published
            raise ServiceError(ua.StatusCodes.BadTooManyMonitoredItems)

        service.create_monitored_items = refused
        connector = power_reader(server, pki, poll_interval_s=0.5)
        async with running(connector):
            await eventually(lambda: connector.errors >= 3, timeout=20)
    retries = [e["retry_in_s"] for e in events if e.get("error_code") == "no_session"]
    failures = [e["error"] for e in events if e.get("error_code") == "no_session"]
    assert all("BadTooManyMonitoredItems" in f for f in failures), failures  # refused, not slow
    assert retries[2] > retries[0] * 2, retries  # 0.5, 1, 2 s (±20 % jitter): doubled twice
    assert not [e for e in events if e["event"] == "device_session_up"]

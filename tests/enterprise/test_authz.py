"""Each consumer sees exactly what the policy grants the one URI in its certificate."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from pathlib import Path

import aiohttp
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import policy
from broker.policy.access import Access
from tests.enterprise.served import POWER, ROOM, Api, get, record
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    ENERGY_URI,
    STRANGER_URI,
    eventually,
    keep_alive_get,
    read_events,
)

DEMO = policy.load(DEMO_POLICY)
ENERGY_VIEW = Access(DEMO).visible_to(ENERGY_URI)


def test_the_energy_role_grants_what_its_patterns_say() -> None:
    assert {
        "coldstore/machine-room/compressor-1/motor_power",
        "coldstore/machine-room/compressor-1/energy",
        "coldstore/outdoor/weather/ambient_temperature",
        "coldstore/outdoor/weather/relative_humidity",
    } == ENERGY_VIEW


async def test_a_consumer_sees_only_its_signals_everywhere(api: Api) -> None:
    api.store.apply([record(s.path, 1.0, i + 1) for i, s in enumerate(DEMO.signals)])
    energy = api.client_ssl(api.pki.energy_cert, api.pki.energy_key)
    _, signals = await get(api, "/v1/signals", energy)
    assert {s["path"] for s in signals["signals"]} == ENERGY_VIEW  # type: ignore[index]
    _, snapshot = await get(api, "/v1/snapshot", energy)
    assert {r["signal"] for r in snapshot["records"]} == ENERGY_VIEW  # type: ignore[index]
    status, _ = await get(api, f"/v1/signals/{POWER}", energy)
    assert status == 200


async def test_a_signal_outside_the_view_is_403_whether_or_not_it_exists(api: Api) -> None:
    api.store.apply([record(ROOM, -18.0, 1)])
    energy = api.client_ssl(api.pki.energy_cert, api.pki.energy_key)
    with structlog.testing.capture_logs() as logs:
        existing, _ = await get(api, f"/v1/signals/{ROOM}", energy)
        missing, _ = await get(api, "/v1/signals/coldstore/nowhere/nothing", energy)
    assert existing == missing == 403
    denials = [e for e in logs if e["event"] == "consumer_denied"]
    assert [d["signal"] for d in denials] == [ROOM, "coldstore/nowhere/nothing"]
    assert {d["identity"] for d in denials} == {ENERGY_URI}
    assert all(d["serial"] and d["remote"] == "127.0.0.1" for d in denials)


@pytest.mark.parametrize(
    "path", ["/v1/signals", "/v1/snapshot", f"/v1/signals/{ROOM}", "/v1/stream", "/metrics"]
)
async def test_an_identity_the_policy_does_not_name_is_refused_every_route_once_audited(
    api: Api, path: str
) -> None:
    """A valid certificate the policy does not name is no consumer: 403, never an empty view
    (an empty stream would hold a `max_streams` slot), one denial per request."""
    api.store.apply([record(ROOM, -18.0, 1)])
    stranger = api.client_ssl(api.pki.stranger_cert, api.pki.stranger_key)
    with structlog.testing.capture_logs() as logs:
        status, body = await get(api, path, stranger)
    assert status == 403 and set(body) == {"error"}  # type: ignore[arg-type]
    denials = [e for e in logs if e["event"] == "consumer_denied"]
    assert [(d["reason"], d["identity"]) for d in denials] == [("unknown_identity", STRANGER_URI)]
    assert not api.store.subscriptions


async def test_an_identity_the_policy_does_not_name_still_reads_the_api_description(
    api: Api,
) -> None:
    stranger = api.client_ssl(api.pki.stranger_cert, api.pki.stranger_key)
    with structlog.testing.capture_logs() as logs:
        status, _ = await get(api, "/v1/openapi.json", stranger)
    assert status == 200
    assert not [e for e in logs if e["event"] == "consumer_denied"]


def certificate_with(pki_ca: Path, out: Path, sans: list[x509.GeneralName]) -> tuple[Path, Path]:
    """A client certificate from the test CA that our own CLI refuses to issue."""
    ca_cert = x509.load_pem_x509_certificate(pki_ca.read_bytes())
    ca_key = serialization.load_pem_private_key((pki_ca.parent / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "historian")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out.mkdir(exist_ok=True)
    (out / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "c.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out / "c.crt", out / "c.key"


@pytest.mark.parametrize(
    ("sans", "reason"),
    [
        ([], "no_uri_san"),
        ([x509.DNSName("historian.example")], "no_uri_san"),
        (
            [
                x509.UniformResourceIdentifier("spiffe://demo/consumer/historian"),
                x509.UniformResourceIdentifier("spiffe://demo/consumer/energy-dashboard"),
            ],
            "several_uri_sans",
        ),
    ],
    ids=["cn-only", "dns-only", "two-uris"],
)
async def test_a_certificate_without_exactly_one_uri_is_refused(
    api: Api, tmp_path: Path, sans: list[x509.GeneralName], reason: str
) -> None:
    cert, key = certificate_with(api.pki.ca, tmp_path / "crafted", sans)
    with structlog.testing.capture_logs() as logs:
        for path in ("/v1/signals", "/v1/snapshot", f"/v1/signals/{ROOM}", "/v1/stream"):
            status, _ = await get(api, path, api.client_ssl(cert, key))
            assert status == 403, path
    assert {e["reason"] for e in logs if e["event"] == "consumer_denied"} == {reason}


async def test_a_connection_is_logged_once_with_its_certificate(api: Api) -> None:
    context = api.consumer_ssl()  # one context, so the session reuses its connection
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # one keep-alive connection, three requests
                async with session.get(api.base + "/v1/signals", ssl=context) as r:
                    assert r.status == 200
    connected = [e for e in logs if e["event"] == "consumer_connected"]
    assert len(connected) == 1
    fingerprint = hashlib.sha256(
        x509.load_pem_x509_certificate(api.pki.client_cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    ).hexdigest()
    assert connected[0]["fingerprint"] == fingerprint
    assert connected[0]["identity"] == "spiffe://demo/consumer/historian"


async def test_a_serial_a_stale_crl_lists_is_refused_by_the_api(api: Api) -> None:
    serial = f"{x509.load_pem_x509_certificate(api.pki.energy_cert.read_bytes()).serial_number:x}"
    api.authz.revoked = frozenset({serial})  # what `stale_crl: accept` hands the API
    energy = api.client_ssl(api.pki.energy_cert, api.pki.energy_key)
    with structlog.testing.capture_logs() as logs:
        status, _ = await get(api, "/v1/signals", energy)
    assert status == 403
    assert [e["reason"] for e in logs if e["event"] == "consumer_denied"] == ["revoked"]
    status, _ = await get(api, "/v1/signals", api.consumer_ssl())
    assert status == 200  # everyone else still gets in


def serial_of(cert: Path) -> str:
    return f"{x509.load_pem_x509_certificate(cert.read_bytes()).serial_number:x}"


async def test_a_crl_put_in_force_ends_the_open_stream_of_the_certificate_it_revokes(
    api: Api,
) -> None:
    energy = api.client_ssl(api.pki.energy_cert, api.pki.energy_key)
    async with (
        aiohttp.ClientSession() as session,
        session.get(api.base + "/v1/stream", ssl=api.consumer_ssl()) as revoked,
        session.get(api.base + "/v1/stream", ssl=energy) as other,
    ):
        assert revoked.status == other.status == 200
        await eventually(lambda: len(api.store.subscriptions) == 2)
        api.store.apply([record(POWER, 1.0, 1)])
        assert [e["value"] for _, e in await read_events(revoked, 1)] == [1.0]
        assert [e["value"] for _, e in await read_events(other, 1)] == [1.0]
        with structlog.testing.capture_logs() as logs:
            api.authz.use_revoked(frozenset({serial_of(api.pki.client_cert)}))
            async with asyncio.timeout(10):  # ended at once, not at the next keepalive (15 s)
                rest = await revoked.content.read()
            assert rest.strip() == b""  # the stream ended (read to its end), with no more data
            api.store.apply([record(POWER, 2.0, 2)])
            assert [e["value"] for _, e in await read_events(other, 1)] == [2.0]  # goes on
    cut = [e for e in logs if e["event"] == "consumer_cut_off"]
    assert [(e["reason"], e["serial"], e["identity"]) for e in cut] == [
        ("revoked", serial_of(api.pki.client_cert), CONSUMER_URI)
    ]


async def test_a_kept_alive_connection_of_a_revoked_certificate_gets_403_and_is_closed(
    api: Api,
) -> None:
    port = int(api.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=api.consumer_ssl(), server_hostname="localhost"
    )
    try:
        assert await keep_alive_get(reader, writer) == 200
        api.authz.use_revoked(frozenset({serial_of(api.pki.client_cert)}))
        with structlog.testing.capture_logs() as logs:
            assert await keep_alive_get(reader, writer) == 403
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed after it
    finally:
        writer.close()
    assert [e["reason"] for e in logs if e["event"] == "consumer_denied"] == ["revoked"]
    status, _ = await get(
        api, "/v1/signals", api.client_ssl(api.pki.energy_cert, api.pki.energy_key)
    )
    assert status == 200  # another certificate still gets in

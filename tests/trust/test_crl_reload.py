"""A TLS reload replaces the endpoint's material, never adds to it (issue 13).

Real parts: the broker's own listener on 127.0.0.1 (`ok_server`) serving with the context
the reloader holds, real TLS handshakes, a CA, certificates and CRLs from our CLI and
`broker.trust.revocation` (the code behind `certs crl`); only the CRLs the CLI refuses to
make (no CRL number) are crafted with `cryptography` under the same CA key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import structlog
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from broker.config import TlsConfig
from broker.errors import TrustError
from broker.trust import tls
from broker.trust.certs import load_ca
from broker.trust.revocation import revoke, write_crl
from tests.harness import BrokerProcess, Deployment, dmzbroker, eventually, ok_server

SAME_SECOND_TRIES = 10  # two CRLs written milliseconds apart rarely straddle a second


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "Reload CA")
    dmzbroker("certs", "issue", "server", "--ca", str(tmp_path), "--out", str(tmp_path),
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    for name in ("good", "revoked"):
        dmzbroker("certs", "issue", "client", "--ca", str(tmp_path), "--out", str(tmp_path),
                  "--uri", f"spiffe://t/consumer/{name}")  # fmt: skip
    return tmp_path


def serial_of(cert: Path) -> str:
    return f"{x509.load_pem_x509_certificate(cert.read_bytes()).serial_number:x}"


def config(ca: Path, *, crl: bool = True) -> TlsConfig:
    return TlsConfig(cert=ca / "server.crt", key=ca / "server.key", client_ca=ca / "client-ca.crt",
                     crl=ca / "crl.pem" if crl else None)  # fmt: skip


def install(source: Path, target: Path) -> None:
    """Put a file in place as an operator's tooling does: a whole new file, atomically."""
    staged = target.with_suffix(".new")
    staged.write_bytes(source.read_bytes())
    os.replace(staged, target)


async def status(port: int, ca: Path, name: str, path: str = "/") -> int | None:
    """The HTTP status a consumer gets on a new connection, or None when TLS refused it."""
    context = tls.client_context(ca / "ca.crt", ca / f"{name}.crt", ca / f"{name}.key")
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://localhost:{port}{path}", ssl=context) as response,
        ):
            return response.status
    except (aiohttp.ClientConnectionError, ssl.SSLError):
        return None


def crl_number(path: Path) -> int:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def two_crls_in_one_second(ca: Path) -> tuple[Path, Path]:
    """`certs crl` twice within one second: the first revokes nothing, the second (the next
    CRL number) revokes `revoked.crt`. Both carry the same thisUpdate, to the second."""
    for _ in range(SAME_SECOND_TRIES):
        first = write_crl(ca, out=ca / "crl-first.pem")
        revoke(ca, serial_of(ca / "revoked.crt"), "key_compromise")
        second = write_crl(ca, out=ca / "crl-second.pem")
        updates = {x509.load_pem_x509_crl(p.read_bytes()).last_update_utc for p in (first, second)}
        if len(updates) == 1:
            return first, second
        (ca / "revoked.json").unlink()  # straddled a second: again, with the next numbers
    raise AssertionError(f"no two CRLs within one second in {SAME_SECOND_TRIES} tries")


def crl_without_number(ca: Path, revoked: list[Path]) -> Path:
    """What our CLI never writes: a CRL, signed by the CA, with no CRLNumber extension."""
    ca_cert, ca_key = load_ca(ca)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=7))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial_of(cert), 16))
            .revocation_date(now)
            .build()
        )
    path = ca / "crl-unnumbered.pem"
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def single_ca(ca: Path) -> Path:
    install(ca / "ca.crt", ca / "client-ca.crt")
    return ca


async def test_a_crl_made_in_the_same_second_as_the_one_in_force_revokes_after_a_reload(
    single_ca: Path,
) -> None:
    ca = single_ca
    first, second = two_crls_in_one_second(ca)
    install(first, ca / "crl.pem")
    reloader = tls.EndpointReloader(config(ca))
    async with ok_server(reloader) as port:
        assert await status(port, ca, "revoked") == 200  # not revoked by the first CRL
        install(second, ca / "crl.pem")
        with structlog.testing.capture_logs() as logs:
            assert reloader.check() is not None
        assert await status(port, ca, "revoked") is None  # refused in the handshake
        assert await status(port, ca, "good") == 200
        reloaded = [e for e in logs if e["event"] == "tls_material_reloaded"]
        assert [e["crl_number"] for e in reloaded] == [crl_number(second)]


async def test_an_older_crl_put_back_is_refused_and_the_revocation_stays(single_ca: Path) -> None:
    ca = single_ca
    first, second = two_crls_in_one_second(ca)
    install(second, ca / "crl.pem")
    reloader = tls.EndpointReloader(config(ca))
    async with ok_server(reloader) as port:
        assert await status(port, ca, "revoked") is None
        in_force = reloader.context
        install(first, ca / "crl.pem")  # the rollback that would un-revoke
        with structlog.testing.capture_logs() as logs:
            assert reloader.check() is None
            assert reloader.check(force=True) is None  # SIGHUP: refused again
        refused = [e for e in logs if e["event"] == "tls_reload_refused"]
        assert len(refused) == 2 and not any(e["event"] == "tls_material_reloaded" for e in logs)
        error = refused[0]["error"]
        assert f"CRL number {crl_number(first)} is not higher than {crl_number(second)}" in error
        assert reloader.context is in_force
        assert await status(port, ca, "revoked") is None
        assert await status(port, ca, "good") == 200


async def test_a_ca_removed_from_the_client_ca_file_is_no_longer_trusted(
    ca: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    dmzbroker("certs", "init-ca", "--out", str(other), "--name", "Retired CA")
    dmzbroker("certs", "issue", "client", "--ca", str(other), "--out", str(other),
              "--uri", "spiffe://t/consumer/retired")  # fmt: skip
    for suffix in ("crt", "key"):
        install(other / f"retired.{suffix}", ca / f"retired.{suffix}")
    (ca / "client-ca.crt").write_bytes(
        (ca / "ca.crt").read_bytes() + (other / "ca.crt").read_bytes()
    )
    reloader = tls.EndpointReloader(config(ca, crl=False))
    async with ok_server(reloader) as port:
        assert await status(port, ca, "retired") == 200
        install(ca / "ca.crt", ca / "client-ca.crt")  # the operator retires the other CA
        assert reloader.check() is not None
        assert await status(port, ca, "retired") is None
        assert await status(port, ca, "good") == 200


async def test_an_established_connection_keeps_its_context_across_a_reload(
    single_ca: Path,
) -> None:
    ca = single_ca
    write_crl(ca, out=ca / "crl.pem")
    reloader = tls.EndpointReloader(config(ca))
    async with ok_server(reloader) as port:
        client = tls.client_context(ca / "ca.crt", ca / "revoked.crt", ca / "revoked.key")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        try:
            assert await get(reader, writer) == 200
            revoke(ca, serial_of(ca / "revoked.crt"), "superseded")
            write_crl(ca, out=ca / "crl.pem")
            assert reloader.check() is not None
            assert await status(port, ca, "revoked") is None  # a new connection is refused
            assert await get(reader, writer) == 200  # the established one goes on
        finally:
            writer.close()


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One keep-alive HTTP/1.1 request on an open connection; its status."""
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), timeout=10)
    return int(head.split(b" ", 2)[1])


def test_a_crl_without_a_number_is_accepted_at_start_and_refused_at_a_reload(
    single_ca: Path,
) -> None:
    ca = single_ca
    install(crl_without_number(ca, []), ca / "crl.pem")
    reloader = tls.EndpointReloader(config(ca))  # the first CRL: nothing to compare it with
    assert reloader.check(force=True) is not None  # the same list read again is no rollback
    install(crl_without_number(ca, [ca / "revoked.crt"]), ca / "crl.pem")
    with structlog.testing.capture_logs() as logs:
        assert reloader.check() is None
    assert [e["event"] for e in logs] == ["tls_reload_refused"]
    assert "has no CRL number" in logs[0]["error"] and "dmzbroker certs crl" in logs[0]["error"]
    install(write_crl(ca, out=ca / "crl-numbered.pem"), ca / "crl.pem")
    assert reloader.check() is not None  # a numbered CRL follows an unnumbered one


def test_a_crl_of_another_ca_is_refused_at_start_and_at_a_reload(
    single_ca: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ca = single_ca
    other = tmp_path_factory.mktemp("other-ca")
    dmzbroker("certs", "init-ca", "--out", str(other), "--name", "Reload CA")  # same name
    dmzbroker("certs", "crl", "--ca", str(other))
    install(other / "crl.pem", ca / "crl.pem")
    with pytest.raises(TrustError, match="not signed by a CA of the client CA file"):
        tls.EndpointReloader(config(ca))
    write_crl(ca, out=ca / "crl.pem")
    reloader = tls.EndpointReloader(config(ca))
    dmzbroker("certs", "crl", "--ca", str(other))  # number 2: higher, but not our CA's
    install(other / "crl.pem", ca / "crl.pem")
    with structlog.testing.capture_logs() as logs:
        assert reloader.check() is None
    assert [e["event"] for e in logs] == ["tls_reload_refused"]
    assert "not signed by a CA of the client CA file" in logs[0]["error"]


async def test_a_running_enterprise_half_enforces_the_newer_crl_on_sighup_and_refuses_the_older(
    single_ca: Path, deployment: Deployment, start_broker: Callable[..., BrokerProcess]
) -> None:
    ca = single_ca
    first, second = two_crls_in_one_second(ca)
    install(first, ca / "crl.pem")
    settings = yaml.safe_load(deployment.config.read_text())
    settings["enterprise"]["tls"] = {
        "cert": str(ca / "server.crt"),
        "key": str(ca / "server.key"),
        "client_ca": str(ca / "client-ca.crt"),
        "crl": str(ca / "crl.pem"),
    }
    deployment.config.write_text(yaml.safe_dump(settings))
    broker = start_broker("enterprise", deployment.config)
    port = deployment.api_port

    async def handshake_of(name: str) -> bool:  # any HTTP answer: the handshake went through
        return await status(port, ca, name, "/v1/signals") is not None

    async def refused(name: str) -> bool:
        return not await handshake_of(name)

    def logged(event: str) -> bool:
        return any(f'"{event}"' in line for line in broker.events())

    await eventually(lambda: handshake_of("good"), timeout=60, interval=0.2)
    assert await handshake_of("revoked")
    install(second, ca / "crl.pem")
    broker.process.send_signal(signal.SIGHUP)
    await eventually(lambda: refused("revoked"), timeout=20, interval=0.2)
    assert logged("tls_material_reloaded")
    assert await handshake_of("good")

    install(first, ca / "crl.pem")  # the rollback
    broker.process.send_signal(signal.SIGHUP)
    await eventually(lambda: logged("tls_reload_refused"), timeout=20, interval=0.2)
    assert await refused("revoked") and await handshake_of("good")
    assert broker.process.poll() is None

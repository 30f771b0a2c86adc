"""The consumer TLS endpoint refuses every certificate it must, in the handshake.

A real aiohttp server on 127.0.0.1 with our server context; certificates from our CLI, and,
for the kinds our CLI refuses to make (expired, not yet valid, serverAuth only), crafted
with `cryptography` under the same CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import structlog
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.config import TlsConfig
from broker.errors import TrustError
from broker.trust import fitness, tls
from tests.certificates import certificate, localhost
from tests.harness import dmzbroker, ok_server

Serve = Callable[..., "Server"]


class Server:
    def __init__(self, url: str, ca: Path) -> None:
        self.url = url
        self.ca = ca

    async def status(self, cert: Path, key: Path, *, tls12_only: bool = False) -> int | None:
        """The HTTP status, or None when TLS refused the connection."""
        context = tls.client_context(self.ca / "ca.crt", cert, key)
        if tls12_only:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            async with aiohttp.ClientSession() as session, session.get(self.url, ssl=context) as r:
                return r.status
        except (aiohttp.ClientConnectionError, ssl.SSLError):
            return None


@pytest.fixture
async def serve(ca: Path) -> AsyncIterator[Callable[..., object]]:
    async with contextlib.AsyncExitStack() as servers:

        async def start(**options: object) -> Server:
            context = tls.server_context(
                ca / "server.crt", ca / "server.key", ca / "ca.crt", **options
            )  # type: ignore[arg-type]
            port = await servers.enter_async_context(ok_server(context))
            return Server(f"https://localhost:{port}/", ca)

        yield start


def crafted(
    ca: Path, name: str, *, start: dt.datetime, end: dt.datetime, usage: x509.ObjectIdentifier
) -> tuple[Path, Path]:
    spiffe = x509.UniformResourceIdentifier(f"spiffe://t/consumer/{name}")
    extensions = [
        (x509.ExtendedKeyUsage([usage]), False),
        (x509.SubjectAlternativeName([spiffe]), False),
    ]
    return certificate(ca, name, extensions, issuer=ca / "ca.crt", start=start, end=end)


NOW = dt.datetime.now(dt.UTC)


async def test_the_good_certificate_gets_in_and_tls_1_2_does_not_under_modern(
    serve, ca: Path
) -> None:
    server = await serve()
    assert await server.status(ca / "good.crt", ca / "good.key") == 200
    assert await server.status(ca / "good.crt", ca / "good.key", tls12_only=True) is None


async def test_intermediate_accepts_tls_1_2(serve, ca: Path) -> None:
    server = await serve(profile="intermediate")
    assert await server.status(ca / "good.crt", ca / "good.key", tls12_only=True) == 200


@pytest.mark.parametrize(
    ("name", "start", "end", "usage"),
    [
        (
            "expired",
            NOW - dt.timedelta(days=30),
            NOW - dt.timedelta(days=1),
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        (
            "not-yet-valid",
            NOW + dt.timedelta(days=1),
            NOW + dt.timedelta(days=30),
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        (
            "server-auth-only",
            NOW - dt.timedelta(days=1),
            NOW + dt.timedelta(days=30),
            ExtendedKeyUsageOID.SERVER_AUTH,
        ),
    ],
)
async def test_a_certificate_outside_its_validity_or_purpose_is_refused(
    serve, ca: Path, name: str, start: dt.datetime, end: dt.datetime, usage: x509.ObjectIdentifier
) -> None:
    server = await serve()
    assert await server.status(*crafted(ca, name, start=start, end=end, usage=usage)) is None
    assert await server.status(ca / "good.crt", ca / "good.key") == 200  # the server is fine


async def test_a_revoked_certificate_is_refused_by_the_crl(serve, ca: Path) -> None:
    serial = f"{x509.load_pem_x509_certificate((ca / 'revoked.crt').read_bytes()).serial_number:x}"
    dmzbroker("certs", "revoke", serial, "--reason", "key_compromise", "--ca", str(ca))
    dmzbroker("certs", "crl", "--ca", str(ca))
    server = await serve(crl=ca / "crl.pem")
    assert await server.status(ca / "revoked.crt", ca / "revoked.key") is None
    assert await server.status(ca / "good.crt", ca / "good.key") == 200


async def test_a_crl_past_its_next_update_refuses_everyone_by_default(serve, ca: Path) -> None:
    dmzbroker("certs", "crl", "--ca", str(ca), "--days", "0")
    server = await serve(crl=ca / "crl.pem")
    assert await server.status(ca / "good.crt", ca / "good.key") is None


def test_a_stale_crl_with_stale_crl_accept_is_enforced_by_serial_in_the_api(ca: Path) -> None:
    serial = f"{x509.load_pem_x509_certificate((ca / 'revoked.crt').read_bytes()).serial_number:x}"
    dmzbroker("certs", "revoke", serial, "--reason", "key_compromise", "--ca", str(ca))
    dmzbroker("certs", "crl", "--ca", str(ca), "--days", "0")
    config = TlsConfig(cert=ca / "server.crt", key=ca / "server.key", client_ca=ca / "ca.crt",
                       crl=ca / "crl.pem", stale_crl="accept")  # fmt: skip
    endpoint = tls.EndpointReloader(config)
    assert endpoint.revoked == {serial}  # refused by the API's authorization (403, consumer_denied)
    assert not endpoint.context.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF  # the stale list: API


async def test_new_material_reaches_new_handshakes_and_open_connections_stay(ca: Path) -> None:
    config = TlsConfig(cert=ca / "server.crt", key=ca / "server.key", client_ca=ca / "ca.crt",
                       crl=None, profile="modern")  # fmt: skip
    reloader = tls.EndpointReloader(config)
    async with ok_server(reloader) as port:
        await _reload_while_connected(ca, reloader, port)


async def _reload_while_connected(ca: Path, reloader: tls.EndpointReloader, port: int) -> None:
    client = tls.client_context(ca / "ca.crt", ca / "good.crt", ca / "good.key")
    url = f"https://localhost:{port}/"

    async def served_serial() -> str:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        serial = writer.get_extra_info("peercert")["serialNumber"]
        writer.close()
        return str(serial)

    async with aiohttp.ClientSession() as kept:
        async with kept.get(url, ssl=client) as response:
            assert response.status == 200
        first = await served_serial()
        # The operator replaces the server certificate (same CA, new serial).
        (ca / "server.crt").unlink()
        (ca / "server.key").unlink()
        dmzbroker("certs", "issue", "server", "--ca", str(ca), "--out", str(ca),
                  "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
        assert reloader.check() is not None
        async with kept.get(url, ssl=client) as response:  # the open connection goes on
            assert response.status == 200
        second = await served_serial()
    assert first != second  # a new handshake presents the new certificate
    assert reloader.check() is None  # nothing changed since


def test_an_unusable_new_key_is_refused_and_the_old_material_stays(ca: Path) -> None:
    config = TlsConfig(cert=ca / "server.crt", key=ca / "server.key", client_ca=ca / "ca.crt")
    reloader = tls.EndpointReloader(config)
    (ca / "server.key").write_text("not a key\n")
    with structlog.testing.capture_logs() as logs:
        assert reloader.check() is None
    assert [e["event"] for e in logs] == ["tls_reload_refused"]


def test_a_new_server_certificate_without_server_auth_is_refused_and_the_old_stays(
    ca: Path,
) -> None:
    """Every consumer would fail "unsuitable certificate purpose": the reload is refused
    (naming serverAuth), like any unusable file, and the context in force stays."""
    config = TlsConfig(cert=ca / "server.crt", key=ca / "server.key", client_ca=ca / "ca.crt")
    reloader = tls.EndpointReloader(config)
    context = reloader.context
    for suffix in ("crt", "key"):  # a consumer's certificate put in the server's place
        (ca / f"server.{suffix}").write_bytes((ca / f"good.{suffix}").read_bytes())
    with structlog.testing.capture_logs() as logs:
        assert reloader.check() is None
    (refused,) = logs
    assert refused["event"] == "tls_reload_refused"
    assert "leaves out serverAuth" in refused["error"]
    assert reloader.context is context


def test_a_leaf_certificate_given_as_the_client_ca_is_refused(ca: Path) -> None:
    with pytest.raises(TrustError, match=r"certificate 1 \(CN=good\) is not a CA"):
        tls.server_context(ca / "server.crt", ca / "server.key", ca / "good.crt")


# What a file at a certificate's path may be: a regular file, read bounded, never waited on.


def self_signed(directory: Path, name: str, *, common_name: str = "localhost") -> Path:
    """A self-signed server certificate with CA:FALSE (pinned by the client), and its key."""
    extensions = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        localhost(),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ]
    return certificate(directory, name, extensions, common_name=common_name)[0]


async def handshake(served: Path, anchor: Path) -> None:
    """A TLS handshake with a server presenting `served`, verified by our client context
    with `anchor` as its CA file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(served, served.with_suffix(".key"))
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = tls.client_context(anchor)
        connecting = asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        _, writer = await asyncio.wait_for(connecting, timeout=10)
        writer.close()


async def test_a_pinned_self_signed_server_certificate_anchors_the_client(tmp_path: Path) -> None:
    """enterprise.mqtt.ca and audit.siem.ca may pin the server's own CA:FALSE certificate:
    OpenSSL takes it as the anchor, so the start check must not ask for a CA there."""
    pinned = self_signed(tmp_path, "pinned")
    assert fitness.unfit_anchors(pinned, "fix") is None
    assert "is not a CA" in (fitness.unfit_ca(pinned, "fix") or "")  # never a client CA
    await handshake(pinned, pinned)
    with pytest.raises(ssl.SSLCertVerificationError):  # the control: another pin is refused
        await handshake(pinned, self_signed(tmp_path, "other"))


@pytest.mark.timeout(30)
def test_a_fifo_or_a_device_at_a_certificate_path_is_refused_at_once(ca: Path) -> None:
    fifo = ca / "server.fifo"
    os.mkfifo(fifo)  # no writer ever comes: a blocking open would wait forever
    started = time.monotonic()
    with pytest.raises(TrustError, match=rf"^{fifo}: cannot read: not a regular file$"):
        tls.server_context(fifo, ca / "server.key", ca / "ca.crt")
    with pytest.raises(TrustError, match=r"^/dev/zero: cannot read: not a regular file$"):
        tls.server_context(ca / "server.crt", Path("/dev/zero"), ca / "ca.crt")
    with pytest.raises(TrustError, match=rf"^{fifo}: cannot read: not a regular file$"):
        tls.client_context(fifo)
    assert time.monotonic() - started < 10


def test_a_certificate_over_the_size_limit_is_refused(ca: Path) -> None:
    huge = ca / "huge.crt"
    huge.write_bytes((ca / "server.crt").read_bytes() + b"#" * fitness.MAX_PEM_BYTES)
    with pytest.raises(TrustError, match=rf"{huge}: cannot read: larger than 1048576 bytes"):
        tls.server_context(huge, ca / "server.key", ca / "ca.crt")


def test_a_link_to_a_certificate_is_followed_as_certbot_lays_them_out(ca: Path) -> None:
    live = ca / "live"
    live.mkdir()
    for name in ("server.crt", "server.key", "ca.crt"):
        (live / name).symlink_to(ca / name)
    tls.server_context(live / "server.crt", live / "server.key", live / "ca.crt")


def test_a_subject_in_an_error_cannot_forge_a_line(tmp_path: Path) -> None:
    forged = self_signed(tmp_path, "forged", common_name="mqtt\nFAKE LINE\x1b[31m")
    with pytest.raises(TrustError) as refused:
        tls.server_context(forged, forged.with_suffix(".key"), forged)
    message = str(refused.value)
    assert "\n" not in message and "\x1b" not in message
    assert "(CN=mqtt\\nFAKE LINE\\x1b[31m) is not a CA" in message

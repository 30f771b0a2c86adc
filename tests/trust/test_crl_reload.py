"""A TLS reload replaces the endpoint's material, never adds to it (issue 13).

Real parts: the broker's own listener on 127.0.0.1 (`ok_server`) serving with the context
the reloader holds, real TLS handshakes, a CA, certificates and CRLs from our CLI and
`broker.trust.revocation` (the code behind `certs crl`); only the CRLs the CLI refuses to
make (no CRL number) are crafted with `cryptography` under the same CA key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import ssl
import threading
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
from broker.trust.crlstate import MAX_BYTES, STATE
from broker.trust.revocation import revoke, write_crl
from tests.harness import (
    CONSUMER_URI,
    ENERGY_URI,
    BrokerProcess,
    Deployment,
    dmzbroker,
    eventually,
    keep_alive_get,
    ok_server,
    read_events,
)

SAME_SECOND_TRIES = 10  # two CRLs written milliseconds apart rarely straddle a second
FIFO_REFUSAL_S = 10  # a refusal takes milliseconds; generous for a loaded 2-core box


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
            assert await keep_alive_get(reader, writer, "/") == 200
            revoke(ca, serial_of(ca / "revoked.crt"), "superseded")
            write_crl(ca, out=ca / "crl.pem")
            assert reloader.check() is not None
            assert await status(port, ca, "revoked") is None  # a new connection is refused
            assert await keep_alive_get(reader, writer, "/") == 200  # the established one goes on
        finally:
            writer.close()


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
    dmzbroker("certs", "init-ca", "--out", str(other), "--name", "TLS test CA")  # same name
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


def serve_consumers_of(ca: Path, deployment: Deployment) -> None:
    """The deployment's enterprise half serves consumers of `ca`, with its CRL."""
    settings = yaml.safe_load(deployment.config.read_text())
    settings["enterprise"]["tls"] = {
        "cert": str(ca / "server.crt"),
        "key": str(ca / "server.key"),
        "client_ca": str(ca / "client-ca.crt"),
        "crl": str(ca / "crl.pem"),
    }
    deployment.config.write_text(yaml.safe_dump(settings))


async def test_a_running_enterprise_half_enforces_the_newer_crl_on_sighup_and_refuses_the_older(
    single_ca: Path, deployment: Deployment, start_broker: Callable[..., BrokerProcess]
) -> None:
    ca = single_ca
    first, second = two_crls_in_one_second(ca)
    install(first, ca / "crl.pem")
    serve_consumers_of(ca, deployment)
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


def accepted_record(state: Path) -> list[dict[str, object]]:
    return json.loads((state / STATE).read_text())


async def test_an_older_crl_put_back_while_stopped_refuses_every_consumer_until_a_newer_one(
    single_ca: Path, tmp_path: Path
) -> None:
    ca, state = single_ca, tmp_path / "enterprise-state"
    older = write_crl(ca, out=ca / "crl-older.pem")
    revoke(ca, serial_of(ca / "revoked.crt"), "key_compromise")
    install(write_crl(ca, out=ca / "crl-newer.pem"), ca / "crl.pem")
    tls.EndpointReloader(config(ca), state)  # the first run accepts and records it
    [record] = accepted_record(state)
    assert record["crl_number"] == crl_number(ca / "crl.pem")
    assert record["issuer"] == "CN=TLS test CA" and len(str(record["sha256"])) == 64

    install(older, ca / "crl.pem")  # put back while the half is stopped
    with structlog.testing.capture_logs() as logs:
        restarted = tls.EndpointReloader(config(ca), state)
    [refused] = [e for e in logs if e["event"] == "tls_reload_refused"]
    assert (
        f"CRL number {crl_number(older)} is not higher than {record['crl_number']}"
        in (refused["error"])
    )
    assert "every consumer refused" in refused["kept"] and restarted.refusing_everyone
    async with ok_server(restarted) as port:
        assert await status(port, ca, "revoked") is None
        assert await status(port, ca, "good") is None  # nobody, rather than the revoked one
        assert restarted.check(force=True) is None  # SIGHUP with the same file: still refused
        install(write_crl(ca, out=ca / "crl-newest.pem"), ca / "crl.pem")
        assert restarted.check() is not None  # recovery: a newer CRL
        assert await status(port, ca, "good") == 200
        assert await status(port, ca, "revoked") is None
    assert not restarted.refusing_everyone
    assert [r["crl_number"] for r in accepted_record(state)] == [crl_number(ca / "crl.pem")]


async def test_another_crl_under_the_number_accepted_is_refused_at_start_and_at_a_reload(
    single_ca: Path, tmp_path: Path
) -> None:
    ca, state = single_ca, tmp_path / "enterprise-state"
    revoke(ca, serial_of(ca / "revoked.crt"), "key_compromise")
    install(write_crl(ca, out=ca / "crl-revoking.pem"), ca / "crl.pem")
    number = crl_number(ca / "crl.pem")
    (ca / "revoked.json").unlink()  # the CA's files edited: the same number, nothing revoked
    (ca / "crl-number").write_text(str(number - 1))
    same_number = write_crl(ca, out=ca / "crl-same-number.pem")
    assert crl_number(same_number) == number

    reloader = tls.EndpointReloader(config(ca), state)
    assert reloader.check(force=True) is not None  # the very same list again: no rollback
    install(same_number, ca / "crl.pem")
    with structlog.testing.capture_logs() as logs:
        assert reloader.check() is None
    assert "the list differs from the one accepted under that number" in logs[0]["error"]
    with structlog.testing.capture_logs() as logs:
        restarted = tls.EndpointReloader(config(ca), state)
    assert [e["event"] for e in logs] == ["tls_reload_refused"] and restarted.refusing_everyone
    async with ok_server(restarted) as port:
        assert await status(port, ca, "revoked") is None and await status(port, ca, "good") is None


@pytest.mark.parametrize("kind", ["symlink", "fifo", "garbage", "huge"])
def test_a_record_of_accepted_crls_that_is_not_ours_stops_the_start(
    single_ca: Path, tmp_path: Path, kind: str
) -> None:
    ca, state = single_ca, tmp_path / "enterprise-state"
    install(write_crl(ca, out=ca / "crl-1.pem"), ca / "crl.pem")
    state.mkdir()
    path = state / STATE
    if kind == "symlink":
        (tmp_path / "elsewhere.json").write_text("[]")
        path.symlink_to(tmp_path / "elsewhere.json")
    elif kind == "fifo":
        os.mkfifo(path)  # would hang a reader that blocks
    elif kind == "garbage":
        path.write_text('{"crl_number": 1}')
    else:
        path.write_bytes(b" " * (MAX_BYTES + 1))
    with pytest.raises(TrustError, match=STATE):
        tls.EndpointReloader(config(ca), state)


def test_the_record_is_written_without_following_a_link_left_in_its_place(
    single_ca: Path, tmp_path: Path
) -> None:
    ca, state = single_ca, tmp_path / "enterprise-state"
    state.mkdir()
    target = tmp_path / "target"
    target.write_text("untouched")
    (state / f"{STATE}.tmp").symlink_to(target)  # a link where the new record is made
    install(write_crl(ca, out=ca / "crl-1.pem"), ca / "crl.pem")
    tls.EndpointReloader(config(ca), state)
    assert target.read_text() == "untouched"
    assert [r["crl_number"] for r in accepted_record(state)] == [crl_number(ca / "crl.pem")]


async def test_a_revocation_ends_the_open_stream_and_kept_alive_connection_of_its_certificate(
    single_ca: Path, deployment: Deployment, start_broker: Callable[..., BrokerProcess]
) -> None:
    ca = single_ca
    for uri in (CONSUMER_URI, ENERGY_URI):  # consumers the demo policy names
        dmzbroker("certs", "issue", "client", "--ca", str(ca), "--out", str(ca), "--uri", uri)
    historian = tls.client_context(ca / "ca.crt", ca / "historian.crt", ca / "historian.key")
    energy = tls.client_context(ca / "ca.crt", ca / "energy-dashboard.crt",
                                ca / "energy-dashboard.key")  # fmt: skip
    install(write_crl(ca, out=ca / "crl-1.pem"), ca / "crl.pem")
    serve_consumers_of(ca, deployment)
    start_broker("plant", deployment.config)
    broker = start_broker("enterprise", deployment.config)
    url = deployment.base_url + "/v1/stream"

    async def served() -> bool:
        return await status(deployment.api_port, ca, "historian", "/v1/signals") == 200

    await eventually(served, timeout=60, interval=0.2)
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=historian) as revoked_stream,
        session.get(url, ssl=energy) as other_stream,
    ):
        assert revoked_stream.status == other_stream.status == 200
        assert await read_events(revoked_stream, 1) and await read_events(other_stream, 1)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", deployment.api_port, ssl=historian, server_hostname="localhost"
        )
        try:
            assert await keep_alive_get(reader, writer) == 200  # kept alive
            revoke(ca, serial_of(ca / "historian.crt"), "key_compromise")
            install(write_crl(ca, out=ca / "crl-2.pem"), ca / "crl.pem")
            broker.process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(12):  # under the 15 s keepalive: the reload ends it
                while await revoked_stream.content.readany():
                    pass  # what was queued before the reload, then the end
            assert await keep_alive_get(reader, writer) == 403
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # then closed
        finally:
            writer.close()
        assert await read_events(other_stream, 3)  # the other consumer streams on
    cut_off = [line for line in broker.events() if '"consumer_cut_off"' in line]
    assert len(cut_off) == 1 and '"revoked"' in cut_off[0]
    assert serial_of(ca / "historian.crt") in cut_off[0]
    assert await status(deployment.api_port, ca, "historian", "/v1/signals") is None


async def test_an_older_crl_put_back_while_the_half_is_stopped_refuses_all_until_a_newer_one(
    single_ca: Path, deployment: Deployment, start_broker: Callable[..., BrokerProcess]
) -> None:
    ca = single_ca
    older = write_crl(ca, out=ca / "crl-older.pem")
    revoke(ca, serial_of(ca / "revoked.crt"), "key_compromise")
    install(write_crl(ca, out=ca / "crl-newer.pem"), ca / "crl.pem")
    serve_consumers_of(ca, deployment)
    port = deployment.api_port

    async def handshake_of(name: str) -> bool:
        return await status(port, ca, name, "/v1/signals") is not None

    first = start_broker("enterprise", deployment.config)
    await eventually(lambda: handshake_of("good"), timeout=60, interval=0.2)
    assert not await handshake_of("revoked")
    assert first.stop() == 0

    install(older, ca / "crl.pem")  # the rollback, while the half is stopped
    broker = start_broker("enterprise", deployment.config)

    def refused_at_start() -> bool:
        return any('"tls_reload_refused"' in line for line in broker.events())

    await eventually(refused_at_start, timeout=60, interval=0.2)
    await eventually(lambda: any('"api_listening"' in e for e in broker.events()), timeout=30)
    assert not await handshake_of("good") and not await handshake_of("revoked")
    assert broker.process.poll() is None  # it runs, refusing every consumer

    install(write_crl(ca, out=ca / "crl-newest.pem"), ca / "crl.pem")  # the recovery
    await eventually(lambda: handshake_of("good"), timeout=20, interval=0.2)
    assert not await handshake_of("revoked")
    assert any('"tls_material_reloaded"' in line for line in broker.events())


@pytest.mark.parametrize("swapped", ["crl.pem", "client-ca.crt"])
async def test_a_fifo_swapped_in_for_the_crl_or_client_ca_is_refused_at_once_at_a_reload(
    single_ca: Path, swapped: str
) -> None:
    """A FIFO put at a path the reload reads would block it until some writer came: the read
    is bounded and non-blocking, so the reload is refused and the CRL in force stays."""
    ca = single_ca
    revoke(ca, serial_of(ca / "revoked.crt"), "key_compromise")
    write_crl(ca, out=ca / "crl.pem")
    reloader = tls.EndpointReloader(config(ca))
    async with ok_server(reloader) as port:
        in_force = reloader.context
        staged = ca / "fifo.new"
        os.mkfifo(staged)
        os.replace(staged, ca / swapped)
        result: list[frozenset[str] | None] = []
        with structlog.testing.capture_logs() as logs:
            reloading = threading.Thread(target=lambda: result.append(reloader.check()))
            reloading.start()
            reloading.join(timeout=FIFO_REFUSAL_S)
            blocked = reloading.is_alive()
            if blocked:  # a writer's open and close lets the blocked read end
                os.close(os.open(ca / swapped, os.O_WRONLY | os.O_NONBLOCK))
                reloading.join()
        assert not blocked, f"the reload blocked on the FIFO at {swapped}"
        assert result == [None] and reloader.context is in_force
        [refused] = [e for e in logs if e["event"] == "tls_reload_refused"]
        assert swapped in refused["error"] and "not a regular file" in refused["error"]
        assert await status(port, ca, "revoked") is None  # the CRL in force still revokes
        assert await status(port, ca, "good") == 200

"""The consumer listener: failed handshakes are seen and logged (asyncio alone would hide
them), and an outsider cannot hold more of the port than its limits allow (ADR 0014).

Real parts: the broker's listener and API app on 127.0.0.1, real TLS with certificates from
our CLI, clients from other loopback addresses (the whole of 127.0.0.0/8 is loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import config, policy
from broker.audit.log import AuditLog
from broker.enterprise import listener as listener_module
from broker.enterprise.api import create_app
from broker.enterprise.authz import Authorization
from broker.enterprise.listener import Listener, listen
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from broker.trust import tls
from tests.enterprise.test_run import lowest_free_fd
from tests.harness import DEMO_POLICY, Pki, eventually, free_port, ok_server


@pytest.fixture
async def url(pki: Pki) -> AsyncIterator[str]:
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    async with ok_server(context) as port:
        yield f"https://localhost:{port}/"


async def status(url: str, context: ssl.SSLContext) -> int | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
            return response.status
    except (aiohttp.ClientConnectionError, ssl.SSLError):
        return None


async def test_a_good_consumer_is_handed_over_to_the_api(url: str, pki: Pki) -> None:
    context = tls.client_context(pki.ca, pki.client_cert, pki.client_key)
    assert await status(url, context) == 200
    assert await status(url, context) == 200  # and again, on the kept-alive connection


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("no certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("another CA", "CERTIFICATE_VERIFY_FAILED"),
    ],
)
async def test_a_refused_handshake_is_logged_with_its_reason(
    url: str, pki: Pki, who: str, reason: str
) -> None:
    if who == "no certificate":
        context = tls.client_context(pki.ca)
    else:
        context = tls.client_context(pki.ca, pki.other_client_cert, pki.other_client_key)
    with structlog.testing.capture_logs() as logs:
        assert await status(url, context) is None
        await eventually(lambda: any(e["event"] == "tls_handshake_failed" for e in logs), timeout=5)
    failed = [e for e in logs if e["event"] == "tls_handshake_failed"]
    assert failed[0]["reason"] == reason
    assert failed[0]["remote"] == "127.0.0.1"


async def test_a_tls_1_2_client_is_logged_as_refused_under_the_default_profile(
    url: str, pki: Pki
) -> None:
    context = tls.client_context(pki.ca, pki.client_cert, pki.client_key)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with structlog.testing.capture_logs() as logs:
        assert await status(url, context) is None
        await eventually(lambda: any(e["event"] == "tls_handshake_failed" for e in logs), timeout=5)
    assert [e["reason"] for e in logs if e["event"] == "tls_handshake_failed"] == [
        "UNSUPPORTED_PROTOCOL"
    ]


# ---- limits -------------------------------------------------------------------------------


class Served:
    """The real API app behind a listener with the given limits."""

    def __init__(self, port: int, listener: Listener, pki: Pki) -> None:
        self.port = port
        self.listener = listener
        self.url = f"https://localhost:{port}/v1/signals"
        self.consumer = tls.client_context(pki.ca, pki.client_cert, pki.client_key)

    async def get(self) -> int | None:
        return await status(self.url, self.consumer)

    async def idle(self, source: str) -> asyncio.StreamReader:
        """A TCP connection from `source` that sends nothing."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(source, 0)
        )
        self._writers.append(writer)
        return reader

    async def tls(self, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, Any]:
        """A consumer's TLS connection, handshake done, nothing sent yet."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.consumer, server_hostname="localhost",
            local_addr=(source, 0),
        )  # fmt: skip
        self._writers.append(writer)
        return reader, writer

    _writers: list[asyncio.StreamWriter]


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection within `seconds` (it never sends data
    unasked), False when it is still open then."""
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(1) == b""
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


@pytest.fixture
def serve(pki: Pki, tmp_path: Path) -> Iterator[Any]:
    """`async with serve(**limits) as served`: a fresh app and listener per use."""

    @contextlib.asynccontextmanager
    async def start(**limits: Any) -> AsyncIterator[Served]:
        demo = policy.load(DEMO_POLICY)
        store = Store(demo, queue_limit=100)
        audit = AuditLog(
            tmp_path / "audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
        )
        metrics = EnterpriseMetrics(lambda: len(store.subscriptions), lambda: audit.failing)
        app = create_app(store, Authorization(demo), audit, metrics, tmp_path / "spool")
        limits_config = config.ListenConfig(**limits)
        runner = web.AppRunner(app, keepalive_timeout=limits_config.idle_timeout_s)
        await runner.setup()
        port = free_port()
        context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
        listener = await listen(runner, "127.0.0.1", port, context, limits=limits_config)
        served = Served(port, listener, pki)
        served._writers = []
        try:
            yield served
        finally:
            for writer in served._writers:
                writer.close()
            listener.close()
            store.close()
            await runner.cleanup()
            audit.close()

    yield start


async def test_an_address_at_its_limit_is_refused_and_others_are_still_served(
    serve: Any,
) -> None:
    async with serve(max_connections=10, max_connections_per_address=3) as served:
        held = [await served.idle("127.0.0.2") for _ in range(3)]
        await eventually(lambda: served.listener.stats.open == 3, timeout=5)
        fourth = await served.idle("127.0.0.2")
        assert await closed_within(fourth, 5)
        assert served.listener.stats.limited == {"per_address": 1}
        assert not any([await closed_within(r, 0.2) for r in held])  # the first three stay
        assert await served.get() == 200  # another address is not affected


async def test_at_the_overall_limit_the_oldest_connection_without_a_request_makes_room(
    serve: Any,
) -> None:
    async with serve(max_connections=4, max_connections_per_address=4) as served:
        idle = [await served.idle("127.0.0.3") for _ in range(4)]
        await eventually(lambda: served.listener.stats.open == 4, timeout=5)
        assert await served.get() == 200  # the consumer is served all the same
        assert await closed_within(idle[0], 5)  # the oldest idle connection made room
        assert not await closed_within(idle[3], 0.2)
        assert served.listener.stats.limited["evicted"] == 1
        assert served.listener.stats.open <= 4


async def test_when_every_connection_is_serving_a_request_a_new_one_is_refused(
    serve: Any, pki: Pki
) -> None:
    async with serve(max_connections=2, max_connections_per_address=2) as served:
        streams = []
        for _ in range(2):  # two consumers each in a request that does not end: a stream
            reader, writer = await served.tls()
            writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
            streams.append(reader)
        async with asyncio.timeout(5):
            for reader in streams:
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        third = await served.idle("127.0.0.4")
        assert await closed_within(third, 5)
        assert served.listener.stats.limited == {"overall": 1}
        assert not any([await closed_within(r, 0.2) for r in streams])  # streams go on


async def test_a_connection_that_sends_no_request_in_time_is_closed_and_not_logged_as_a_handshake(
    serve: Any,
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with serve(header_timeout_s=0.5) as served:
            silent = await served.idle("127.0.0.5")  # not even a TLS hello
            reader, writer = await served.tls("127.0.0.6")
            writer.write(b"GET /v1/sig")  # headers started, never finished
            started = time.monotonic()
            assert await closed_within(silent, 5)
            assert await closed_within(reader, 5)
            assert time.monotonic() - started >= 0.3
            assert served.listener.stats.limited == {"header_timeout": 2}
    assert not [e for e in logs if e["event"] == "tls_handshake_failed"]


async def test_a_served_connection_is_not_cut_by_the_header_deadline_but_by_its_idle_timeout(
    serve: Any,
) -> None:
    async with serve(header_timeout_s=0.3, idle_timeout_s=1.5) as served:
        reader, writer = await served.tls()
        for _ in range(2):  # the second request comes after the header deadline has passed
            writer.write(b"GET /v1/signals HTTP/1.1\r\nHost: localhost\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                length = next(
                    int(line.split(b":")[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )  # fmt: skip
                await reader.readexactly(length)
            assert not await closed_within(reader, 0.6)
        started = time.monotonic()
        assert await closed_within(reader, 10)  # idle past idle_timeout_s: closed
        assert time.monotonic() - started >= 0.3
        assert served.listener.stats.limited == {}
        await eventually(lambda: served.listener.stats.open == 0, timeout=5)


async def test_limits_are_logged_once_per_episode_with_counts_at_its_end(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_module, "EPISODE_QUIET_S", 0.5)
    with structlog.testing.capture_logs() as logs:
        async with serve(max_connections=10, max_connections_per_address=1) as served:
            first = await served.idle("127.0.0.7")
            refused = [await served.idle("127.0.0.7") for _ in range(40)]
            for reader in refused:
                assert await closed_within(reader, 5)
            await eventually(
                lambda: any(e["event"] == "connections_limited_ended" for e in logs), timeout=5
            )
            assert not await closed_within(first, 0.1)
    started = [e for e in logs if e["event"] == "connections_limited"]
    ended = [e for e in logs if e["event"] == "connections_limited_ended"]
    assert len(started) == 1
    assert (started[0]["reason"], started[0]["remote"]) == ("per_address", "127.0.0.7")
    assert len(ended) == 1
    assert ended[0]["counts"] == {"per_address": 40}


async def test_out_of_file_descriptors_on_accept_pauses_makes_room_and_recovers(
    serve: Any,
) -> None:
    """EMFILE for real: this process's own open-file limit is lowered for a moment, while
    the clients' sockets already exist."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with structlog.testing.capture_logs() as logs:
        async with serve(max_connections=100, max_connections_per_address=100) as served:
            await served.idle("127.0.0.8")
            await eventually(lambda: served.listener.stats.open == 1, timeout=5)
            loop = asyncio.get_running_loop()
            sockets = [socket.socket() for _ in range(12)]
            try:
                for sock in sockets:
                    sock.setblocking(False)
                    sock.bind(("127.0.0.8", 0))
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd() + 2, hard))
                for sock in sockets:
                    await loop.sock_connect(sock, ("127.0.0.1", served.port))
                await eventually(lambda: served.listener.stats.accept_errors, timeout=5)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await eventually(lambda: any(e["event"] == "accept_recovered" for e in logs), 10)
            assert served.listener.stats.limited["evicted"] >= 1  # room was made
            assert await served.get() == 200
            for sock in sockets:
                sock.close()
    failed = [e for e in logs if e["event"] == "accept_failed"]
    assert len(failed) == 1
    assert failed[0]["reason"] == "EMFILE"
    assert len([e for e in logs if e["event"] == "accept_recovered"]) == 1


# ---- who is closed to make room ------------------------------------------------------------


async def request(reader: asyncio.StreamReader, writer: Any, path: str) -> tuple[bytes, bytes]:
    """One GET on an open connection: the head and body of its answer."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )  # fmt: skip
        return head, await reader.readexactly(length)


async def open_stream(served: Served, source: str) -> asyncio.StreamReader:
    """A consumer's connection in a request that does not end."""
    reader, writer = await served.tls(source)
    writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader


async def test_silent_connections_go_before_a_consumers_second_connection(serve: Any) -> None:
    """A consumer opening a second connection next to a live one holds two from its address;
    an attacker's silent sockets from one address each must still go first."""
    async with serve(max_connections=4, max_connections_per_address=4) as served:
        await open_stream(served, "127.0.0.10")
        reader, writer = await served.tls("127.0.0.10")  # past its handshake, no request yet
        silent = [await served.idle(f"127.0.0.{n}") for n in (20, 21)]
        await eventually(lambda: served.listener.stats.open == 4, timeout=5)
        late = await served.idle("127.0.0.22")
        assert await closed_within(silent[0], 5)  # the oldest silent one made room
        head, _ = await request(reader, writer, "/v1/signals")
        assert head.startswith(b"HTTP/1.1 200")  # the consumer's second connection is served
        assert not await closed_within(late, 0.2)
        assert served.listener.stats.limited == {"evicted": 1}


async def test_a_stranger_certificate_cannot_hold_every_slot_by_sending_requests(
    serve: Any, pki: Pki
) -> None:
    """A valid certificate the policy does not name stays evictable however many requests
    it sends (it may read the API's description): a consumer connecting then is served."""
    async with serve(max_connections=2, max_connections_per_address=2) as served:
        stranger = tls.client_context(pki.ca, pki.stranger_cert, pki.stranger_key)
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", served.port, ssl=stranger, server_hostname="localhost",
                local_addr=("127.0.0.30", 0),
            )  # fmt: skip
            served._writers.append(writer)
            for _ in range(2):  # the one route it may read, again and again
                head, _ = await request(reader, writer, "/v1/openapi.json")
                assert head.startswith(b"HTTP/1.1 200")
            held.append(reader)
        await eventually(lambda: served.listener.stats.open == 2, timeout=5)
        assert await served.get() == 200
        assert served.listener.stats.limited["evicted"] >= 1
        assert "overall" not in served.listener.stats.limited


async def test_a_kept_alive_connection_is_closed_to_make_room_once_its_answer_is_written(
    serve: Any,
) -> None:
    async with serve(max_connections=2, max_connections_per_address=2) as served:
        await open_stream(served, "127.0.0.40")  # in a request: never closed for room
        reader, writer = await served.tls("127.0.0.41")
        head, _ = await request(reader, writer, "/v1/signals")
        assert head.startswith(b"HTTP/1.1 200")  # answered, now idle and kept alive
        assert await served.get() == 200  # a third consumer connection is served
        assert await closed_within(reader, 5)  # in place of the idle one
        assert served.listener.stats.limited == {"evicted": 1}


def test_ipv6_clients_are_told_apart_by_their_64_prefix() -> None:
    client_of = listener_module.client_of
    assert client_of("2001:db8:1:2::a") == client_of("2001:db8:1:2:ffff::1")
    assert client_of("2001:db8:1:2::a") != client_of("2001:db8:1:3::a")
    assert client_of("127.0.0.1") == "127.0.0.1" != client_of("127.0.0.2")


# ---- closing ------------------------------------------------------------------------------


async def test_closing_the_listener_closes_connections_not_handed_over_and_ends_episodes(
    serve: Any,
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with serve(header_timeout_s=30, max_connections_per_address=2) as served:
            silent = await served.idle("127.0.0.50")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", served.port, local_addr=("127.0.0.51", 0)
            )
            served._writers.append(writer)
            writer.write(b"\x16\x03\x01\x02\x00\x01")  # a TLS hello begun, never finished
            for _ in range(3):  # the third from .52 is over its address's limit
                await served.idle("127.0.0.52")
            await eventually(lambda: served.listener.stats.limited["per_address"] == 1, 5)
            await eventually(lambda: served.listener.stats.open == 4, timeout=5)
            served.listener.close()
            assert await closed_within(silent, 5)  # not left to its 30 s header deadline
            assert await closed_within(reader, 5)
            await eventually(lambda: served.listener.stats.open == 0, timeout=5)
            assert [e["event"] for e in logs if e["event"].startswith("connections_")] == [
                "connections_limited",
                "connections_limited_ended",  # at close, not 10 s later
            ]


async def test_a_second_failed_accept_replaces_the_pending_resume(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepting resumes after the latest pause, not the first one's."""
    monkeypatch.setattr(listener_module, "ACCEPT_RETRY_S", (1.0, 10.0))
    async with serve() as served:
        failure = OSError(24, "Too many open files")
        served.listener._accept_failed(failure)  # resume in 1 s
        served.listener._accept_failed(failure)  # resume in 2 s
        paused = time.monotonic()
        await served.idle("127.0.0.60")
        await asyncio.sleep(1.6)  # past the first pause: still not accepting
        assert served.listener.stats.open == 0
        await eventually(lambda: served.listener.stats.open == 1, timeout=10)
        assert time.monotonic() - paused >= 1.9

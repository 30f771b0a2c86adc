"""Floods on the read-only OPC UA mirror's connections (opcua_connection, opcua_guard,
opcua_trust): what anyone who reaches the port can send before proving anything, in raw
OPC UA binary on a socket, as an attacker would. Each is refused with bounded work — the
certificate paths built, the OpenSecureChannels decrypted, the requests served, the bytes
buffered are counted — the connection closed, and the refusal audited without naming an
unverified certificate's identity as if it were verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from asyncua import Client, ua
from asyncua.common.connection import SecureConnection, TransportLimits
from asyncua.common.utils import Buffer
from asyncua.crypto import security_policies as sp
from asyncua.server.binary_server_asyncio import OPCUAProtocol
from asyncua.ua.ua_binary import header_from_binary, struct_from_binary, struct_to_binary
from asyncua.ua.ua_binary import uatcp_to_binary as tcp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import policy
from broker.audit.catalogue import EVENTS
from broker.audit.log import AuditLog
from broker.config import BrokerConfig, TlsConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import opcua, opcua_connection, opcua_guard, opcua_trust
from broker.enterprise.outputs.base import OutputContext
from broker.enterprise.outputs.opcua import OpcUaServer
from broker.enterprise.outputs.opcua_connection import GuardedProtocol
from broker.enterprise.outputs.opcua_guard import GuardedProcessor
from broker.enterprise.outputs.opcua_trust import ClientTrust, Untrusted
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    ENERGY_URI,
    Pki,
    dmzbroker,
    eventually,
    free_port,
)

pytestmark = pytest.mark.timeout(180)

S = ua.StatusCodes
MT = ua.MessageType
BASIC256 = sp.SecurityPolicyBasic256Sha256.URI

# -- a mirror of its own per test (the tests change its bounds and hold its slots) ---------

NAMES = {"historian": CONSUMER_URI, "energy": ENERGY_URI}


@dataclass(frozen=True)
class Keys:
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name → (certificate, key), PEM, of the site CA


@pytest.fixture(scope="module")
def keys(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Keys:
    out = tmp_path_factory.mktemp("opcua-floods")
    ca = pki.ca.parent
    dmzbroker("certs", "issue", "opcua-server", "--ca", str(ca), "--out", str(out),
              "--uri", "urn:test:dmzbroker:floods", "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    for name, uri in NAMES.items():
        dmzbroker("certs", "issue", "opcua", "--ca", str(ca), "--out", str(out),
                  "--uri", uri, "--name", name)  # fmt: skip
    clients = {n: (out / f"{n}-cert.pem", out / f"{n}-key.pem") for n in NAMES}
    return Keys(pki.ca, out / "opcua-server-cert.pem", out / "opcua-server-key.pem", clients)


@dataclass
class Mirror:
    server: OpcUaServer
    keys: Keys
    logs: list[dict[str, Any]]  # every structlog event while it served

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def events(self, name: str) -> list[dict[str, Any]]:
        assert name in EVENTS, f"{name} is not an audit event"
        return [e for e in self.logs if e["event"] == name]

    async def secured(self, name: str = "historian") -> Client:
        """A SignAndEncrypt client pinning the server's certificate."""
        client = Client(self.endpoint, timeout=20)
        client.application_uri = NAMES[name]
        cert, key = self.keys.clients[name]
        await client.set_security(
            sp.SecurityPolicyBasic256Sha256, str(cert), str(key),
            server_certificate=str(self.keys.server_cert),
        )  # fmt: skip
        return client

    @contextlib.asynccontextmanager
    async def session(self, name: str = "historian") -> AsyncIterator[Client]:
        client = await self.secured(name)
        await client.connect()
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


@pytest.fixture
async def mirror(tmp_path: Path, pki: Pki, keys: Keys) -> AsyncIterator[Mirror]:
    demo = policy.load(DEMO_POLICY)
    audit = AuditLog(tmp_path / "audit", "enterprise", demo.deployment_id,
                     Ed25519PrivateKey.generate())  # fmt: skip
    document = {
        "policy": str(tmp_path / "policy.dsse.json"),
        "trust_root": str(tmp_path / "trust-root.yaml"),
        "spool": {"dir": str(tmp_path / "spool")},
        "plant": {"state_dir": str(tmp_path / "plant-state")},
        "enterprise": {
            "state_dir": str(tmp_path / "enterprise-state"),
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                    "client_ca": str(keys.ca)},
            "opcua": {"host": "127.0.0.1", "port": free_port(),
                      "certificate": str(keys.server_cert), "private_key": str(keys.server_key)},
        },
        "audit": {"dir": str(tmp_path / "audit"), "key": str(tmp_path / "audit.key")},
    }  # fmt: skip
    config = msgspec.convert(
        document, BrokerConfig, dec_hook=lambda t, v: Path(v) if t is Path else v
    )
    metrics = EnterpriseMetrics(lambda: 0, lambda: audit.failing)
    context = OutputContext(config, Authorization(demo), Store(demo, queue_limit=100), audit,
                            metrics)  # fmt: skip
    server = opcua.configured(context)
    assert isinstance(server, OpcUaServer)
    with structlog.testing.capture_logs() as logs:
        await server.start()
        task = asyncio.create_task(server.run())
        try:
            await eventually(lambda: server.ready or task.done(), timeout=60)
            if task.done():
                task.result()
            yield Mirror(server, keys, logs)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.close()
            audit.close()


# -- raw OPC UA binary ------------------------------------------------------------------


def hello(url: str, size: int = 65_535) -> bytes:
    return tcp(MT.Hello, ua.Hello(ReceiveBufferSize=size, SendBufferSize=size, EndpointUrl=url))


def acknowledge(size: int) -> bytes:
    """What only a server sends; asyncua's server would take its sizes as its own limits."""
    return tcp(MT.Acknowledge, ua.Acknowledge(ReceiveBufferSize=size, SendBufferSize=size))


def open_none() -> tuple[SecureConnection, bytes]:
    """A channel without security, and its OpenSecureChannel request."""
    connection = SecureConnection(sp.SecurityPolicyNone(), TransportLimits())
    return connection, connection.message_to_binary(
        struct_to_binary(_open_request(ua.MessageSecurityMode.None_, b"")), MT.SecureOpen, 1
    )


def _open_request(mode: ua.MessageSecurityMode, nonce: bytes) -> ua.OpenSecureChannelRequest:
    request = ua.OpenSecureChannelRequest()
    request.Parameters.RequestType = ua.SecurityTokenRequestType.Issue
    request.Parameters.SecurityMode = mode
    request.Parameters.RequestedLifetime = 60_000
    request.Parameters.ClientNonce = nonce
    return request


def open_as(keys: Keys, name: str, nonce_bytes: int = 32) -> bytes:
    """An OpenSecureChannel carrying `name`'s (public) certificate, encrypted to the server
    and signed by a key the attacker made: what anyone who saw `name` on the wire can send."""
    own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    claimed = x509.load_pem_x509_certificate(keys.clients[name][0].read_bytes())
    mode = ua.MessageSecurityMode.SignAndEncrypt
    policy = sp.SecurityPolicyBasic256Sha256(server, claimed, own, mode)
    request = _open_request(mode, os.urandom(nonce_bytes))
    connection = SecureConnection(policy, TransportLimits())
    return connection.message_to_binary(struct_to_binary(request), MT.SecureOpen, 1)


def open_carrying(certificates: bytes) -> bytes:
    """An OpenSecureChannel whose SenderCertificate is `certificates`, the rest random: it is
    judged on its certificate before anything is decrypted."""
    security = ua.AsymmetricAlgorithmHeader(
        SecurityPolicyURI=BASIC256, SenderCertificate=certificates,
        ReceiverCertificateThumbPrint=b"\0" * 20,
    )  # fmt: skip
    body = struct.pack("<I", 0) + struct_to_binary(security) + os.urandom(512)
    return b"OPNF" + struct.pack("<I", 8 + len(body)) + body


def get_endpoints(connection: SecureConnection, url: str, handle: int) -> bytes:
    request = ua.GetEndpointsRequest()
    request.Parameters.EndpointUrl = url
    request.RequestHeader.RequestHandle = handle
    return connection.message_to_binary(struct_to_binary(request), MT.SecureMessage, handle)


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(message type, whole message)."""
    head = await reader.readexactly(8)
    return head[:3], head + await reader.readexactly(int.from_bytes(head[4:8], "little") - 8)


async def error_then_closed(reader: asyncio.StreamReader) -> int:
    """The status of the Error the server answered before it closed the connection."""
    kind, message = await asyncio.wait_for(read_message(reader), 30)
    assert kind == b"ERR", message[:40]
    error = struct_from_binary(ua.ErrorMessage, Buffer(message[8:]))
    assert await asyncio.wait_for(reader.read(), 30) == b""  # closed
    return int(error.Error.value)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (answers before it are read and dropped)."""
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65_536), 30):
            pass
    return True


@contextlib.asynccontextmanager
async def raw(
    mirror: Mirror, source: str = "127.0.0.1", receive_buffer: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = mirror.endpoint.removeprefix("opc.tcp://").rsplit(":", 1)
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting: the window it offers stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    try:
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def refusals(mirror: Mirror, reason: str) -> list[dict[str, Any]]:
    return [e for e in mirror.events("opcua_client_refused") if e["reason"] == reason]


def protocols(mirror: Mirror) -> list[OPCUAProtocol]:
    server = mirror.server._server
    assert server is not None and server.bserver is not None
    return list(server.bserver.clients)


def protocol_of(mirror: Mirror, writer: asyncio.StreamWriter) -> GuardedProtocol:
    local = writer.get_extra_info("sockname")
    (found,) = [p for p in protocols(mirror) if p.peer_name == local]
    assert isinstance(found, GuardedProtocol)
    return found


def counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[tuple[Any, ...]]:
    """Record the arguments of every call of `owner.name` (which still runs)."""
    calls: list[tuple[Any, ...]] = []
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def opens(received: list[tuple[Any, ...]]) -> int:
    """How many OpenSecureChannels were decrypted (`SecureConnection.receive_from_header_and_body`
    calls: self, header, body)."""
    return sum(1 for call in received if call[1].MessageType == MT.SecureOpen)


# -- H1: the certificate chain bomb -------------------------------------------------------


def chain_bomb(ca: Path, intermediates: int) -> bytes:
    """A leaf naming the historian, then CA certificates an attacker made: one key, the
    site CA's name, so each is a valid issuer of every other (a path builder explores them
    all, exponentially)."""
    name = x509.load_pem_x509_certificate(ca.read_bytes()).subject
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)

    def made(subject: x509.Name, is_ca: bool, serial: int) -> bytes:
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), True)
            .add_extension(x509.KeyUsage(
                digital_signature=not is_ca, key_cert_sign=is_ca, crl_sign=is_ca,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        )  # fmt: skip
        if not is_ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CONSUMER_URI)]), False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    leaf = made(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]), False, 1)
    return leaf + b"".join(made(name, True, 100 + i) for i in range(intermediates))


def trust_of(pki: Pki) -> ClientTrust:
    document = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca)}
    tls = msgspec.convert(document, TlsConfig, dec_hook=lambda t, v: Path(v) if t is Path else v)
    return ClientTrust(tls, Authorization(policy.load(DEMO_POLICY)))


def der(pem: Path) -> bytes:
    certificate = x509.load_pem_x509_certificate(pem.read_bytes())
    return certificate.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The (leaf, intermediates) of every path ClientTrust asks cryptography to build."""
    calls: list[tuple[Any, ...]] = []

    class Counted:
        def __init__(self, builder: Any) -> None:
            self._builder = builder

        def __getattr__(self, name: str) -> Any:
            found = getattr(self._builder, name)
            if name == "build_client_verifier":
                return lambda: Verifier(found())
            return lambda *a, **k: Counted(found(*a, **k))

    class Verifier:
        def __init__(self, verifier: Any) -> None:
            self._verifier = verifier

        def verify(self, leaf: Any, intermediates: Any) -> Any:
            calls.append((leaf, intermediates))
            return self._verifier.verify(leaf, intermediates)

    real = opcua_trust.PolicyBuilder
    monkeypatch.setattr(opcua_trust, "PolicyBuilder", lambda: Counted(real()))
    return calls


def test_a_certificate_chain_is_refused_before_any_path_is_built(
    pki: Pki, verifications: list[tuple[Any, ...]]
) -> None:
    """Four self-made intermediates held the loop 35 s in the path builder; any field with
    more than the leaf and one certificate, or over 8 KB, is refused unparsed."""
    trust = trust_of(pki)
    for field, reason in (
        (chain_bomb(pki.ca, 4), "chain_too_long"),
        (der(pki.client_cert) + os.urandom(9000), "certificate_too_large"),
    ):
        with pytest.raises(Untrusted) as refused:
            trust.verify(field, None)
        assert refused.value.reason == reason
    assert verifications == []


def test_what_a_client_sends_after_its_certificate_is_never_used_to_build_a_path(
    pki: Pki, verifications: list[tuple[Any, ...]]
) -> None:
    """The site CA issues client certificates itself: a leaf and one certificate after it
    (some stacks send their issuer) is checked against the site CAs alone."""
    trust = trust_of(pki)
    with pytest.raises(Untrusted) as refused:
        trust.verify(chain_bomb(pki.ca, 1), None)
    assert refused.value.reason == "certificate_untrusted"
    peer = trust.verify(der(pki.client_cert) + der(pki.ca), None)  # a stack sending its issuer
    assert peer.identity == CONSUMER_URI
    assert [intermediates for _, intermediates in verifications] == [[], []]


async def test_a_chain_bomb_on_the_wire_is_refused_and_blames_no_one(mirror: Mirror) -> None:
    """One OpenSecureChannel of 2 KB carrying the bomb, naming the historian: refused at
    once; and the audit says the historian's identity was claimed, not that the historian
    was refused (an attacker would choose whom the log blames)."""
    ca = mirror.keys.ca
    for intermediates in (4, 1):
        async with raw(mirror) as (reader, writer):
            writer.write(hello(mirror.endpoint))
            await read_message(reader)
            writer.write(open_carrying(chain_bomb(ca, intermediates)))
            assert await error_then_closed(reader) == S.BadSecurityChecksFailed
    assert len(refusals(mirror, "chain_too_long")) == 1
    (event,) = refusals(mirror, "certificate_untrusted")
    assert event["stage"] == "channel" and event["claimed_identity"] == CONSUMER_URI
    assert "identity" not in event and "serial" not in event and event["claimed_serial"] == "1"


# -- H2: decryption with a client's public certificate ------------------------------------


async def test_an_open_not_signed_by_the_certificates_key_closes_the_connection(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The energy dashboard's certificate is public. Two OpenSecureChannels carrying it,
    signed by another key, sent together: the first is decrypted and fails, the connection
    closes, the second is never decrypted."""
    decrypted = counting(monkeypatch, SecureConnection, "receive_from_header_and_body")
    forged = open_as(mirror.keys, "energy")
    async with raw(mirror) as (reader, writer):
        writer.write(hello(mirror.endpoint))
        await read_message(reader)
        writer.write(forged + forged)
        assert await error_then_closed(reader) == S.BadSecurityChecksFailed
    assert opens(decrypted) == 1
    (event,) = refusals(mirror, "open_failed")
    assert event["claimed_identity"] == ENERGY_URI and "identity" not in event


async def test_an_oversized_open_is_refused_before_it_is_decrypted(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """45 KB encrypted to the server's key: ~180 RSA decryptions on the loop, were it read."""
    decrypted = counting(monkeypatch, SecureConnection, "receive_from_header_and_body")
    async with raw(mirror) as (reader, writer):
        writer.write(hello(mirror.endpoint))
        await read_message(reader)
        writer.write(open_as(mirror.keys, "historian", nonce_bytes=45_000))
        assert await error_then_closed(reader) == S.BadSecurityChecksFailed
    assert opens(decrypted) == 0
    (event,) = refusals(mirror, "open_too_large")
    assert "identity" not in event  # refused before the certificate was looked at


# -- H3: the Hello ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "reason"),
    [(lambda url: [hello(url, size=25)], "buffer_too_small"),
     (lambda url: [hello(url), hello(url)], "second_hello"),
     (lambda url: [open_none()[1]], "no_hello"),
     (lambda url: [hello(url), acknowledge(25)], "acknowledge")],
    ids=["tiny-chunks", "two-hellos", "no-hello", "tiny-chunks-by-acknowledge"],
)  # fmt: skip
async def test_a_hello_asking_for_tiny_chunks_a_second_one_or_none_closes_the_connection(
    mirror: Mirror, messages: Callable[[str], list[bytes]], reason: str
) -> None:
    """25-byte chunks cut a 6 KB answer into thousands built on the loop; Part 6 sets 8,192
    (and asyncua would take them from an Acknowledge as well)."""
    async with raw(mirror) as (reader, writer):
        sent = messages(mirror.endpoint)
        writer.write(b"".join(sent))
        if len(sent) == 2:
            assert (await read_message(reader))[0] == b"ACK"
        assert await error_then_closed(reader) in (
            S.BadTcpInternalError, S.BadTcpMessageTypeInvalid,
        )  # fmt: skip
    assert len(refusals(mirror, reason)) == 1


async def test_the_loop_runs_between_two_messages_of_one_connection(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages that arrived together are processed with the rest of the half running
    between each two (asyncio.Queue.get does not suspend while the queue holds any)."""
    turns = 0
    seen: list[int] = []
    mine: Any = None
    original = GuardedProcessor.process

    async def process(self: GuardedProcessor, header: Any, body: Any) -> bool:
        if self.name == mine:
            seen.append(turns)
        return await original(self, header, body)

    async def ticking() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(GuardedProcessor, "process", process)
    ticker = asyncio.create_task(ticking())
    try:
        async with raw(mirror) as (_, writer):
            mine = writer.get_extra_info("sockname")
            connection, opening = open_none()
            opened = hello(mirror.endpoint) + opening
            requests = b"".join(get_endpoints(connection, mirror.endpoint, h) for h in (2, 3, 4))
            writer.write(opened + requests)  # one segment: queued together
            await eventually(lambda: len(seen) == 5)
    finally:
        ticker.cancel()
    assert all(a < b for a, b in itertools.pairwise(seen)), seen


# -- M1: discovery without reading ---------------------------------------------------------


async def _none_channel(
    mirror: Mirror, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> SecureConnection:
    connection, opening = open_none()
    writer.write(hello(mirror.endpoint) + opening)
    assert (await read_message(reader))[0] == b"ACK"
    _, message = await read_message(reader)
    buffer = Buffer(message)
    answer = connection.receive_from_header_and_body(header_from_binary(buffer), buffer)
    opened = struct_from_binary(ua.OpenSecureChannelResponse, answer.body())
    connection.security_token = opened.Parameters.SecurityToken
    return connection


async def test_a_few_discovery_requests_per_connection_without_a_session(mirror: Mirror) -> None:
    """Each GetEndpoints is a 6 KB answer to ~100 bytes: four, then the connection closes."""
    limit = opcua_guard.MAX_DISCOVERY
    async with raw(mirror) as (reader, writer):
        connection = await _none_channel(mirror, reader, writer)
        for handle in range(limit + 1):
            writer.write(get_endpoints(connection, mirror.endpoint, handle + 2))
        answers = [(await read_message(reader))[0] for _ in range(limit)]
        assert answers == [b"MSG"] * limit
        assert await error_then_closed(reader) == S.BadTooManyOperations
    assert len(refusals(mirror, "discovery_limit")) == 1


@pytest.mark.parametrize("unread_bound", [None, 32 * 1024], ids=["paused", "dropped"])
async def test_a_client_that_does_not_read_is_not_read_and_then_dropped(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch, unread_bound: int | None
) -> None:
    """Batches of requests, no answer read: the server stops reading the connection once
    its answers pile up past the transport's high-water mark (64 KiB), so the requests
    behind are never served; past the unread bound it drops the connection and its
    buffered answers."""
    monkeypatch.setattr(opcua_guard, "MAX_DISCOVERY", 1000)  # the flood this bound is for
    monkeypatch.setattr(opcua_connection, "CHANNEL_S", 120.0)
    if unread_bound is not None:
        monkeypatch.setattr(opcua_connection, "MAX_UNREAD_BYTES", unread_bound)
    served = counting(monkeypatch, GuardedProcessor, "process_message")
    batch, batches = 16, 40
    async with raw(mirror, receive_buffer=4096) as (reader, writer):
        connection = await _none_channel(mirror, reader, writer)
        server_side = protocol_of(mirror, writer)
        transport = server_side.transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.transport.pause_reading()  # type: ignore[attr-defined]

        def stopped() -> bool:
            return not transport.is_reading() or server_side not in protocols(mirror)

        for n in range(batches):
            if stopped():
                break
            handles = range(n * batch, (n + 1) * batch)
            writer.write(b"".join(get_endpoints(connection, mirror.endpoint, h) for h in handles))
            await eventually(lambda n=n: len(served) == (n + 1) * batch or stopped())
        if unread_bound is None:
            await eventually(lambda: stopped() and server_side.messages.empty())
            assert server_side in protocols(mirror)
            assert transport.get_write_buffer_size() < 64 * 1024 + 2 * batch * 7000
        else:
            await eventually(lambda: server_side not in protocols(mirror))
            assert len(refusals(mirror, "not_reading")) == 1
        assert len(served) < batches * batch


# -- M3: connection slots ------------------------------------------------------------------


async def test_hellos_from_one_address_cannot_take_more_than_a_few_connections(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four connections without a session from one address; the fifth is refused while the
    four are young; a client elsewhere still gets its session."""
    monkeypatch.setattr(opcua_connection, "EVICTABLE_AFTER_S", 3600.0)
    monkeypatch.setattr(opcua_connection, "CHANNEL_S", 120.0)
    cap = opcua_connection.MAX_UNACTIVATED_PER_ADDRESS
    async with contextlib.AsyncExitStack() as held:
        for _ in range(cap):
            reader, writer = await held.enter_async_context(raw(mirror, source="127.0.0.2"))
            writer.write(hello(mirror.endpoint))
            await read_message(reader)
        async with raw(mirror, source="127.0.0.2") as (reader, writer):
            writer.write(hello(mirror.endpoint))
            assert await closed(reader)
        async with mirror.session() as client:
            assert await client.get_namespace_index("urn:dmzbroker:coldstore-demo") > 0
    (event,) = refusals(mirror, "too_many_connections")
    assert event["remote"].startswith("127.0.0.2:")


async def test_a_newcomer_pushes_out_the_oldest_connection_without_a_channel(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(opcua_connection, "EVICTABLE_AFTER_S", 0.0)
    monkeypatch.setattr(opcua_connection, "CHANNEL_S", 120.0)
    cap = opcua_connection.MAX_UNACTIVATED_PER_ADDRESS
    async with contextlib.AsyncExitStack() as held:
        readers = []
        for _ in range(cap + 1):
            reader, writer = await held.enter_async_context(raw(mirror, source="127.0.0.3"))
            writer.write(hello(mirror.endpoint))
            assert (await read_message(reader))[0] == b"ACK"
            readers.append(reader)
        assert await closed(readers[0])
    assert len(refusals(mirror, "pushed_out")) == 1


async def test_a_connection_without_a_trusted_channel_is_closed_early(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hello alone, a channel without security: closed after CHANNEL_S; a session opened
    before them is still served after."""
    async with mirror.session() as client:
        monkeypatch.setattr(opcua_connection, "CHANNEL_S", 2.0)
        async with raw(mirror) as (reader, writer), raw(mirror) as (reader2, writer2):
            writer.write(hello(mirror.endpoint))
            await _none_channel(mirror, reader2, writer2)
            assert await closed(reader) and await closed(reader2)
        assert await client.get_namespace_index("urn:dmzbroker:coldstore-demo") > 0
    assert len(refusals(mirror, "no_secure_channel")) == 2


async def test_hello_holders_on_every_slot_do_not_keep_a_trusted_client_out(
    mirror: Mirror,
) -> None:
    """80 Hello-only holders from 20 addresses, each reconnecting when closed, on 72 slots:
    the historian still opens a session while asyncua's own watchdog (10 s) would have
    kept every slot held."""
    slots = mirror.server._server.iserver.max_connections  # type: ignore[union-attr]
    host, port = mirror.endpoint.removeprefix("opc.tcp://").rsplit(":", 1)

    async def hold(source: str) -> None:
        while True:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(
                    host, int(port), local_addr=(source, 0)
                )
                try:
                    writer.write(hello(mirror.endpoint))
                    await reader.read()  # until the server closes it
                finally:
                    writer.close()
            await asyncio.sleep(0.05)

    holders = [asyncio.create_task(hold(f"127.0.0.{10 + i % 20}")) for i in range(80)]
    try:
        await eventually(lambda: len(protocols(mirror)) >= slots, timeout=30)
        deadline = asyncio.get_running_loop().time() + opcua_guard.ACTIVATION_S - 2
        while True:
            client = await mirror.secured()
            try:
                await client.connect()
                break
            except (OSError, TimeoutError, ua.UaError):
                assert asyncio.get_running_loop().time() < deadline, "kept out"
                await asyncio.sleep(0.2)
        await client.disconnect()
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


# -- L1: a header cut by a slow link -------------------------------------------------------


@pytest.mark.parametrize("cut", [8, 9, 11])
async def test_an_open_split_inside_its_header_is_answered(mirror: Mirror, cut: int) -> None:
    async with raw(mirror) as (reader, writer):
        writer.write(hello(mirror.endpoint))
        await read_message(reader)
        _, opening = open_none()
        writer.write(opening[:cut])
        server_side = protocol_of(mirror, writer)
        await eventually(lambda: len(server_side._buffer) == cut)  # read on its own
        writer.write(opening[cut:])
        assert (await asyncio.wait_for(read_message(reader), 30))[0] == b"OPN"


# -- the asyncua 2.1.0 members these bounds rely on ------------------------------------------


def test_every_asyncua_member_the_connection_bounds_rely_on_is_still_there() -> None:
    for member in ("_process_one_msg", "connection_made", "connection_lost", "data_received",
                   "pause_writing", "resume_writing"):  # fmt: skip
        assert callable(getattr(OPCUAProtocol, member)), member
    for member in ("messages", "clients", "peer_name", "_buffer", "processor", "transport"):
        assert member in OPCUAProtocol.__init__.__code__.co_names, member

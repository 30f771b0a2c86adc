"""What closes asyncua 2.1.0 where the read-only mirror needs it closed (ADR 0025), at the
one place every client message passes: the connection's `UaProcessor`.

- A secure channel opens only with Basic256Sha256, Aes128_Sha256_RsaOaep or
  Aes256_Sha256_RsaPss in SignAndEncrypt, and only for a certificate our trust list accepts
  (`opcua_trust`), checked when the channel opens, before any RSA work
  (BadSecurityChecksFailed, the connection closed). One OpenSecureChannel per connection
  until the channel is open, its encrypted part at most `MAX_OPEN_ENCRYPTED_BYTES` (checked
  before decryption); one failing in asyncua (signed by another key than its certificate's,
  which is public) closes the connection. Until the key is proved, a refusal logs the
  certificate's identity and serial as `claimed_identity`, `claimed_serial`. A channel
  without security may only ask for the endpoints, `MAX_DISCOVERY` times without a
  session; a session on it is refused (BadSecurityModeRejected).
- A session's certificate must be its channel's; its identity is the channel
  certificate's URI SAN; the identity must be in the policy, the policy in force and the
  audit log writable, and at most `max_sessions` are open. A session is re-activated only
  from a channel with its own certificate (asyncua would hand it to any client that
  names its authentication token). A user token must be anonymous or the channel's own
  certificate. Nobody gets asyncua's Admin role.
- Services form an allow-list (`opcua_services`): reads, browsing and subscriptions.
  Everything else (Write, Call, Add/DeleteNodes, Add/DeleteReferences, HistoryUpdate,
  HistoryRead, TransferSubscriptions, RegisterServer(2), and services unknown) is refused
  with BadUserAccessDenied and logged `opcua_service_refused`, session or not.
- Per-session filtering and limits are in `opcua_session`; the connections' bounds (who is
  admitted, framing, the Hello, pacing) in `opcua_connection`.

Nothing here writes to the address space, the spool, or anything the plant half reads.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import structlog
from asyncua import ua
from asyncua.common.connection import TransportLimits
from asyncua.crypto import security_policies as sp
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import UserManager
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary

from broker.enterprise.authz import Peer
from broker.enterprise.outputs.opcua_connection import (
    MAX_CHUNK_BYTES,
    ConnectionServer,
    GuardedProtocol,
    close_with_error,
    remote_of,
)
from broker.enterprise.outputs.opcua_services import ALLOWED, DISCOVERY, service_name
from broker.enterprise.outputs.opcua_session import MAX_SUBSCRIPTIONS, GuardedSession, SessionRules
from broker.enterprise.outputs.opcua_space import status
from broker.enterprise.outputs.opcua_trust import ClientTrust, Untrusted, split_chain

log = structlog.get_logger("opcua_server")

Refusal = tuple[str, str, int]  # reason (for the audit), detail, the status answered

SECURE_POLICIES = (
    sp.SecurityPolicyBasic256Sha256,
    sp.SecurityPolicyAes128Sha256RsaOaep,
    sp.SecurityPolicyAes256Sha256RsaPss,
)
SECURITY = [
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
]
_SECURE_URIS = frozenset(p.URI for p in SECURE_POLICIES)
_I = ObjectIds
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a request's chunks together (asyncua: 100 MiB)
MAX_OPEN_ENCRYPTED_BYTES = 4096  # an OPN's RSA-encrypted part (a real one: 2-4 blocks)
MAX_DISCOVERY = 4  # GetEndpoints/FindServers per connection without a session
PENDING_MESSAGES = 32  # parsed chunks queued per connection (asyncua: 500)
ACTIVATION_S = 10.0  # a connection without an activated session is closed after this
MAX_SESSION_TIMEOUT_MS = 60_000  # a session whose client went away lingers at most this


class _NoAdmin(UserManager):
    """Every session is a plain user: asyncua lets its Admin role write read-only values."""

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None,
        certificate: Any = None,
    ) -> User | None:  # fmt: skip
        return User(role=UserRole.User)


class GuardedProcessor(UaProcessor):
    """One client connection's processor, with our checks in front of asyncua's."""

    rules: SessionRules
    trust: ClientTrust
    peer: Peer | None = None  # the channel's client, once its certificate was accepted
    channel_der: bytes = b""

    refused = False  # a refusal closed the connection
    _open_tried = False
    _discovery = 0

    async def process(self, header: Any, body: Any) -> bool:
        if header.MessageType != ua.MessageType.SecureOpen:
            return bool(await super().process(header, body))  # type: ignore[no-untyped-call]
        try:
            self._check_open_request(body.copy(header.body_size))
        except Untrusted as refused:
            self._refuse_channel(refused)
            return False
        try:
            await super().process(header, body)  # type: ignore[no-untyped-call]
        except Exception as e:  # a signature, a padding, a nonce: whatever fails, once
            self._refuse_channel(Untrusted("open_failed", type(e).__name__, self.peer))
            return False
        return not self.refused

    def _check_open_request(self, peek: Any) -> None:
        """Refuse an OpenSecureChannel before its RSA-encrypted part is touched (`peek`: the
        message's body alone; the buffer asyncua hands over may hold the messages after it)."""
        try:
            security = struct_from_binary(ua.AsymmetricAlgorithmHeader, peek)
        except Exception:  # whatever asyncua's decoder raises on bytes it cannot read
            raise Untrusted("open_unreadable", "the security header cannot be read") from None
        if len(peek) > MAX_OPEN_ENCRYPTED_BYTES:
            raise Untrusted(
                "open_too_large",
                f"{len(peek)} encrypted bytes, at most {MAX_OPEN_ENCRYPTED_BYTES}",
            )
        if self._connection.is_open():
            return  # a renewal: its channel's certificate, checked by open_secure_channel
        if self._open_tried:
            raise Untrusted("second_open", "one OpenSecureChannel until the channel is open")
        self._open_tried = True
        self._check_opening(security)

    def _check_opening(self, security: ua.AsymmetricAlgorithmHeader) -> None:
        uri = security.SecurityPolicyURI
        if uri == sp.SecurityPolicyNone.URI:
            return  # discovery only: no session will be created on it
        if uri not in _SECURE_URIS:
            raise Untrusted("security_policy_refused", f"{uri} is not offered")
        certificate = security.SenderCertificate or b""
        self.peer = self.trust.verify(certificate, remote_of(self.name))
        self.channel_der = split_chain(certificate)[0]

    def open_secure_channel(self, algohdr: Any, seqhdr: Any, body: Any) -> None:
        request = struct_from_binary(ua.OpenSecureChannelRequest, body.copy())
        mode = request.Parameters.SecurityMode
        if not self._connection.is_open():
            secure = self.peer is not None
            wanted = (
                ua.MessageSecurityMode.SignAndEncrypt if secure else ua.MessageSecurityMode.None_
            )
            if mode != wanted:
                self._refuse_channel(Untrusted("security_mode_refused", f"mode {mode.name}"))
                return
        elif self.peer is not None and self.trust.revoked(self.peer):
            self._refuse_channel(Untrusted("revoked", "at the channel's renewal", self.peer))
            return
        super().open_secure_channel(algohdr, seqhdr, body)  # type: ignore[no-untyped-call]

    def _refuse_channel(self, refused: Untrusted) -> None:
        self.refused = True
        claimed = not self._connection.is_open()  # the sender has not proved its key yet
        log.warning(
            "opcua_client_refused", stage="channel", reason=refused.reason,
            detail=refused.detail, **_described(refused.peer, self.name, claimed=claimed),
        )  # fmt: skip
        code = StatusCodes.BadSecurityChecksFailed
        if refused.reason == "security_policy_refused":
            code = StatusCodes.BadSecurityPolicyRejected
        close_with_error(self._transport, code, refused.detail)

    async def process_message(self, seqhdr: Any, body: Any) -> bool:
        peek = body.copy()
        typeid = nodeid_from_binary(peek)
        request = struct_from_binary(ua.RequestHeader, peek)
        service = (
            typeid.Identifier
            if isinstance(typeid.Identifier, int) and typeid.NamespaceIndex == 0
            else -1
        )
        if service in DISCOVERY and self._discovery_spent(service):
            return False
        refusal = self._refusal(service, typeid, request, peek)
        if refusal is not None:
            self._fault(request, seqhdr, refusal)
            return True
        result = await super().process_message(seqhdr, body)  # type: ignore[no-untyped-call]
        if service == _I.CreateSessionRequest_Encoding_DefaultBinary:
            self._bind_created()
        return bool(result) if result is not None else True

    def _discovery_spent(self, service: int) -> bool:
        """Whether a connection without a session asked for the endpoints too often (each
        answer is ~6 KB for a ~100-byte request): refused and closed."""
        if (
            self.session is not None
            or service == _I.CloseSecureChannelRequest_Encoding_DefaultBinary
        ):
            return False
        self._discovery += 1
        if self._discovery <= MAX_DISCOVERY:
            return False
        detail = f"at most {MAX_DISCOVERY} discovery requests per connection without a session"
        log.warning(
            "opcua_client_refused", stage="connection", reason="discovery_limit",
            detail=detail, **_described(None, self.name),
        )  # fmt: skip
        close_with_error(self._transport, StatusCodes.BadTooManyOperations, detail)
        return True

    def _refusal(self, service: int, typeid: ua.NodeId, request: Any, peek: Any) -> int | None:
        """The status refusing this request, logged; None to let asyncua serve it."""
        if service not in ALLOWED:
            log.warning(
                "opcua_service_refused", service=service_name(typeid),
                **_described(self.peer, self.name),
            )  # fmt: skip
            return StatusCodes.BadUserAccessDenied
        refused: Refusal | None = None
        if service in DISCOVERY:
            return None
        if self.peer is None:
            refused = ("security_none", "a session needs a SignAndEncrypt channel",
                       StatusCodes.BadSecurityModeRejected)  # fmt: skip
        elif service == _I.CreateSessionRequest_Encoding_DefaultBinary:
            refused = self._creation_refusal(self.peer, peek)
        elif service == _I.ActivateSessionRequest_Encoding_DefaultBinary:
            refused = self._activation_refusal(request, peek)
        if refused is None:
            return None
        log.warning(
            "opcua_client_refused", stage="session", reason=refused[0], detail=refused[1],
            **_described(self.peer, self.name),
        )  # fmt: skip
        return refused[2]

    def _creation_refusal(self, peer: Peer, peek: Any) -> Refusal | None:
        params = struct_from_binary(ua.CreateSessionParameters, peek)
        if self.session is not None:
            return "second_session", "one session per connection", StatusCodes.BadTooManySessions
        if _leaf(params.ClientCertificate) != self.channel_der:
            return (
                "certificate_not_channels", "the session's certificate is not the channel's",
                StatusCodes.BadCertificateInvalid,
            )  # fmt: skip
        return self.rules.refusal(peer)

    def _activation_refusal(self, request: Any, peek: Any) -> Refusal | None:
        params = struct_from_binary(ua.ActivateSessionParameters, peek)
        token = params.UserIdentityToken
        if (
            isinstance(token, ua.X509IdentityToken)
            and _leaf(token.CertificateData) != self.channel_der
        ):
            return (
                "user_certificate_not_channels", "the user token's certificate is not the channel's",
                StatusCodes.BadIdentityTokenRejected,
            )  # fmt: skip
        if self.session is None:  # re-activation from another connection (Part 4 §6.7)
            held = self.iserver.lookup_external_session(request.AuthenticationToken)
            if not isinstance(held, GuardedSession) or held.channel_der != self.channel_der:
                return (
                    "session_of_another_client", "no session of this client has that token",
                    StatusCodes.BadSessionIdInvalid,
                )  # fmt: skip
            held.transport = self._transport
        return None

    def _bind_created(self) -> None:
        session = self.session
        if isinstance(session, GuardedSession) and session.peer is None and self.peer is not None:
            session.bind(self.peer, self.channel_der, self._transport)

    def _fault(self, request: Any, seqhdr: Any, code: int) -> None:
        response = ua.ServiceFault()
        response.ResponseHeader.ServiceResult = status(code)
        self.send_response(request.RequestHandle, seqhdr, response)  # type: ignore[no-untyped-call]


def _leaf(unverified: bytes | None) -> bytes:
    """The first certificate of a certificate field; b"" when there is none to compare."""
    try:
        return split_chain(unverified or b"")[0]
    except ValueError:
        return b""


def _described(peer: Peer | None, name: Any, claimed: bool = False) -> dict[str, str | None]:
    if peer is None:
        return {"remote": remote_of(name)}
    described = peer.described()
    if claimed:  # an unverified certificate's: never where the audit reads a verified one
        described["claimed_identity"] = described.pop("identity")
        described["claimed_serial"] = described.pop("serial")
    return described


_ANONYMOUS = User(role=UserRole.Anonymous)  # asyncua's default; the user is set at activation


class _InternalServer(InternalServer):
    rules: SessionRules

    def create_session(
        self, name: str, user: User = _ANONYMOUS, external: bool = False
    ) -> GuardedSession:
        return GuardedSession(
            self, self.aspace, self.subscription_service, name,
            rules=self.rules, user=user, external=external,
        )  # fmt: skip


class GuardedServer(Server):
    """asyncua's Server, serving only through our processor, sessions and limits."""

    def __init__(self, trust: ClientTrust, max_sessions: int) -> None:
        iserver = _InternalServer(user_manager=_NoAdmin())
        iserver.allow_remote_admin = False
        iserver.max_connections = max_sessions + 8  # room for discovery and handshakes
        iserver.max_pending_activation_seconds = ACTIVATION_S
        iserver.max_pending_messages_per_connection = PENDING_MESSAGES
        iserver.max_session_timeout_ms = MAX_SESSION_TIMEOUT_MS
        iserver.max_subscriptions = max_sessions * MAX_SUBSCRIPTIONS
        iserver.supported_tokens = (ua.AnonymousIdentityToken, ua.X509IdentityToken)  # type: ignore[assignment]
        super().__init__(iserver=iserver)
        self.set_security_policy(SECURITY)
        self.limits = TransportLimits(
            max_recv_buffer=MAX_CHUNK_BYTES,
            max_send_buffer=MAX_CHUNK_BYTES,
            max_chunk_count=MAX_REQUEST_BYTES // MAX_CHUNK_BYTES + 1,
            max_message_size=MAX_REQUEST_BYTES,
        )
        self._iserver = iserver
        self._trust = trust
        self._rules: SessionRules | None = None
        self._listening: asyncio.Server | None = None

    def guard_with(self, rules: SessionRules) -> None:
        """The sessions' rules (they need the address space, made after `init`)."""
        self._rules = self._iserver.rules = rules

    async def bind(self, host: str, port: int) -> int:
        """Bind host:port (OSError if it cannot), before `init`; connections are accepted
        from `start` on (until then refused by the kernel: nothing could answer them, and a
        client such as the demo's waits for the port). The port bound."""
        loop = asyncio.get_running_loop()
        self._listening = await loop.create_server(
            self._connection, host, port, start_serving=False
        )
        port_bound: int = self._listening.sockets[0].getsockname()[1]
        return port_bound

    def _connection(self) -> GuardedProtocol:
        assert self.bserver is not None  # accepting only once `start` made it
        return cast(GuardedProtocol, self.bserver._make_protocol())

    def _processor(self, iserver: Any, transport: Any, limits: Any) -> GuardedProcessor:
        processor = GuardedProcessor(iserver, transport, limits)
        assert self._rules is not None  # `start` checked it
        processor.rules, processor.trust = self._rules, self._trust
        return processor

    async def start(self) -> None:
        """Server.start on the socket of `bind` (asyncua 2.1.0's body, less its discovery
        and its own bind)."""
        if self._rules is None or self._listening is None:
            raise RuntimeError("GuardedServer.start before bind and guard_with")
        await self._setup_server_nodes()
        await self.iserver.start()
        bserver = ConnectionServer(self.iserver, "", 0, self.limits)
        bserver.make_processor, bserver.listening = self._processor, self._listening
        bserver.set_policies(self._policies)
        await bserver.start()
        self.bserver = bserver

    async def stop(self) -> None:
        """Server.stop, or only the listener while asyncua is not started yet."""
        if self.bserver is not None:
            await super().stop()
        elif self._listening is not None:
            self._listening.close()
            await self._listening.wait_closed()
        self._listening = None

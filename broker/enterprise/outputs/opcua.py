"""The read-only OPC UA server: the semantic model and its latest values, for plant-level IT
systems (MES, SCADA at level 3, historians) that read OPC UA (docs/opcua-server.md).

It mirrors the half's `Store`: no spool position of its own (a mirror serves latest values;
a client that was away reads the current ones). Records arrive by `store.listen`, are
coalesced per signal and written to the address space by `run`, yielding the event loop
after every STEP_BUDGET values and notifications (a value watched by many monitored items
costs as many), so neither a burst of records, a large model nor many subscribers hold the
loop the half's other outputs share; values the store would now serve as stale are written
stale within STALE_CHECK_S. Clients see only what the policy
grants the identity of their certificate, and can change nothing (`opcua_guard`,
`opcua_session`). It never writes to the spool, the plant's state or anything the plant half
reads; a client can make it do nothing but answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from datetime import UTC, datetime
from typing import NoReturn

import structlog
from asyncua import ua
from asyncua.ua.object_ids import ObjectIds
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.config import OpcUaServerConfig
from broker.enterprise.outputs.base import OutputContext
from broker.enterprise.outputs.opcua_guard import GuardedServer
from broker.enterprise.outputs.opcua_items import MAX_ITEMS_PER_REQUEST
from broker.enterprise.outputs.opcua_session import SessionRules
from broker.enterprise.outputs.opcua_space import NAMESPACE, AddressSpace
from broker.enterprise.outputs.opcua_trust import ClientTrust
from broker.errors import ConfigError
from broker.policy import Policy
from broker.records import Record
from broker.trust.fitness import read_pem, unfit_leaf

STALE_CHECK_S = 1.0  # how late a value turns stale in the mirror, at most, after the API
STEP_BUDGET = 200  # values written + notifications they make, between yields (a few ms)
SERVER_NAME = "dmzbroker read-only mirror"

log = structlog.get_logger("opcua_server")


def configured(context: OutputContext) -> OpcUaServer | None:
    """The server, where `enterprise.opcua` is set."""
    config = context.config.enterprise.opcua
    return None if config is None else OpcUaServer(config, context)


class OpcUaServer:
    """`OpcUaServer(config, context)`; `await start()` binds `config.host:port` (ConfigError
    on a port in use or unusable certificate files); `endpoint` is then its opc.tcp URL;
    `run()` builds the address space (`ready` once it is), then feeds values until
    cancelled; `close()` stops it."""

    name = "opcua"

    def __init__(self, config: OpcUaServerConfig, context: OutputContext) -> None:
        self._config = config
        self._context = context
        self._pending: dict[str, Record] = {}  # coalesced: the latest record of each signal
        self._fresh: set[str] = set()  # signals written good or uncertain: may turn stale
        self._policy: Policy | None = None  # a newer policy to build the space for
        self._wake = asyncio.Event()
        self._server: GuardedServer | None = None
        self._tried = False  # `run` began bringing `_server` up: asyncua inits a server once
        self._space: AddressSpace | None = None
        self._rules: SessionRules | None = None
        self._built = False  # the address space holds the policy's model: sessions may open
        self._certificate = self._key = b""  # PEM, read by start
        self._port = config.port

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self._config.host}:{self._port}"

    @property
    def ready(self) -> bool:
        """Whether sessions may open: `run` has built the address space."""
        return self._built

    @property
    def sessions(self) -> int:
        return 0 if self._rules is None else len(self._rules.sessions)

    async def start(self) -> None:
        """Only what an operator's mistake can make fail (ConfigError): the certificate and
        key read and checked, the port bound. asyncua's init (about a second) and the address
        space (seconds for thousands of signals) are made by `run`, so the half's spool
        reader, which starts after every output's `start`, is not held up. Connections are
        accepted once asyncua is initialised; a session is refused as `starting`
        (`opcua_client_refused`) until the space is built."""
        self._certificate, self._key = self._files()
        self._server = await self._bind()
        self._context.store.listen(self._received)

    async def _bind(self) -> GuardedServer:
        """A new asyncua server bound to host:port (the port bound before, once there was
        one, so the endpoint stays what clients know)."""
        config, context = self._config, self._context
        trust = ClientTrust(context.config.enterprise.tls, context.authz)
        server = GuardedServer(trust, config.max_sessions)
        try:
            self._port = await server.bind(config.host, self._port)
        except OSError as e:
            raise ConfigError(
                f"enterprise.opcua: cannot listen on {config.host}:{self._port}: "
                f"{e.strerror or errno.errorcode.get(e.errno or 0, e)}"
            ) from e
        return server

    async def _serve(self, server: GuardedServer) -> tuple[AddressSpace, SessionRules]:
        """asyncua's server accepting on the bound port, its address space still empty: a
        session is refused as `starting` until `run` has built it (`self._built`)."""
        context = self._context
        await server.init()
        server.set_endpoint(f"opc.tcp://{self._config.host}:{self._port}")
        server.set_server_name(SERVER_NAME)
        await server.set_application_uri(_application_uri(self._certificate, context))
        await server.load_certificate(self._certificate, format="pem")
        await server.load_private_key(self._key, format="pem")
        deployment = context.authz.policy.deployment_id
        ns = await server.register_namespace(NAMESPACE.format(deployment=deployment))
        space = AddressSpace(server, ns)
        rules = SessionRules(context.authz, space, self._config.max_sessions, self._closed_for)
        server.guard_with(rules)
        await server.start()
        await server.write_attribute_value(  # told, for clients that split their requests
            ua.NodeId(
                ua.Int32(
                    ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall
                )
            ),
            ua.DataValue(ua.Variant(MAX_ITEMS_PER_REQUEST, ua.VariantType.UInt32)),
        )
        log.info(
            "opcua_server_listening", address=self.endpoint, max_sessions=self._config.max_sessions
        )
        return space, rules

    def _files(self) -> tuple[bytes, bytes]:
        config = self._config
        try:
            unfit = unfit_leaf(config.certificate, config.private_key, None)
            certificate, key = read_pem(config.certificate), read_pem(config.private_key)
        except OSError as e:
            raise ConfigError(f"enterprise.opcua: {e.filename}: cannot read: {e.strerror}") from e
        if unfit is not None:
            raise ConfigError(f"enterprise.opcua: {unfit[0]}: {unfit[1]}")
        leaf = x509.load_pem_x509_certificate(certificate)
        if not isinstance(leaf.public_key(), rsa.RSAPublicKey):
            raise ConfigError(
                f"enterprise.opcua.certificate: {config.certificate}: not an RSA key, which the "
                "OPC UA security policies need; issue one with `dmzbroker certs issue opcua-server`"
            )
        return certificate, key

    def use_policy(self, policy: Policy) -> None:
        self._policy = policy
        self._wake.set()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    async def run(self) -> NoReturn:
        if not self._certificate:
            raise RuntimeError("OpcUaServer.run before start")
        if not self._built:
            await self._bring_up()
        space, rules = self._space, self._rules
        assert space is not None and rules is not None  # built
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), STALE_CHECK_S)
            self._wake.clear()
            if self._closed_for() is not None:
                for session in list(rules.sessions):
                    session.close()
            rules.end_dropped(time.monotonic())
            policy, self._policy = self._policy, None
            if policy is not None:
                await space.use_policy(policy)
                self._end_narrowed(rules)
                self._queue_all()
            await self._write_pending(space, rules)
            await self._age(space, rules)

    async def _bring_up(self) -> None:
        """asyncua initialised on the bound port, the space built. After a try that failed
        part way (`run` again under `run_contained`), that server is stopped and a new one
        bound: asyncua's init cannot run twice on one server, nor a half-made space be
        completed."""
        if self._tried or self._server is None:
            await self._discard()
            self._server = await self._bind()
        self._tried = True
        self._space, self._rules = await self._serve(self._server)
        await self._build(self._space)

    async def _discard(self) -> None:
        server, self._server = self._server, None
        self._space = self._rules = None
        self._tried = False
        if server is None:
            return
        await server.stop()
        if server.bserver is None and server.iserver.time_task is not None:
            await server.iserver.stop()  # its clock task, which a stop before serving leaves

    async def _build(self, space: AddressSpace) -> None:
        """The policy in force as the address space; sessions may open from then on."""
        self._policy = None  # a newer one told before now is the one in force
        policy = self._context.authz.policy
        await space.use_policy(policy)
        self._built = True
        self._queue_all()
        log.info("opcua_server_ready", address=self.endpoint, signals=len(policy.signals))

    def _received(self, records: list[Record]) -> None:
        """Store listener, called in the spool reader's step: it only notes the records
        (whatever it raised would end the reader), the latest of each signal."""
        self._pending.update((record.signal, record) for record in records)
        self._wake.set()

    def _queue_all(self) -> None:
        """Every latest value the store holds, written (again) at the next step."""
        everything = frozenset(s.path for s in self._context.authz.policy.signals)
        for record in self._context.store.snapshot(datetime.now(UTC), everything):
            self._pending.setdefault(record.signal, record)
        self._wake.set()

    async def _write_pending(self, space: AddressSpace, rules: SessionRules) -> None:
        """The pending records written, the loop yielded every STEP_BUDGET values and
        notifications (records arriving meanwhile wait for the next round)."""
        while self._pending:
            pending, self._pending = self._pending, {}
            spent = written = 0
            for signal, record in pending.items():
                await space.write(record)
                if record.quality in ("good", "uncertain"):
                    self._fresh.add(signal)
                else:
                    self._fresh.discard(signal)
                written += 1
                spent += 1 + rules.watchers.of(signal)
                if spent >= STEP_BUDGET:
                    self._context.metrics.output_records.labels(self.name).inc(written)
                    spent = written = 0
                    await asyncio.sleep(0)  # the spool reader and other outputs run
            self._context.metrics.output_records.labels(self.name).inc(written)

    async def _age(self, space: AddressSpace, rules: SessionRules) -> None:
        """Write stale the values the store now serves as stale (as the API would)."""
        now = datetime.now(UTC)
        store = self._context.store
        spent = 0
        for signal in list(self._fresh):
            record = store.latest(signal, now)
            spent += 1
            if record is None or record.quality == "stale":
                self._fresh.discard(signal)
                if record is not None and signal not in self._pending:
                    await space.write(record)
                    spent += rules.watchers.of(signal)
            if spent >= STEP_BUDGET:
                spent = 0
                await asyncio.sleep(0)

    def _end_narrowed(self, rules: SessionRules) -> None:
        """End the sessions a newer policy no longer grants all they watch (or anything)."""
        for session in list(rules.sessions):
            peer = session.peer
            known = peer is not None and rules.authz.knows(peer.identity or "")
            view = rules.view(peer)
            if not known or not view or session.watches_beyond(view):
                log.info(
                    "opcua_session_ending",
                    reason="policy_narrowed",
                    **(peer.described() if peer else {}),
                )
                session.close()

    def _closed_for(self) -> tuple[str, str] | None:
        """(reason, detail): why no session may be open now; None while the mirror serves."""
        if not self._built:
            return "starting", "the address space is being built: try again in a few seconds"
        if self._context.audit.failing:
            return "not_serving", "the audit log cannot be written"
        expires = self._context.authz.policy.expires
        if expires < datetime.now(UTC):
            return "not_serving", f"the policy expired at {expires.isoformat()}"
        return None


def _application_uri(certificate: bytes, context: OutputContext) -> str:
    """The server certificate's URI SAN: OPC UA clients check it against the endpoint's."""
    leaf = x509.load_pem_x509_certificate(certificate)
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return uris[0] if uris else f"urn:dmzbroker:{context.authz.policy.deployment_id}:opcua"

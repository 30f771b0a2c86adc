"""The MQTT sink: records to an existing MQTT broker over mutual TLS, with store-and-forward.

MQTT 5, QoS 1, retained. One message per asset per batch: topic `<prefix>/<asset path>`,
payload a JSON array of the API's records of that asset's signals, in spool order (one
message per record tops out near 6,000 records/s against Mosquitto over TLS; ADR 0007).
It publishes what the co-signed policy grants the sink's consumer identity, like any other
consumer. Store-and-forward: the sink reads the spool with a position of its own
(`spool-position-mqtt.json`), so the spool is its on-disk queue: while the MQTT broker is
unreachable the position stays, and on reconnect the records are replayed in order. The
position moves only after the broker acknowledged a batch: delivery is at least once.
At most the broker's Receive Maximum (from its CONNACK) of the sink's messages are
unacknowledged at a time, as MQTT 5 requires; the rest of a batch waits for PUBACKs.
Records the spool's retention drops before the sink read them are counted and logged
(`spool_records_lost`), like any reader's. While the half's audit log cannot be written, or
the policy has expired, it publishes nothing new (fail closed, as the API answers 503): the
records wait in the spool.
What it published and where its position is show in `dmzbroker_output_records_total` and
`dmzbroker_output_position_seq` (output="mqtt").

A lost connection ends the session at once (not when a publish times out), and reconnects
are tried every few seconds at most, so the sink is back soon after its broker. A broker that
accepts and then drops the sink (another client with its client id, a quota) does not make it
reconnect or log any faster: only a connection that held `FRESH_AFTER_S` ends an outage. It never
skips the broker's certificate check: a broker reached by an address its certificate does
not name is verified by `enterprise.mqtt.server_name`, or refused with that key in the error.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aiomqtt
import structlog
from paho.mqtt.enums import MQTTProtocolVersion

from broker.audit.log import AuditLog
from broker.backoff import Backoff
from broker.channel.spool import SpoolReceiver
from broker.channel.spool_watch import SpoolWatch
from broker.config import MqttConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs.base import OutputContext
from broker.enterprise.outputs.mqtt_acks import PUBLISH_TIMEOUT_S, Acknowledgements, Client
from broker.enterprise.outputs.mqtt_messages import by_asset, messages
from broker.errors import ChannelError
from broker.metrics import EnterpriseMetrics
from broker.policy import Policy
from broker.records import Record
from broker.trust import tls

# Records a batch holds at most. A caught-up sink reads what is there and sends it at once; one
# that is behind takes several scans in a batch, so an asset's message carries up to
# RECORDS_PER_MESSAGE records and each record pays a smaller share of a message's cost (ADR
# 0007's amendment). Bounded for memory (a full batch of records with context added ~30-40 MB
# to the half's peak RSS) and below MQTT's 65,535 packet ids (a message per record at worst,
# every one in flight).
BATCH = 50_000
IDLE_S = 0.05  # how often it looks again while held back, or where the spool is not watched
KEEPALIVE_S = 10  # a silent connection (a cut cable, no FIN) is noticed within twice this
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 2.0  # a refused connection costs the broker one SYN: retrying often is cheap,
# and bounds how long the sink stays away after its broker is back (docs/api.md#mqtt)
FRESH_AFTER_S = 30.0  # a connection that held this long ended an outage: its loss is a new one

# Not "mqtt": aiomqtt sets that logger to WARNING at import, which hid mqtt_connected.
log = structlog.get_logger("mqtt_sink")


class _NamedServerContext(ssl.SSLContext):
    """A client context that checks the server's certificate against `server_name`, whatever
    address the connection goes to: paho passes its connect address as `server_hostname`
    and has no setting for another name (eclipse-paho/paho.mqtt.python#734)."""

    server_name = ""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.server_name
        # The handshake here, not in paho: a refused one then closes its socket (paho's own
        # handshake leaves it to the garbage collector); paho's later call finds it done.
        kwargs["do_handshake_on_connect"] = True
        return super().wrap_socket(*args, **kwargs)


def _verifying_name(config: MqttConfig, server_name: str) -> _NamedServerContext:
    context = tls.client_context(config.ca, config.cert, config.key, cls=_NamedServerContext)
    assert isinstance(context, _NamedServerContext)
    context.server_name = server_name
    return context


def configured(context: OutputContext) -> MqttSink | None:
    """The sink, where `enterprise.mqtt` is set."""
    mqtt = context.config.enterprise.mqtt
    if mqtt is None:
        return None
    return MqttSink(
        mqtt,
        context.spool_dir,
        context.state_dir,
        context.authz,
        metrics=context.metrics,
        audit=context.audit,
    )


class MqttSink:
    name = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        spool_dir: Path,
        state_dir: Path,
        authz: Authorization,
        *,
        metrics: EnterpriseMetrics | None = None,  # the half's; None: not counted (a test)
        audit: AuditLog | None = None,  # the half's; None: never paused for it (a test)
    ) -> None:
        self._config = config
        self._spool_dir = spool_dir
        self._state_dir = state_dir
        self._authz = authz
        self._metrics = metrics
        self._audit = audit
        self._server_name = config.server_name or config.host
        self._context = _verifying_name(config, self._server_name)
        self._watch: SpoolWatch | None = None  # while it runs

    async def start(self) -> None:
        """Nothing to bind: an unreachable broker is retried in `run`, never a reason to stop."""

    def use_policy(self, policy: Policy) -> None:
        """Nothing to do: each batch asks `authz` for the view in force."""

    async def close(self) -> None:
        """Nothing held between sessions: the position is saved after each acknowledged batch."""

    async def run(self) -> NoReturn:
        # One watch for the sink's life: a fallback to polling is logged once, not per session.
        self._watch = SpoolWatch(self._spool_dir, IDLE_S)
        try:
            await self._sessions()
        finally:
            self._watch.close()
            self._watch = None

    async def _sessions(self) -> NoReturn:
        config = self._config
        where = f"{config.host}:{config.port}"
        backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S, fresh_after_s=FRESH_AFTER_S)
        # An outage runs from a failure until a connection has held FRESH_AFTER_S: connections
        # lost sooner belong to it, so a flapping broker is logged (and audited) once.
        down_since: float | None = None
        reported: set[str] = set()  # the failures logged in this outage
        announced = False  # mqtt_connected logged since the outage began
        while True:
            connected_at: float | None = None
            try:
                async with Client(
                    config.host,
                    config.port,
                    identifier=config.client_id,
                    protocol=aiomqtt.ProtocolVersion(MQTTProtocolVersion.MQTTv5),
                    tls_context=self._context,
                    timeout=PUBLISH_TIMEOUT_S,
                    keepalive=KEEPALIVE_S,
                    # No limit in paho: the sink keeps the broker's Receive Maximum itself
                    # (Acknowledgements). With a limit, paho rescans every unacknowledged
                    # message at each PUBACK (Client._update_inflight): quadratic in a batch.
                    max_inflight_messages=0,
                ) as client:
                    connected_at = time.monotonic()
                    if not announced:
                        after = {} if down_since is None else {"down_s": _since(down_since)}
                        log.info(
                            "mqtt_connected",
                            address=where,
                            receive_maximum=client.receive_maximum,  # what bounds its throughput
                            **after,
                        )
                        announced = True
                    await self._session(client)
            except aiomqtt.MqttError as e:
                error, spool_failed = self._explained(e), False
            except (ChannelError, OSError) as e:  # out of descriptors, an I/O error: retried
                error, spool_failed = str(e), True
            held_s = 0.0 if connected_at is None else time.monotonic() - connected_at
            if held_s >= FRESH_AFTER_S:
                down_since = None  # the outage before this connection is over
            if down_since is None:
                down_since, reported, announced = time.monotonic(), set(), False
            delay = backoff.after(held_s)
            if error in reported:
                pass
            elif spool_failed:
                log.warning("mqtt_spool_unreadable", error=error, retry_in_s=round(delay, 2))
            else:
                log.warning(
                    "mqtt_unreachable", address=where, error=error, retry_in_s=round(delay, 2)
                )
            reported.add(error)
            await asyncio.sleep(delay)

    async def _session(self, client: Client) -> None:
        """Forward until the connection is lost, noticed when it happens: a publish waiting
        for its acknowledgement would otherwise wait out its timeout."""
        watching = asyncio.create_task(_disconnection(client))
        forwarding = asyncio.create_task(self._forward(client))
        try:
            done, _ = await asyncio.wait(
                (watching, forwarding), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (watching, forwarding):
                task.cancel()
            await asyncio.gather(watching, forwarding, return_exceptions=True)
        # Both may have ended in the same step: a fault of the forwarding (a bug, not a lost
        # connection) must not be taken for the connection lost and retried silently.
        if forwarding in done:
            forwarding.result()
        done.pop().result()  # raises: neither task ends otherwise

    async def _forward(self, client: Client) -> NoReturn:
        acks = Acknowledgements(client)
        while True:
            # From the saved position: what an interrupted round had read is read again.
            receiver = SpoolReceiver(self._spool_dir, self._state_dir, reader=self.name)
            try:
                await self._rounds(acks, receiver)
            finally:
                receiver.close()

    async def _rounds(self, acks: Acknowledgements, receiver: SpoolReceiver) -> None:
        """Rounds of records read, published and acknowledged, until one is stopped."""
        watch = self._watch
        if watch is None:
            raise RuntimeError("the MQTT sink forwards only while it runs")
        prefix = self._config.topic_prefix
        self._delivered(receiver, 0)  # the position it starts from
        while True:
            if self._held():
                await asyncio.sleep(IDLE_S)  # fail closed; the spool keeps what waits
                continue
            records = receiver.receive(max_records=BATCH)
            if not records:
                await watch.wait()  # the spool grew, or IDLE_S where it is not watched
                continue
            view = self._authz.view(self._config.identity)
            groups = by_asset(r for r in records if r.signal in view)
            records.clear()  # the groups hold the records now, each freed once it is encoded
            allowed = sum(map(len, groups.values()))
            refused: list[Record] = []
            cut = messages(prefix, groups, acks.most_bytes, refused)
            if not await acks.published(cut, self._still_allowed(view)):
                # Stopped: the position stays, and a new reader starts again from it (what
                # the round published goes out again, unless no longer granted).
                return
            # Acknowledged: the position moves past the batch. Its fsync in a worker thread
            # leaves the loop to the other outputs meanwhile.
            await asyncio.to_thread(receiver.commit)
            self._delivered(receiver, allowed - len(refused))

    def _still_allowed(self, view: frozenset[str]) -> Callable[[], bool]:
        """Whether a round read with `view` may go on publishing: asked again while it runs,
        since a round waits on its broker's acknowledgements (up to minutes, for a slow one)
        and nothing may cross once held or no longer granted."""

        def still_allowed() -> bool:
            nonlocal view
            if self._held():
                return False
            current = self._authz.view(self._config.identity)
            if current is not view:  # a policy reloaded: the same grants, or fewer
                if current != view:
                    return False
                view = current
            return True

        return still_allowed

    def _held(self) -> bool:
        """Nothing new crosses while the audit log cannot be written or the policy expired
        (the API answers 503 then)."""
        audit_failing = self._audit is not None and self._audit.failing
        return audit_failing or datetime.now(UTC) >= self._authz.policy.expires

    def _delivered(self, receiver: SpoolReceiver, count: int) -> None:
        if self._metrics is not None:
            self._metrics.output_records.labels(self.name).inc(count)
            self._metrics.output_seq.labels(self.name).set(receiver.last_seq)

    def _explained(self, error: aiomqtt.MqttError) -> str:
        """The error, with its cause, and for a certificate that does not name the broker's
        address the key that fixes it."""
        text = str(error)
        if error.__cause__ is not None:
            text = f"{text}: {error.__cause__}"
        if "mismatch, certificate is not valid for" in text:  # CPython's ssl verify message
            key = "server_name" if self._config.server_name else "host"
            text += (
                f"; the MQTT broker's certificate does not name {self._server_name!r} "
                f"(enterprise.mqtt.{key}): set enterprise.mqtt.server_name to a DNS name or "
                "IP address it carries"
            )
        return text


async def _disconnection(client: aiomqtt.Client) -> NoReturn:
    """Raises MqttError when the client loses its connection. The message iterator is
    aiomqtt's one public view of the connection; nothing is subscribed, so no message comes."""
    try:
        async for _ in client.messages:
            pass
    except aiomqtt.MqttError as e:  # "Disconnected during message iteration", from the cause
        raise aiomqtt.MqttError(f"connection lost: {e.__cause__ or 'closed'}") from None
    raise aiomqtt.MqttError("connection lost")  # the iterator ends only by raising


def _since(start: float) -> float:
    return round(time.monotonic() - start, 1)

"""The MQTT sink: records to an existing MQTT broker over mutual TLS, with store-and-forward.

MQTT 5, QoS 1, retained. One message per asset per batch: topic `<prefix>/<asset path>`,
payload a JSON array of the API's records of that asset's signals, in spool order (one
message per record tops out near 6,000 records/s against Mosquitto over TLS; ADR 0007).
It publishes what the co-signed policy grants the sink's consumer identity, like any other
consumer. Store-and-forward: the sink reads the spool with a position of its own
(`spool-position-mqtt.json`), so the spool is its on-disk queue: while the MQTT broker is
unreachable the position stays, and on reconnect the records are replayed in order. The
position moves only after the broker acknowledged a batch: delivery is at least once.
Records the spool's retention drops before the sink read them are counted and logged
(`spool_records_lost`), like any reader's.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import structlog
from paho.mqtt.enums import MQTTProtocolVersion

from broker.channel.spool import SpoolReceiver
from broker.config import MqttConfig
from broker.enterprise.authz import Authorization
from broker.errors import ChannelError
from broker.records import Record, to_json
from broker.trust import tls

BATCH = 2000
RECORDS_PER_MESSAGE = 100  # keeps a message well under brokers' usual size limits
IDLE_S = 0.05
BACKOFF_MAX_S = 30.0

log = structlog.get_logger("mqtt")


class MqttSink:
    def __init__(
        self, config: MqttConfig, spool_dir: Path, state_dir: Path, authz: Authorization
    ) -> None:
        self._config = config
        self._spool_dir = spool_dir
        self._state_dir = state_dir
        self._authz = authz
        self._context = tls.client_context(config.ca, config.cert, config.key)

    async def run(self) -> None:
        config = self._config
        where = f"{config.host}:{config.port}"
        backoff = 1.0
        while True:
            receiver: SpoolReceiver | None = None
            try:
                # From the saved position: what an interrupted batch had read is read again.
                receiver = SpoolReceiver(self._spool_dir, self._state_dir, reader="mqtt")
                async with aiomqtt.Client(
                    config.host,
                    config.port,
                    identifier=config.client_id,
                    protocol=aiomqtt.ProtocolVersion(MQTTProtocolVersion.MQTTv5),
                    tls_context=self._context,
                    timeout=10,
                    max_inflight_messages=BATCH,  # a batch's publishes go out together
                ) as client:
                    log.info("mqtt_connected", address=where)
                    backoff = 1.0
                    await self._forward(client, receiver)
            except aiomqtt.MqttError as e:
                log.warning("mqtt_unreachable", address=where, error=str(e), retry_in_s=backoff)
            except (ChannelError, OSError) as e:  # out of descriptors, an I/O error: retried
                log.warning("mqtt_spool_unreadable", error=str(e), retry_in_s=backoff)
            finally:
                if receiver is not None:
                    receiver.close()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _forward(self, client: aiomqtt.Client, receiver: SpoolReceiver) -> None:
        prefix = self._config.topic_prefix
        while True:
            records = receiver.receive(max_records=BATCH)
            if not records:
                await asyncio.sleep(IDLE_S)
                continue
            view = self._authz.view(self._config.identity)
            allowed = [r for r in records if r.signal in view]
            await asyncio.gather(
                *(
                    client.publish(f"{prefix}/{asset}", to_json(message), qos=1, retain=True)
                    for asset, message in by_asset(allowed)
                )
            )
            receiver.commit()  # acknowledged: the position moves past the batch


def by_asset(records: list[Record]) -> Iterator[tuple[str, list[Record]]]:
    """The records grouped per asset path, each group in order and cut into messages."""
    groups: defaultdict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.signal.rpartition("/")[0]].append(record)
    for asset, group in groups.items():
        for start in range(0, len(group), RECORDS_PER_MESSAGE):
            yield asset, group[start : start + RECORDS_PER_MESSAGE]

"""The MQTT sink's acknowledgement window: a round's messages published at QoS 1 on the
session's paho client, at most the broker's Receive Maximum of them unacknowledged, and their
PUBACKs awaited together (ADR 0007's amendments)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any

import aiomqtt
from paho.mqtt import client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

YIELD_BYTES = 1 << 20  # published in a row before paho's writer gets the loop
# A message's bytes at most (its whole PUBLISH packet) where the broker's CONNACK announces no
# Maximum Packet Size: under a broker's unannounced limit of 64 KiB or more (Mosquitto's
# message_size_limit, AWS IoT's 128 KB) and above a caught-up message (one scan, ~8 KB).
MAX_MESSAGE_BYTES = 65_536
PUBLISH_TIMEOUT_S = 10.0  # a broker that is connected but acknowledges nothing this long
# What a broker's CONNACK without a Receive Maximum allows in flight (MQTT 5 §3.2.2.3.3).
RECEIVE_MAXIMUM_ABSENT = 65_535


class Client(aiomqtt.Client):
    """aiomqtt's client, keeping the Receive Maximum and Maximum Packet Size of the broker's
    CONNACK: aiomqtt passes none of its properties on, and paho obeys none of them."""

    receive_maximum: int | None = None  # until the CONNACK
    maximum_packet_size: int | None = None  # the CONNACK's, where it announces one

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,  # paho's, unused
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.receive_maximum = getattr(properties, "ReceiveMaximum", RECEIVE_MAXIMUM_ABSENT)
        self.maximum_packet_size = getattr(properties, "MaximumPacketSize", None)
        super()._on_connect(client, userdata, flags, reason_code, properties)


class Acknowledgements:
    """A batch's messages published at QoS 1 and their PUBACKs awaited together, on the
    session's paho client. aiomqtt's `publish` costs a task, an event, a timeout task and a
    scan of every pending call per message, which was most of the sink's time
    (docs/performance.md, "The enterprise half at 100,000 points/s"). aiomqtt still owns the
    connection, its socket callbacks and noticing its loss.

    At most the broker's Receive Maximum of them are unacknowledged at a time (MQTT 5 §3.3.4;
    a broker may disconnect a client that sends more): the rest wait for PUBACKs to make room.
    paho's own limit is not used for it (ADR 0007's amendment: quadratic)."""

    def __init__(self, client: Client) -> None:
        paho = getattr(client, "_client", None)  # private: aiomqtt has no batch publish
        if not isinstance(paho, mqtt.Client) or client.receive_maximum is None:
            raise RuntimeError(
                f"aiomqtt {version('aiomqtt')} holds no paho Client in Client._client or did "
                "not pass its CONNACK to Client._on_connect: the MQTT sink needs the aiomqtt "
                "version pyproject.toml pins"
            )
        self._paho = paho
        self._window = client.receive_maximum  # PUBLISHes unacknowledged at most
        self.most_bytes = client.maximum_packet_size or MAX_MESSAGE_BYTES  # a PUBLISH's
        self.most_unacknowledged = 0  # the high-water mark of the window, this session
        # paho leaves Nagle on: a batch's second message would wait for the broker's delayed
        # ACK of the first (up to 40 ms on Linux) before it leaves.
        connection = self._paho.socket()
        if isinstance(connection, socket.socket):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # aiomqtt's callback is replaced: its own `client.publish` would now wait out its
        # timeout, so the sink never calls it (tests/enterprise/test_mqtt_paho.py checks).
        self._paho.on_publish = self._acknowledged
        self._waiting: set[int] = set()
        self._room: asyncio.Future[None] | None = None  # while it waits for PUBACKs
        self._room_at = 0  # unacknowledged messages at most that end the wait
        self._last_acknowledged = 0.0  # time.monotonic() of the session's latest PUBACK
        self._refusal = ""  # the first PUBACK of the session that refused its message

    async def published(
        self, messages: Iterable[tuple[str, bytes]], still_allowed: Callable[[], bool]
    ) -> bool:
        """Publish each (topic, payload), retained, and return True once every one is
        acknowledged; False, having published no more, once `still_allowed()` says no (asked
        before each wait: for room in the window, or for paho's writer). MqttError if one
        cannot be sent, the broker refuses one (a PUBACK's reason code 0x80 or above), or
        PUBLISH_TIMEOUT_S passes without an acknowledgement (a long batch on a loaded machine
        is not a broker that stopped)."""
        queued = 0  # payload bytes published since the loop last ran
        try:
            for topic, payload in messages:
                if len(self._waiting) >= self._window:
                    if not still_allowed():
                        break
                    queued = 0  # the wait gives paho's writer the loop
                    await self._acknowledged_down_to(self._window - 1)
                info = self._paho.publish(topic, payload, qos=1, retain=True)
                if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:  # before the watch noticed it
                    raise aiomqtt.MqttError("connection lost: no connection to publish on")
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
                self._waiting.add(info.mid)  # its PUBACK is read on this loop, after this call
                self.most_unacknowledged = max(self.most_unacknowledged, len(self._waiting))
                queued += len(payload)
                if queued >= YIELD_BYTES:
                    # paho writes on the loop's writer callback: until it runs, each message
                    # is held twice (its payload, its packet). PUBACKs read meanwhile count.
                    queued = 0
                    if not still_allowed():
                        break
                    await asyncio.sleep(0)
            else:
                await self._acknowledged_down_to(0)
                return True
            # Stopped: what is in flight is awaited, so the next round keeps to the window.
            await self._acknowledged_down_to(0)
            return False
        finally:
            self._waiting.clear()

    async def _acknowledged_down_to(self, unacknowledged: int) -> None:
        """Until at most `unacknowledged` messages await their PUBACK; MqttError once
        PUBLISH_TIMEOUT_S passes in this wait without one, or once a PUBACK refused one."""
        if len(self._waiting) > unacknowledged and not self._refusal:
            await self._room_made(unacknowledged)
        if self._refusal:  # not delivered: the round fails, its position stays
            raise aiomqtt.MqttError(self._refusal)

    async def _room_made(self, unacknowledged: int) -> None:
        self._room = asyncio.get_running_loop().create_future()
        self._room_at = unacknowledged
        since = time.monotonic()  # the sink's own work before it is not the broker's silence
        try:
            while not self._room.done():
                silent_s = time.monotonic() - max(since, self._last_acknowledged)
                if silent_s >= PUBLISH_TIMEOUT_S:
                    raise aiomqtt.MqttError("Operation timed out")
                await asyncio.wait((self._room,), timeout=PUBLISH_TIMEOUT_S - silent_s)
        finally:
            self._room = None

    def _acknowledged(
        self, _client: object, _userdata: object, mid: int, reason: object, _props: object
    ) -> None:
        self._waiting.discard(mid)
        self._last_acknowledged = time.monotonic()
        if isinstance(reason, ReasonCode) and reason.is_failure and not self._refusal:
            self._refusal = (
                f"the MQTT broker refused a message: PUBACK {reason} (0x{reason.value:02X})"
            )
        room = self._room
        if room is None or room.done():
            return
        if len(self._waiting) <= self._room_at or self._refusal:
            room.set_result(None)

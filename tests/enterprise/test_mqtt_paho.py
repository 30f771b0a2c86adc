"""The MQTT sink's use of aiomqtt's private paho client (review F8): refused with a clear
error if an aiomqtt upgrade moves it; nothing in the sink waits on aiomqtt's `publish`."""

from __future__ import annotations

import inspect
import re

import aiomqtt
import pytest

from broker.enterprise.outputs import mqtt, mqtt_acks, mqtt_messages


def connected(receive_maximum: int | None) -> mqtt_acks.Client:
    """A client as after a CONNACK with this Receive Maximum (never connected: that needs a
    running loop); None as if aiomqtt no longer passed the CONNACK to `_on_connect`."""
    client = mqtt_acks.Client("localhost")
    client.receive_maximum = receive_maximum
    return client


async def test_the_sink_publishes_on_the_paho_client_of_the_pinned_aiomqtt() -> None:
    client = connected(20)
    acks = mqtt_acks.Acknowledgements(client)
    assert client._client.on_publish == acks._acknowledged
    # aiomqtt's CONNACK callback is the sink's, which keeps the Receive Maximum.
    assert client._client.on_connect == client._on_connect
    assert type(client)._on_connect is not aiomqtt.Client._on_connect


async def test_an_aiomqtt_without_a_paho_client_is_refused_with_a_clear_error() -> None:
    client = connected(20)
    client._client = None  # type: ignore[assignment]  # as if renamed by an upgrade
    with pytest.raises(RuntimeError, match=r"holds no paho Client in Client\._client"):
        mqtt_acks.Acknowledgements(client)


async def test_an_aiomqtt_that_keeps_the_connack_from_the_sink_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"did not pass its CONNACK to Client\._on_connect"):
        mqtt_acks.Acknowledgements(connected(None))


def test_nothing_in_the_sink_calls_aiomqtts_publish() -> None:
    """Its PUBACK callback is replaced: such a call would wait out aiomqtt's timeout."""
    sink = "".join(inspect.getsource(m) for m in (mqtt, mqtt_acks, mqtt_messages))
    publishes = re.findall(r"([\w.]+)\.publish\(", sink)
    assert publishes == ["self._paho"]

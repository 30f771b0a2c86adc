"""The MQTT sink's use of aiomqtt's private paho client (review F8): refused with a clear
error if an aiomqtt upgrade moves it; nothing in the sink waits on aiomqtt's `publish`."""

from __future__ import annotations

import inspect
import re

import aiomqtt
import pytest

from broker.enterprise.outputs import mqtt


async def test_the_sink_publishes_on_the_paho_client_of_the_pinned_aiomqtt() -> None:
    client = aiomqtt.Client("localhost")  # never connected (it needs a running loop)
    acks = mqtt._Acknowledgements(client)
    assert client._client.on_publish == acks._acknowledged


async def test_an_aiomqtt_without_a_paho_client_is_refused_with_a_clear_error() -> None:
    client = aiomqtt.Client("localhost")
    client._client = None  # type: ignore[assignment]  # as if renamed by an upgrade
    with pytest.raises(RuntimeError, match=r"holds no paho Client in Client\._client"):
        mqtt._Acknowledgements(client)


def test_nothing_in_the_sink_calls_aiomqtts_publish() -> None:
    """Its PUBACK callback is replaced: such a call would wait out aiomqtt's timeout."""
    publishes = re.findall(r"([\w.]+)\.publish\(", inspect.getsource(mqtt))
    assert publishes == ["self._paho"]

"""The OPC UA connector against servers that refuse it or misbehave: real asyncua servers on
127.0.0.1, with the misbehaviour injected on the server side (tests/plant/connectors/opcua_server.py).

A strict server refusing the broker's certificate until its administrator trusts it; values
of another type than the node's DataType; Bad statuses; Publish responses that never come.
The connector never crashes, never takes such a value as data, marks it `bad` and logs (so
audits) each state change once.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.connection import TransportLimits
from cryptography import x509

from broker.audit.catalogue import EVENTS
from broker.plant.connectors import opcua_keepalive
from broker.plant.connectors.opcua import OpcUaConnector
from broker.plant.connectors.opcua_session import SessionSettings, fingerprint
from broker.plant.connectors.supervision import SupervisedDevice
from tests.harness import eventually
from tests.plant.connectors.opcua_server import OpcUaPki, OpcUaTestServer
from tests.plant.connectors.test_opcua import (
    POWER,
    Collector,
    device,
    discover,
    plant_config,
    power_reader,
    running,
    serving,
    signals,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

REFUSED = "the server refused the broker's certificate"
MESSAGE = "site/line/plc/message"


def kinds(events: list[dict[str, Any]], *names: str) -> list[str]:
    return [e["event"] for e in events if e["event"] in names]


@pytest.fixture
def trust_folder(tmp_path: Path, pki: OpcUaPki) -> Iterator[Path]:
    """The server's trust folder: another CA's certificate, never the broker's."""
    folder = tmp_path / "server-trusts"
    folder.mkdir()
    shutil.copy(pki.rogue_cert, folder)
    yield folder


@asynccontextmanager
async def supervised(connector: OpcUaConnector, paths: list[str]) -> AsyncIterator[Collector]:
    """As the plant half runs it: under the supervisor."""
    collector = Collector()
    task = asyncio.create_task(
        SupervisedDevice("ua-plc", lambda: connector, paths).run(collector.emit)
    )
    try:
        yield collector
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("refuse_at", ["session", "channel"])
async def test_a_strict_server_refusing_our_certificate_is_named_and_trusted_mid_run(
    pki: OpcUaPki, trust_folder: Path, events: list[dict[str, Any]], refuse_at: str
) -> None:
    """`session`: asyncua's check at CreateSession (BadCertificateUntrusted); `channel`: a
    fault in the OpenSecureChannel answer, on which asyncua raises a bare AssertionError."""
    strict = OpcUaTestServer(pki, {"Power": 3.5}, trusted_clients=trust_folder, refuse_at=refuse_at)
    async with serving(strict) as server:
        connector = power_reader(server, pki)
        async with supervised(connector, [POWER]) as collector:
            await eventually(lambda: collector.quality(POWER) == "bad", timeout=20)
            await eventually(lambda: connector.errors >= 4, timeout=20)  # it keeps retrying
            assert collector.latest[POWER].raw is None
            assert server.services["ReadRequest"] == 0  # nothing was ever read
            await server.trust(pki.client_cert)  # the administrator trusts it, no restart
            await eventually(lambda: collector.quality(POWER) == "good", timeout=20)
            assert collector.latest[POWER].raw == 3.5
    down = [e for e in events if e["event"] == "device_session_down"]
    assert len(down) == 1, down  # one audited entry for the whole refusal
    sha256 = fingerprint(x509.load_pem_x509_certificate(pki.client_cert.read_bytes()))
    error = down[0]["error"]
    assert REFUSED in error and str(pki.client_cert) in error and sha256 in error, error
    assert "then the device comes up by itself" in error
    assert down[0]["error_code"] == "broker_certificate_refused"
    assert ("BadCertificateUntrusted" if refuse_at == "session" else "secure channel") in error
    retries = kinds(events, "device_reconnect_failed")
    assert len(retries) >= 3 and "device_reconnect_failed" not in EVENTS  # not audited
    assert kinds(events, "device_session_up", "device_session_down") == [
        "device_session_down",
        "device_session_up",
    ]
    assert kinds(events, "device_connector_failed") == []  # mapped at the boundary


async def test_discover_names_a_refusal_of_our_certificate_in_one_line(
    pki: OpcUaPki, trust_folder: Path
) -> None:
    strict = OpcUaTestServer(pki, {"Power": 1.0}, trusted_clients=trust_folder, refuse_at="channel")
    async with serving(strict) as server:
        done = await discover(
            server.endpoint, "--certificate", str(pki.client_cert), "--key", str(pki.client_key),
            "--trust", str(pki.ca),
        )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.startswith(f"dmzbroker: error: {server.endpoint}: {REFUSED}")
    assert f"give its administrator {pki.client_cert}" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback


async def wait_for_sample(collector: Collector, at: datetime) -> None:
    """Until the value the server stamped `at` has been handled."""
    await eventually(
        lambda: POWER in collector.latest and collector.latest[POWER].source_time == at
    )


@pytest.mark.parametrize("read", ["subscribe", "poll"])
async def test_values_of_another_type_than_the_node_models_are_never_data(
    pki: OpcUaPki, events: list[dict[str, Any]], read: str
) -> None:
    hostile_server = OpcUaTestServer(pki, {"Power": 1.5}, hostile=True)  # a Double node
    async with serving(hostile_server) as server:
        connector = power_reader(server, pki, read=read)
        start = datetime(2026, 1, 1, tzinfo=UTC)
        hostile: list[tuple[Any, ua.VariantType | None]] = [
            ([1.0, 2.0], None),  # an array of the right type
            (b"\x00\x01", ua.VariantType.ByteString),
            (ua.EUInformation(DisplayName=ua.LocalizedText("kW")), None),  # an ExtensionObject
            ("12.5", None),  # text where a number is modelled
            (True, None),  # a bool: a number to Python, not to the model
        ]
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
            for step, (value, variant_type) in enumerate(hostile):
                at = start + timedelta(seconds=step)
                await server.set("Power", ua.Variant(value, variant_type), source_time=at)
                await wait_for_sample(collector, at)
                assert (collector.latest[POWER].raw, collector.latest[POWER].quality) == (
                    None,
                    "bad",
                ), value
            await server.set("Power", 7.25, source_time=start + timedelta(seconds=9))
            await wait_for_sample(collector, start + timedelta(seconds=9))
            assert (collector.latest[POWER].raw, collector.latest[POWER].quality) == (7.25, "good")
    taken = {s.raw for batch in collector.batches for s in batch if s.quality != "bad"}
    assert taken == {1.5, 7.25}
    changes = [
        (e["event"], e.get("reason"), e.get("variant"))
        for e in events
        if e["event"] in ("device_read_refused", "device_read_recovered")
    ]
    assert changes == [  # once per state change, not per value or per keep-alive
        ("device_read_refused", "value_unsupported", "Double[]"),
        ("device_read_refused", "type_mismatch", "ByteString"),
        ("device_read_recovered", None, None),
    ]
    refusals = [e for e in events if e["event"] == "device_read_refused"]
    assert all(e["modelled"] == ["Double"] for e in refusals)
    assert kinds(events, "device_session_down") == []  # the session stays up throughout


async def test_bad_statuses_are_bad_without_a_value_and_logged_once_per_change(
    pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    async with serving(OpcUaTestServer(pki, {"Power": 1.0}, hostile=True)) as server:
        connector = power_reader(server, pki)
        start = datetime(2026, 1, 1, tzinfo=UTC)
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
            statuses = [
                ua.StatusCodes.BadSensorFailure,
                ua.StatusCodes.BadSensorFailure,  # the same state: not logged again
                ua.StatusCodes.BadOutOfService,
                ua.StatusCodes.BadCommunicationError,
            ]
            for step, status in enumerate(statuses):
                at = start + timedelta(seconds=step)
                await server.set("Power", 1000.0 + step, status, at)
                await wait_for_sample(collector, at)
                assert collector.latest[POWER].quality == "bad"
                assert collector.latest[POWER].raw is None  # the value beside a Bad status
            await server.set("Power", 2.0, source_time=start + timedelta(seconds=9))
            await wait_for_sample(collector, start + timedelta(seconds=9))
            assert collector.quality(POWER) == "good"
    assert not any(
        s.raw is not None and s.raw >= 1000 for batch in collector.batches for s in batch
    )
    refused = [e for e in events if e["event"] == "device_read_refused"]
    assert [(e["reason"], e["status"]) for e in refused] == [("bad_status", "BadSensorFailure")]
    assert refused[0]["variant"] == "Double"  # the server did send a value beside the status
    assert kinds(events, "device_read_recovered") == ["device_read_recovered"]


async def test_publish_responses_that_stop_coming_mark_the_device_bad_until_they_resume(
    pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    async with serving(OpcUaTestServer(pki, {"Power": 4.0})) as server:
        # silence: max(1 s, 3 keep-alives of 0.1 s)
        connector = power_reader(server, pki, timeout_s=1.0)
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
            server.publishing = False
            try:
                await eventually(lambda: collector.quality(POWER) == "bad", timeout=10)
                errors = connector.errors
                await eventually(lambda: connector.errors >= errors + 2, timeout=20)
                assert collector.quality(POWER) == "bad"  # new sessions, still no Publish
            finally:
                server.publishing = True
            await eventually(lambda: collector.quality(POWER) == "good", timeout=20)
    down = [e for e in events if e["event"] == "device_session_down"]
    assert len(down) == 1 and "no Publish response for 1 s" in down[0]["error"], down
    assert kinds(events, "device_session_up", "device_session_down") == [
        "device_session_up",
        "device_session_down",
        "device_session_up",
    ]


async def test_a_server_revising_the_keep_alive_upward_cannot_stretch_the_silence_limit(
    pki: OpcUaPki, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers CreateSubscription with 5,000 keep-alive periods (8 minutes at
    0.1 s) and then stops publishing: the device goes bad after MAX_SILENCE_S (a minute;
    2 s here, so that the test is short), not after 25 minutes; the revision is audited
    once."""
    monkeypatch.setattr(opcua_keepalive, "MAX_SILENCE_S", 2.0)
    async with serving(OpcUaTestServer(pki, {"Power": 4.0})) as server:
        service = server.server.iserver.subscription_service
        service._clamp_keep_alive_count = lambda requested: 5000  # as a hostile server revises
        # 3 × 0.1 s + 1 s is below the cap of 2 s
        connector = power_reader(server, pki, timeout_s=1.0)
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
            server.publishing = False
            try:
                await eventually(lambda: collector.quality(POWER) == "bad", timeout=10)
                errors = connector.errors
                await eventually(lambda: connector.errors >= errors + 1, timeout=20)
            finally:
                server.publishing = True
    down = [e for e in events if e["event"] == "device_session_down"]
    assert len(down) == 1 and "no Publish response for 2 s" in down[0]["error"], down
    revised = [e for e in events if e["event"] == "subscription_revised"]
    assert len(revised) == 1, revised  # once, though every new session is revised again
    assert revised[0]["max_keep_alive_count"] == 5000 and revised[0]["silence_limit_s"] == 2.0


@pytest.mark.parametrize("read", ["subscribe", "poll"])
async def test_a_text_of_a_megabyte_is_refused_once_and_the_other_signals_stay_good(
    pki: OpcUaPki, events: list[dict[str, Any]], read: str
) -> None:
    huge = "x" * 1_000_000  # a String node: the right type, far over MAX_TEXT_BYTES
    async with serving(OpcUaTestServer(pki, {"Power": 1.5, "Message": huge})) as server:
        ua_plc = device(server, read=read)
        connector = OpcUaConnector(
            ua_plc,
            signals(server, "Power", "Message"),
            SessionSettings.build(ua_plc, plant_config(pki)),
        )
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(MESSAGE) == "bad", timeout=10)
            scans = connector.scans
            await eventually(lambda: connector.scans >= scans + 5, timeout=10)
            assert collector.quality(POWER) == "good" and collector.latest[POWER].raw == 1.5
            await server.set("Message", "defrost")  # a text of a normal size is taken again
            await eventually(lambda: collector.quality(MESSAGE) == "good", timeout=10)
    assert not any(s.raw == huge for batch in collector.batches for s in batch)
    refused = [e for e in events if e["event"] == "device_read_refused"]
    assert len(refused) == 1, refused  # once, not per poll or keep-alive
    assert refused[0]["signal"] == MESSAGE and refused[0]["reason"] == "value_unsupported"
    assert refused[0]["variant"] == "String(1000000 chars)"  # its size, never its content
    assert kinds(events, "device_session_down") == []


async def test_a_server_sending_a_message_over_the_limit_cannot_make_us_hold_it(
    pki: OpcUaPki, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that ignores the limits the broker announced (it acknowledges none, keeps
    its own 100 MiB) and answers a Read with 9 MiB: the response is refused at 8 MiB, the
    device goes down, and it is retried as after any lost session."""

    def acknowledge_no_limits(self: TransportLimits, hello: ua.Hello) -> ua.Acknowledge:
        return ua.Acknowledge(
            ReceiveBufferSize=65535, SendBufferSize=65535, MaxMessageSize=0, MaxChunkCount=0
        )

    monkeypatch.setattr(
        TransportLimits, "create_acknowledge_and_set_limits", acknowledge_no_limits
    )  # server side only: the client never acknowledges
    big = "y" * (9 * 1024 * 1024)
    async with serving(OpcUaTestServer(pki, {"Power": 1.5, "Message": big})) as server:
        ua_plc = device(server, read="poll")
        connector = OpcUaConnector(
            ua_plc,
            signals(server, "Power", "Message"),
            SessionSettings.build(ua_plc, plant_config(pki)),
        )
        async with running(connector) as collector:
            await eventually(lambda: collector.quality(POWER) == "bad", timeout=20)
            await eventually(lambda: connector.errors >= 2, timeout=20)  # retried
    assert not any(s.raw is not None for batch in collector.batches for s in batch)
    (down,) = [e for e in events if e["event"] == "device_session_down"]
    assert "BadRequestTooLarge" in down["error"], down

"""The consumer API over real mutual TLS, with certificates made by our own CLI."""

from __future__ import annotations

import ssl

import aiohttp
import msgspec
import pytest

from broker import policy
from broker.trust import tls
from tests.enterprise.served import POWER, RECORD_FIELDS, ROOM, Api, get, record
from tests.harness import DEMO_POLICY, Pki, eventually, read_events


async def test_snapshot_serves_the_latest_record_of_every_signal(api: Api) -> None:
    api.store.apply([record(ROOM, -17.5, 1), record(POWER, 15.2, 2), record(ROOM, -17.9, 3)])
    status, body = await get(api, "/v1/snapshot", api.consumer_ssl())
    assert status == 200
    records = {r["signal"]: r for r in body["records"]}  # type: ignore[index]
    assert set(records) == {ROOM, POWER}
    assert records[ROOM]["value"] == -17.9 and records[ROOM]["seq"] == 3
    assert set(records[ROOM]) == RECORD_FIELDS
    assert records[ROOM]["source_time"].endswith("Z")


async def test_one_signal_by_path_and_a_granted_signal_without_value_is_404(api: Api) -> None:
    api.store.apply([record(ROOM, -18.0, 1)])
    status, body = await get(api, f"/v1/signals/{ROOM}", api.consumer_ssl())
    assert status == 200 and body["value"] == -18.0  # type: ignore[index]
    status, body = await get(api, f"/v1/signals/{POWER}", api.consumer_ssl())
    assert status == 404 and "error" in body  # type: ignore[operator]


async def test_signal_metadata_describes_the_model_but_not_the_plant_topology(api: Api) -> None:
    status, body = await get(api, "/v1/signals", api.consumer_ssl())
    assert status == 200
    signals = {s["path"]: s for s in body["signals"]}  # type: ignore[index]
    assert signals[ROOM]["unit"] == "degC"
    model = policy.load(DEMO_POLICY).signals
    assert set(signals) == {s.path for s in model if s.lifecycle == "approved"}  # not proposed
    assert signals[ROOM]["range"] == {"min": -40, "max": 30}
    assert signals[ROOM]["outcomes"] == ["product_quality"]
    text = msgspec.json.encode(body).decode()
    for plant_detail in ("127.0.0.1", "input_register", "address", "plc-machine-room"):
        assert plant_detail not in text


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize(
    "path", ["/v1/snapshot", "/v1/signals", f"/v1/signals/{ROOM}", "/v1/stream"]
)
async def test_every_method_but_get_is_405(api: Api, method: str, path: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, api.base + path, ssl=api.consumer_ssl(), data=b"{}") as r,
    ):
        assert r.status == 405
        assert r.headers["Allow"] == "GET"


async def handshake_refused(api: Api, context: ssl.SSLContext) -> bool:
    """True when the request fails at the TLS layer (TLS 1.3 reports a missing cert late)."""
    try:
        await get(api, "/v1/snapshot", context)
    except (aiohttp.ClientConnectionError, ssl.SSLError):
        return True
    return False


async def test_consumer_without_certificate_is_refused(api: Api) -> None:
    assert await handshake_refused(api, api.client_ssl())


async def test_certificate_from_another_ca_is_refused(api: Api) -> None:
    context = api.client_ssl(api.pki.other_client_cert, api.pki.other_client_key)
    assert await handshake_refused(api, context)


def test_the_default_profile_is_tls_1_3_only_and_a_client_certificate_is_required(
    pki: Pki,
) -> None:
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_REQUIRED
    intermediate = tls.server_context(
        pki.server_cert, pki.server_key, pki.ca, profile="intermediate"
    )
    assert intermediate.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_a_tls_1_2_consumer_is_refused_under_the_default_profile(api: Api) -> None:
    context = api.consumer_ssl()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await handshake_refused(api, context)


async def test_the_good_certificate_gets_in(api: Api) -> None:
    assert not await handshake_refused(api, api.consumer_ssl())


async def test_stream_delivers_new_records_as_server_sent_events(api: Api) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(api.base + "/v1/stream", ssl=api.consumer_ssl()) as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        await eventually(lambda: api.store.subscriptions)
        api.store.apply([record(ROOM, -17.0, 7), record(POWER, 14.0, 8)])
        events = await read_events(response, 2)
    assert [(i, e["signal"], e["value"]) for i, e in events] == [(7, ROOM, -17.0), (8, POWER, 14.0)]


async def test_metrics_are_served_only_to_a_consumer_with_a_monitoring_role(api: Api) -> None:
    monitoring = api.client_ssl(api.pki.monitoring_cert, api.pki.monitoring_key)
    async with aiohttp.ClientSession() as session:
        async with session.get(api.base + "/metrics", ssl=monitoring) as response:
            assert response.status == 200
            text = await response.text()
        async with session.get(api.base + "/metrics", ssl=api.consumer_ssl()) as response:
            assert response.status == 403  # the historian sees data, not the broker's health
    assert "dmzbroker_enterprise_audit_failing 0.0" in text
    assert "dmzbroker_streams_open 0.0" in text


async def test_the_records_served_are_counted_as_the_https_outputs(api: Api) -> None:
    """dmzbroker_output_records_total{output="https"}: what a snapshot, a signal and a stream
    delivered, nothing for a refused request (docs/specs/output.md)."""
    api.store.apply([record(ROOM, -18.0, 1), record(POWER, 12.0, 2)])
    assert (await get(api, "/v1/snapshot", api.consumer_ssl()))[0] == 200  # 2 records
    assert (await get(api, f"/v1/signals/{ROOM}", api.consumer_ssl()))[0] == 200  # 1
    energy = api.client_ssl(api.pki.energy_cert, api.pki.energy_key)
    assert (await get(api, f"/v1/signals/{ROOM}", energy))[0] == 403  # not granted: none
    async with (
        aiohttp.ClientSession() as session,
        session.get(api.base + "/v1/stream", ssl=api.consumer_ssl()) as response,
    ):
        await eventually(lambda: api.store.subscriptions)
        api.store.apply([record(ROOM, -17.0, 3)])
        await read_events(response, 1)  # 1
    monitoring = api.client_ssl(api.pki.monitoring_cert, api.pki.monitoring_key)
    async with (
        aiohttp.ClientSession() as session,
        session.get(api.base + "/metrics", ssl=monitoring) as response,
    ):
        text = await response.text()
    assert 'dmzbroker_output_records_total{output="https"} 4.0' in text


async def test_the_monitoring_consumer_sees_no_plant_values(api: Api) -> None:
    api.store.apply([record(ROOM, -18.0, 1)])
    monitoring = api.client_ssl(api.pki.monitoring_cert, api.pki.monitoring_key)
    _, snapshot = await get(api, "/v1/snapshot", monitoring)
    assert snapshot["records"] == []  # type: ignore[index]

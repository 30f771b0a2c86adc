"""Failed TLS handshakes are seen and logged (asyncio alone would hide them)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog

from broker.trust import tls
from tests.harness import Pki, eventually, ok_server


@pytest.fixture
async def url(pki: Pki) -> AsyncIterator[str]:
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    async with ok_server(context) as port:
        yield f"https://localhost:{port}/"


async def status(url: str, context: ssl.SSLContext) -> int | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
            return response.status
    except (aiohttp.ClientConnectionError, ssl.SSLError):
        return None


async def test_a_good_consumer_is_handed_over_to_the_api(url: str, pki: Pki) -> None:
    context = tls.client_context(pki.ca, pki.client_cert, pki.client_key)
    assert await status(url, context) == 200
    assert await status(url, context) == 200  # and again, on the kept-alive connection


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("no certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("another CA", "CERTIFICATE_VERIFY_FAILED"),
    ],
)
async def test_a_refused_handshake_is_logged_with_its_reason(
    url: str, pki: Pki, who: str, reason: str
) -> None:
    if who == "no certificate":
        context = tls.client_context(pki.ca)
    else:
        context = tls.client_context(pki.ca, pki.other_client_cert, pki.other_client_key)
    with structlog.testing.capture_logs() as logs:
        assert await status(url, context) is None
        await eventually(lambda: any(e["event"] == "tls_handshake_failed" for e in logs), timeout=5)
    failed = [e for e in logs if e["event"] == "tls_handshake_failed"]
    assert failed[0]["reason"] == reason
    assert failed[0]["remote"] == "127.0.0.1"


async def test_a_tls_1_2_client_is_logged_as_refused_under_the_default_profile(
    url: str, pki: Pki
) -> None:
    context = tls.client_context(pki.ca, pki.client_cert, pki.client_key)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with structlog.testing.capture_logs() as logs:
        assert await status(url, context) is None
        await eventually(lambda: any(e["event"] == "tls_handshake_failed" for e in logs), timeout=5)
    assert [e["reason"] for e in logs if e["event"] == "tls_handshake_failed"] == [
        "UNSUPPORTED_PROTOCOL"
    ]

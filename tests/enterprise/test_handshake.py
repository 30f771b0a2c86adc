"""From TLS to aiohttp: what the HTTP layer answers by itself is JSON that repeats nothing of
the request, is counted and logged once per episode (never a traceback per request), and
no answer names the server's software.

Real parts: the broker's listener and API app over mutual TLS on 127.0.0.1, and the real
`dmzbroker enterprise` process for what reaches its log.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
import structlog

from tests.enterprise.served import ROOM, Api
from tests.harness import BrokerProcess, Deployment, Pki, consumer_ssl, eventually, get_json

MARK = b"ECHO-ME-0123456789"  # would show up in an answer that repeats the request
MALFORMED = [
    b"G(T /v1/" + MARK + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a bad method
    b"GET /v1/snapshot HTTP/9.9\r\nHost: " + MARK + b"\r\n\r\n",  # an unknown version
    b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: -" + MARK + b"\r\n\r\n",
    b"GET /v1/signals/" + MARK * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # line too long
    b"GET /v1/snapshot HTTP/1.1\r\nX-" + MARK + b"\x01: 1\r\n\r\n",  # a bad header name
]


async def exchange(
    port: int, raw: bytes, context: ssl.SSLContext
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes over mutual TLS; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                name.lower(): value
                for name, _, value in (line.partition(": ") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    return int(lines[0].split()[1]), headers, body


def assert_a_quiet_json_400(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert set(json.loads(body)) == {"error"}
    assert MARK not in body and b"ECHO" not in body
    assert "server" not in headers


def port_of(api: Api) -> int:
    return int(api.base.rsplit(":", 1)[1])


async def test_a_malformed_request_gets_json_counted_and_logged_once_per_episode(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with structlog.testing.capture_logs() as logs:
        for raw in MALFORMED:
            assert_a_quiet_json_400(*await exchange(port_of(api), raw, api.consumer_ssl()))
        api.listener.close()  # ends the episode with its counts
    assert api.listener.stats.http_errors == {"400": len(MALFORMED)}
    malformed = [e for e in logs if e["event"] == "requests_malformed"]
    assert len(malformed) == 1
    assert malformed[0]["status"] == 400 and malformed[0]["remote"] == "127.0.0.1"
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]
    ended = [e for e in logs if e["event"] == "requests_malformed_ended"]
    assert sum(ended[0]["counts"].values()) == len(MALFORMED)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"GET /v1/signals HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /v1/signals/" + ROOM.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /v1/signals HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ],
)
async def test_no_answer_names_the_server_software(api: Api, raw: bytes, expected: int) -> None:
    status, headers, _ = await exchange(port_of(api), raw, api.consumer_ssl())
    assert status == expected
    assert "server" not in headers


async def test_the_enterprise_half_answers_malformed_requests_without_a_traceback_in_its_log(
    deployment: Deployment, pki: Pki, start_broker: object
) -> None:
    broker: BrokerProcess = start_broker("enterprise", deployment.config)  # type: ignore[operator]

    async def serving() -> bool:
        try:
            status, _ = await get_json(deployment.base_url + "/v1/signals", consumer_ssl(pki))
        except (OSError, ssl.SSLError):
            return False
        return status == 200

    await eventually(serving, timeout=60, interval=0.2)
    for raw in MALFORMED:
        assert_a_quiet_json_400(*await exchange(deployment.api_port, raw, consumer_ssl(pki)))
    await eventually(lambda: any('"requests_malformed"' in line for line in broker.events()), 10)
    lines = broker.events()
    assert not [line for line in lines if "Traceback" in line or "Error handling" in line]
    assert not [line for line in lines if MARK.decode() in line]
    assert len([line for line in lines if '"requests_malformed"' in line]) == 1
    assert broker.process.poll() is None

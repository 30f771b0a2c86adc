"""An independent TLS scanner (sslyze) agrees: the endpoint speaks TLS 1.3 only.

sslyze needs a client certificate to connect at all here (without one it reports no
connectivity, which is itself the refusal); with one, it cannot tell a TLS 1.3 server's
post-handshake refusal of a certificate-less client, so that part is asserted by
tests/enterprise/test_api.py and test_listener.py instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sslyze import (
    ClientAuthenticationCredentials,
    ScanCommand,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)

from broker.trust import tls
from tests.harness import Pki, ok_server

PROTOCOLS = {
    "SSL 2.0": ScanCommand.SSL_2_0_CIPHER_SUITES,
    "SSL 3.0": ScanCommand.SSL_3_0_CIPHER_SUITES,
    "TLS 1.0": ScanCommand.TLS_1_0_CIPHER_SUITES,
    "TLS 1.1": ScanCommand.TLS_1_1_CIPHER_SUITES,
    "TLS 1.2": ScanCommand.TLS_1_2_CIPHER_SUITES,
    "TLS 1.3": ScanCommand.TLS_1_3_CIPHER_SUITES,
}


@pytest.fixture
async def port(pki: Pki) -> AsyncIterator[int]:
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)  # the default profile
    async with ok_server(context) as chosen:
        yield chosen


def scan(port: int, pki: Pki) -> dict[str, bool]:
    location = ServerNetworkLocation(hostname="localhost", port=port, ip_address="127.0.0.1")
    # A consumer's certificate, so the scanner gets in; it also tries without one, which is
    # how it tells whether client authentication is required.
    network = ServerNetworkConfiguration(
        tls_server_name_indication="localhost",
        tls_client_auth_credentials=ClientAuthenticationCredentials(
            certificate_chain_path=pki.client_cert, key_path=pki.client_key
        ),
    )
    request = ServerScanRequest(
        server_location=location,
        network_configuration=network,
        scan_commands=set(PROTOCOLS.values()),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    assert result.connectivity_result is not None and result.scan_result is not None
    accepted = {
        name: bool(getattr(result.scan_result, command.value).result.accepted_cipher_suites)
        for name, command in PROTOCOLS.items()
    }
    return accepted


@pytest.mark.timeout(120)
async def test_sslyze_finds_tls_1_3_and_nothing_older(port: int, pki: Pki) -> None:
    accepted = await asyncio.to_thread(scan, port, pki)  # the server keeps answering meanwhile
    assert accepted == {name: name == "TLS 1.3" for name in PROTOCOLS}

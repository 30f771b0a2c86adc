"""Helpers for the API tests: records, the served API handle, a GET over mTLS."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime

import aiohttp

from broker.enterprise.authz import Authorization
from broker.enterprise.listener import Listener
from broker.enterprise.store import Store
from broker.records import Context, Record
from broker.trust import tls
from tests.harness import Pki

RECORD_FIELDS = {
    "signal", "value", "unit", "quality", "source_time", "broker_time", "seq", "policy_version", "context",
}  # fmt: skip
ROOM = "coldstore/storage/cold-room-1/temperature"
POWER = "coldstore/machine-room/compressor-1/motor_power"


def record(signal: str, value: float, seq: int) -> Record:
    now = datetime.now(UTC)
    return Record(
        signal=signal, value=value, unit="degC", quality="good", source_time=now, broker_time=now,
        policy_version=1, context=Context(asset_state="running"), seq=seq,
    )  # fmt: skip


class Api:
    def __init__(
        self, store: Store, base: str, pki: Pki, authz: Authorization, listener: Listener
    ) -> None:
        self.store = store
        self.base = base
        self.pki = pki
        self.authz = authz
        self.listener = listener

    def client_ssl(self, cert: object = None, key: object = None) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, cert, key)  # type: ignore[arg-type]

    def consumer_ssl(self) -> ssl.SSLContext:
        return self.client_ssl(self.pki.client_cert, self.pki.client_key)


async def get(api: Api, path: str, context: ssl.SSLContext) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.get(api.base + path, ssl=context) as r:
        return r.status, await r.json()

"""The consumer API, served in-process over real mutual TLS on 127.0.0.1, behind the
broker's own listener (as `dmzbroker enterprise` serves it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import policy
from broker.audit.log import AuditLog
from broker.enterprise.api import create_app
from broker.enterprise.authz import Authorization
from broker.enterprise.listener import listen
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from broker.trust import tls
from tests.enterprise.served import Api
from tests.harness import DEMO_POLICY, Pki, free_port


@pytest.fixture
async def api(pki: Pki, tmp_path: Path) -> AsyncIterator[Api]:
    demo = policy.load(DEMO_POLICY)
    store = Store(demo, queue_limit=100)
    audit = AuditLog(
        tmp_path / "audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
    )
    metrics = EnterpriseMetrics(lambda: len(store.subscriptions), lambda: audit.failing)
    authz = Authorization(demo)
    app = create_app(store, authz, audit, metrics, tmp_path / "spool")
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    listener = await listen(runner, "127.0.0.1", port, context)
    try:
        yield Api(store, f"https://localhost:{port}", pki, authz, listener)
    finally:
        listener.close()
        store.close()
        await runner.cleanup()
        audit.close()

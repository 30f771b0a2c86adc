"""The enterprise half's process: spool receiver → store → HTTPS API.

Its only input is the spool, opened read-only; its only outputs are the consumer-facing
listeners. It holds no plant address and no plant credential.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from broker.channel.spool import SpoolReceiver
from broker.config import BrokerConfig
from broker.enterprise.api import create_app
from broker.enterprise.store import Store
from broker.errors import ConfigError
from broker.policy import Policy
from broker.trust import tls

POLL_S = 0.005  # how often an idle reader looks for new frames; bounds added latency

log = structlog.get_logger("enterprise")


async def run_enterprise(config: BrokerConfig, policy: Policy) -> None:
    ent = config.enterprise
    ssl_context = tls.server_context(ent.tls.cert, ent.tls.key, ent.tls.client_ca)
    receiver = SpoolReceiver(config.spool.dir, ent.state_dir)
    store = Store(policy, ent.stream_queue)
    runner = web.AppRunner(create_app(store, policy), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, ent.listen.host, ent.listen.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(
                f"enterprise.listen: cannot listen on {ent.listen.host}:{ent.listen.port}: {e.strerror}"
            ) from e
        log.info(
            "api_listening",
            address=f"https://{ent.listen.host}:{ent.listen.port}",
            policy_version=policy.version,
            resume_after_seq=receiver.last_seq,
        )
        await _deliver(receiver, store)
    finally:
        store.close()
        await runner.cleanup()
        receiver.close()


async def _deliver(receiver: SpoolReceiver, store: Store) -> None:
    while True:
        records = receiver.receive()
        if not records:
            await asyncio.sleep(POLL_S)
            continue
        store.apply(records)
        receiver.commit()
        await asyncio.sleep(0)  # let consumers drain between batches while catching up

"""The HTTPS API as an output: the consumer API (broker.enterprise.api) served on
`enterprise.listen` behind the broker's own TLS listener (broker.enterprise.listener).

It reads no spool of its own: it serves the half's `Store` (latest values, snapshots and the
SSE fan-out) to each consumer within what the policy grants that consumer's identity, asked
per request and per stream. Its TLS material is the half's `EndpointReloader`, so new
certificate, key, client CA or CRL files take effect for new connections without a restart.
It is always configured: a half with no consumer port would serve nothing and report nothing
(`/metrics` is served here too).

Read-only toward the plant like every output: it only answers GETs from the store.
"""

from __future__ import annotations

import asyncio
from typing import NoReturn

import structlog
from aiohttp import web

from broker.config import ListenConfig
from broker.enterprise.api import OUTPUT, create_app
from broker.enterprise.listener import Listener, fit_to_file_limit, listen
from broker.enterprise.outputs.base import OutputContext
from broker.errors import ConfigError
from broker.policy import Policy
from broker.trust.tls import EndpointReloader

SHUTDOWN_S = 2.0  # open requests and streams get this long to end at close

log = structlog.get_logger("enterprise")  # api_listening has always been the half's line


def configured(context: OutputContext) -> HttpsApi:
    """Always: `enterprise.listen` has defaults, and the half serves at least this."""
    ent = context.config.enterprise
    return HttpsApi(context, context.tls or EndpointReloader(ent.tls, ent.state_dir))


class HttpsApi:
    name = OUTPUT

    def __init__(self, context: OutputContext, tls: EndpointReloader) -> None:
        self._context = context
        self._tls = tls
        self._config: ListenConfig = context.config.enterprise.listen
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None

    @property
    def address(self) -> str:
        return f"https://{self._config.host}:{self._config.port}"

    async def start(self) -> None:
        """Listen on `enterprise.listen`; a port in use or a forbidden address is the
        operator's to fix, so it stops the half at start (ConfigError, one line)."""
        context, config = self._context, self._config
        limits = fit_to_file_limit(config)
        app = create_app(
            context.store, context.authz, context.audit, context.metrics, context.spool_dir
        )
        # The listener makes each connection's handler, with `limits.idle_timeout_s`.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_S
        )
        await self._runner.setup()
        try:
            self._listener = await listen(
                self._runner,
                config.host,
                config.port,
                self._tls,
                limits=limits,
                stats=context.connections,
            )
        except OSError as e:
            raise ConfigError(
                f"enterprise.listen: cannot listen on {config.host}:{config.port}: {e.strerror}"
            ) from e
        log.info(
            "api_listening",
            address=self.address,
            policy_version=context.authz.policy.version,
            resume_after_seq=context.store.last_seq,
            max_connections=limits.max_connections,
        )

    async def run(self) -> NoReturn:
        """Nothing to drive: the listener accepts and aiohttp answers on the event loop."""
        never: asyncio.Future[NoReturn] = asyncio.get_running_loop().create_future()
        await never

    def use_policy(self, policy: Policy) -> None:
        """Open streams keep going, with their view widened or narrowed to the new grants
        (requests ask `authz` each time)."""
        authz = self._context.authz
        for subscription in self._context.store.subscriptions:
            subscription.view = authz.view(subscription.identity)

    async def close(self) -> None:
        """Stop accepting, then end open requests and streams (at most SHUTDOWN_S)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

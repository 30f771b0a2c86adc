"""The output contract (docs/specs/output.md): what every way out of the enterprise half is
given, what it must provide, and how it is contained.

An output delivers what the co-signed policy grants one identity (or each client's own
identity) to one kind of IT consumer. It reads either the spool, with a position of its own
(`spool-position-<name>.json`: store-and-forward, at least once or idempotent), or the half's
`Store` (latest values and their fan-out). It never writes to the spool, the plant's state or
anything the plant half reads. One output's failure never stops another: each runs under
`run_contained`, which logs the failure once per outage and runs it again after a backoff.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol

from broker.audit.log import AuditLog
from broker.backoff import Backoff
from broker.config import BrokerConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.listener import ConnectionStats
from broker.enterprise.output_failures import OutputFailures
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from broker.policy import Policy
from broker.trust.tls import EndpointReloader

FIRST_RETRY_S = 1.0  # an output that raised runs again after this, doubling up to MAX_RETRY_S
MAX_RETRY_S = 30.0
STABLE_S = 60.0  # a run that lasted this long before failing starts the backoff afresh


@dataclass(frozen=True)
class OutputContext:
    """What the enterprise half gives every output: nothing of the plant's but the spool."""

    config: BrokerConfig
    authz: Authorization  # the policy in force: who may see what, revoked serials
    store: Store  # latest values, and new records as they are read
    audit: AuditLog  # `audit.failing`: outputs stop serving data while it cannot be written
    metrics: EnterpriseMetrics
    # The consumer port's TLS material in force, which the half reloads (files, SIGHUP, CRL):
    # the HTTPS output serves with it. None: the HTTPS output loads it itself (a test).
    tls: EndpointReloader | None = None
    connections: ConnectionStats = field(default_factory=ConnectionStats)  # shown in /metrics

    @property
    def spool_dir(self) -> Path:
        return self.config.spool.dir

    @property
    def state_dir(self) -> Path:
        return self.config.enterprise.state_dir


class Output(Protocol):
    """One way out. `name` is its registry name: in its logs, metrics and position file."""

    name: str

    async def start(self) -> None:
        """Bind what it serves on (a listening port). A ConfigError here stops the half at
        start-up with one line: an operator's mistake, not an IT-side outage. An output that
        connects out (a sink) does nothing here: an unreachable peer is never a reason to
        stop."""

    async def run(self) -> NoReturn:
        """Deliver until cancelled. Expected outages are retried inside; anything raised is
        contained by `run_contained`."""

    def use_policy(self, policy: Policy) -> None:
        """A newer policy was accepted (`authz` already answers for it)."""

    async def close(self) -> None:
        """Shut down: close listeners and connections; save nothing that was not delivered."""


async def run_contained(output: Output) -> NoReturn:
    """Run `output` until cancelled, whatever it raises: a failure is logged once per outage
    (`output_failed`, with the error; the same error again before the output has run
    `STABLE_S` is only retried) and the output runs again after a backoff; the half and the
    other outputs never see it."""
    failures = OutputFailures(output.name)
    backoff = Backoff(FIRST_RETRY_S, MAX_RETRY_S, fresh_after_s=STABLE_S)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        error: Exception | str
        try:
            await output.run()
            error = "RuntimeError: run() returned"  # a bug too: not run again in a tight loop
        except asyncio.CancelledError:
            raise
        except Exception as e:  # containment is this function's job
            error = e
        ran_s = loop.time() - started
        if ran_s >= STABLE_S:
            failures.recovered()  # it ran well for a while: this is a new outage
        delay = backoff.after(ran_s)
        failures.failed("run", error, retry_in_s=round(delay, 2))
        await asyncio.sleep(delay)

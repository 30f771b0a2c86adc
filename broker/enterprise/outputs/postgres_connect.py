"""How the PostgreSQL sink opens a session (docs/postgres.md): TLS with sslmode=verify-full,
a login by SCRAM bound to the TLS channel or by a client certificate, never a password in
clear, keepalives so a silent peer is noticed, and a session that an interruption drops at
once. Also the start-time check that `host` and `server_name` are what libpq takes as one
TCP host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import Any, TypeVar

import psycopg
from psycopg import waiting
from psycopg.abc import PQGen

from broker import safe_files
from broker.config import PostgresConfig, PostgresLogin
from broker.errors import ConfigError

CONNECT_TIMEOUT_S = 10
HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
PASSWORD_LIMIT = 4096  # bytes

RV = TypeVar("RV")


class Refused(Exception):
    """The server refuses the sink something only its owner or the operator can give."""


class _Connection(psycopg.AsyncConnection[Any]):
    """Interrupted (shutdown, an answer timeout), the session is dropped at once: psycopg
    would ask the server to cancel and wait up to 10 s more for a server that may be the
    very one that hangs (the supervisor kills a half that does not stop within 10 s)."""

    async def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:  # noqa: ASYNC109
        try:
            return await waiting.wait_async(
                gen, self.pgconn.socket, interval=interval, timeout=timeout
            )
        except asyncio.CancelledError:
            self.pgconn.finish()
            raise


def check_hosts(config: PostgresConfig) -> None:
    """ConfigError unless `host` and `server_name` are each a DNS name or an IP address."""
    for key in ("host", "server_name"):
        # libpq takes '/...' or '@...' for a Unix socket (no TLS) and ',' for several hosts
        host = getattr(config, key)
        if host is not None and not (HOST.fullmatch(host) or _is_ip(host)):
            raise ConfigError(
                f"enterprise.postgres.{key} {host!r}: must be a DNS name or an IP address"
            )


async def connect(
    config: PostgresConfig, login: PostgresLogin | None = None
) -> psycopg.AsyncConnection[Any]:
    """A session to `config`'s database as `login` (the sink's own login by default)."""
    login = login or config
    params: dict[str, Any] = {
        "host": config.server_name or config.host,  # the name verify-full checks
        "port": config.port,
        "dbname": config.database,
        "user": login.user,
        "sslmode": "verify-full",
        "sslrootcert": str(config.ca),
        "ssl_min_protocol_version": "TLSv1.2",
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": "dmzbroker",
        # The server converts to the database's encoding, and refuses (22P05) what it
        # cannot hold: one record left out, not a batch the sink could never encode.
        "client_encoding": "UTF8",
        "options": "-c TimeZone=UTC",
        # A silent peer (a cut cable, no FIN) is noticed in about 30 s, not hours.
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
        "keepalives_count": 3, "tcp_user_timeout": 30_000,
    }  # fmt: skip
    if config.server_name and config.server_name != config.host:
        params["hostaddr"] = await _address_of(config.host, config.port)
    if login.password_file is not None:
        # SCRAM bound to the TLS channel: neither a server asking for the password in
        # clear nor one relaying another server's SCRAM exchange ever gets it.
        params.update(password=_password(login), sslcertmode="disable",
                      require_auth="scram-sha-256", channel_binding="require")  # fmt: skip
    else:
        params.update(sslcert=str(login.cert), sslkey=str(login.key), require_auth="none")
    # Autocommit: each `transaction()` block is a transaction of its own, committed at
    # its end; nothing is left open between batches.
    return await _Connection.connect(autocommit=True, **params)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _password(login: PostgresLogin) -> str:
    assert login.password_file is not None
    try:
        data = safe_files.read_regular(login.password_file, PASSWORD_LIMIT, follow_links=True)
    except OSError as e:
        raise Refused(f"cannot read {login.password_file}: {e.strerror}") from None
    return data.decode(errors="replace").partition("\n")[0].rstrip("\r")


async def _address_of(host: str, port: int) -> str:
    """`host` as an IP address: libpq connects to `hostaddr` and verifies the name in `host`."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port)
    except OSError as e:
        raise psycopg.OperationalError(f"cannot resolve {host!r}: {e}") from None
    return str(found[0][4][0])

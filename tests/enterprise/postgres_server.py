"""A throwaway PostgreSQL for tests and benches: Debian's postgresql-15, run by `initdb` and
`pg_ctl` as an unprivileged user (`nobody` when the tests run as root, else the caller) in
a temporary folder, on 127.0.0.1 at a free port, TLS 1.3 only with a server certificate made
by our own CLI (naming localhost and 127.0.0.1).

Logins over TCP are by client certificate (PostgreSQL's `cert` method: the certificate's CN
is the role), or by password (scram-sha-256) for roles in the group `password_login`. The
superuser `postgres` exists only on the unix socket in the server's folder (`sql()`), for
setting up what a test needs; the sink never uses it.

Use (fixtures `postgres_pki`, session-wide, and `postgres`, one started server per test;
import both into the test module):

    sink = postgres.create_role("dmzbroker_sink")                  # by certificate
    owner = postgres.create_role("historian_owner", password="pw")  # by password file
    postgres.create_database("historian", owner="historian_owner")
    config = postgres.sink_config(CONSUMER_URI, sink, owner=owner)  # a PostgresConfig
    postgres.stop(); postgres.start()   # a clean stop; the same port again
    postgres.kill(); postgres.start()   # a crash (SIGKILL to every server process)
    postgres.pause(); postgres.resume() # a hung server (SIGSTOP / SIGCONT)
    postgres.sql("SELECT count(*) FROM dmzbroker.records", database="historian")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from broker.config import PostgresConfig, PostgresLogin
from tests.harness import dmzbroker, free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
PASSWORD_GROUP = "password_login"  # its members log in by password, everyone else by certificate
CLEARTEXT_GROUP = "cleartext_login"  # its members are asked for their password in clear
DATABASE = "historian"  # the database `sink_config` names unless told otherwise
UNPRIVILEGED = 65534  # nobody/nogroup: initdb and postgres refuse to run as root

CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{folder}'
unix_socket_permissions = 0777
max_connections = 40
shared_buffers = 64MB
ssl = on
ssl_cert_file = '{folder}/server.crt'
ssl_key_file = '{folder}/server.key'
ssl_ca_file = '{folder}/ca.crt'
ssl_min_protocol_version = 'TLSv1.3'
log_min_messages = warning
log_connections = off
"""
HBA = f"""
local all {SUPERUSER} trust
hostssl all +{CLEARTEXT_GROUP} 127.0.0.1/32 password
hostssl all +{PASSWORD_GROUP} 127.0.0.1/32 scram-sha-256
hostssl all all 127.0.0.1/32 cert
"""


@dataclass
class PostgresPki:
    """The database side's CA; the server certificate names localhost and 127.0.0.1. Client
    certificates are issued on demand, their CN the role they log in as."""

    directory: Path
    issued: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "postgres.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "postgres.key"

    def client(self, role: str) -> tuple[Path, Path]:
        """A client certificate and key for `role` (CN = role), issued once."""
        if role not in self.issued:
            dmzbroker("certs", "issue", "client", "--ca", str(self.directory),
                      "--out", str(self.directory), "--name", role,
                      "--uri", f"spiffe://test/postgres/{role}")  # fmt: skip
            self.issued[role] = (self.directory / f"{role}.crt", self.directory / f"{role}.key")
        return self.issued[role]


def make_pki(directory: Path) -> PostgresPki:
    dmzbroker("certs", "init-ca", "--out", str(directory), "--name", "PostgreSQL test CA")
    dmzbroker("certs", "issue", "server", "--ca", str(directory), "--out", str(directory),
              "--name", "postgres", "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    return PostgresPki(directory)


class PostgresServer:
    """One PostgreSQL cluster in a folder of its own; `close()` stops it and removes the
    folder. Every wait is bounded; a server that does not start says why (its log)."""

    def __init__(
        self, pki: PostgresPki, port: int | None = None, settings: Sequence[str] = ()
    ) -> None:
        self.pki = pki
        self.host = "127.0.0.1"
        self.port = port or free_port()
        # Under /tmp, not pytest's tmp_path: the server's user must reach it, and its socket
        # path must stay under the 107 bytes a unix socket name may have.
        self.folder = Path(tempfile.mkdtemp(prefix="dmzbroker-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._as_user = {"user": UNPRIVILEGED, "group": UNPRIVILEGED, "extra_groups": []}
            os.chown(self.folder, UNPRIVILEGED, UNPRIVILEGED)
        for source, name in ((pki.server_cert, "server.crt"), (pki.server_key, "server.key"),
                             (pki.ca, "ca.crt")):  # fmt: skip
            copy = self.folder / name
            shutil.copyfile(source, copy)
            copy.chmod(0o600)  # postgres refuses a key others may read
            if self._as_user:
                os.chown(copy, UNPRIVILEGED, UNPRIVILEGED)
        self._run(PG_BIN / "initdb", "-D", self.data, "-U", SUPERUSER, "--auth-local=trust",
                  "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(CONF.format(port=self.port, folder=self.folder))
            conf.writelines(f"{line}\n" for line in settings)
        (self.data / "pg_hba.conf").write_text(HBA)
        self._started_once = False

    def _run(self, program: Path, *args: object, timeout: float = 120) -> None:
        done = subprocess.run(
            [str(program), *map(str, args)], check=False, capture_output=True, text=True,
            timeout=timeout, cwd=self.folder, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            **self._as_user,
        )  # fmt: skip
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{program.name} {args}: {done.stderr.strip()}\n{log}")

    @property
    def running(self) -> bool:
        return self._postmaster() is not None

    def start(self) -> None:
        """Start on the same port as before; waits until it accepts connections."""
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")
        if not self._started_once:
            self._started_once = True
            self.sql(f"CREATE ROLE {PASSWORD_GROUP} NOLOGIN")
            self.sql(f"CREATE ROLE {CLEARTEXT_GROUP} NOLOGIN")

    def stop(self) -> None:
        """A clean, fast stop: connections are closed, the server writes its checkpoint."""
        if self.running:
            self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and every backend at once; the next start
        recovers from the WAL."""
        processes = self._signal_all(signal.SIGKILL)
        psutil.wait_procs(processes, timeout=30)

    def pause(self) -> None:
        """SIGSTOP to every server process: connections stay open and unanswered (a hung
        host), the kernel still acknowledging what is sent. `resume()` undoes it."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, number: int) -> list[psutil.Process]:
        pid = self._postmaster()
        if pid is None:
            return []
        try:
            processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(number)
        return processes

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.resume()  # a paused server would not stop
        try:
            self.stop()
        except RuntimeError:
            self.kill()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _postmaster(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def sql(
        self, statement: str, params: Sequence[object] = (), *, database: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser over the unix socket; its rows, if any."""
        with psycopg.connect(
            host=str(self.folder), port=self.port, user=SUPERUSER, dbname=database,
            autocommit=True, connect_timeout=30,
            cursor_factory=psycopg.ClientCursor,  # parameters in CREATE ROLE ... PASSWORD too
        ) as connection:  # fmt: skip
            cursor = connection.execute(statement.encode(), params)
            return cursor.fetchall() if cursor.description else []

    def create_role(
        self, name: str, *, password: str | None = None, cleartext: bool = False
    ) -> PostgresLogin:
        """A login role (NOSUPERUSER, no CREATEDB/CREATEROLE) and how it logs in: a client
        certificate whose CN is `name`, or with `password`, a password file holding it (the
        server asking for it by SCRAM, or in clear with `cleartext`)."""
        if password is None:
            self.sql(f'CREATE ROLE "{name}" LOGIN')
            cert, key = self.pki.client(name)
            return PostgresLogin(user=name, cert=cert, key=key)
        group = CLEARTEXT_GROUP if cleartext else PASSWORD_GROUP
        self.sql(f'CREATE ROLE "{name}" LOGIN IN ROLE {group} PASSWORD %s', (password,))
        password_file = self.pki.directory / f"{name}.password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        return PostgresLogin(user=name, password_file=password_file)

    def create_database(self, name: str = DATABASE, owner: str | None = None) -> None:
        """A database; its owner (if given) may create schemas in it."""
        self.sql(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ""))

    def terminate(self, user: str) -> int:
        """End every session of `user` (as an administrator's pg_terminate_backend would);
        how many there were."""
        rows = self.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s",
            (user,),
        )
        return int(rows[0][0])

    def sink_config(
        self,
        identity: str,
        login: PostgresLogin,
        *,
        owner: PostgresLogin | None = None,
        database: str = DATABASE,
        server_name: str = "localhost",
        **changes: Any,
    ) -> PostgresConfig:
        """`enterprise.postgres` for the sink: this server, verified by `server_name`."""
        settings: dict[str, Any] = {
            "host": self.host, "port": self.port, "server_name": server_name,
            "database": database, "ca": self.pki.ca, "identity": identity,
            "user": login.user, "cert": login.cert, "key": login.key,
            "password_file": login.password_file, "owner": owner,
        }  # fmt: skip
        settings.update(changes)
        return PostgresConfig(**settings)


@pytest.fixture(scope="session")
def postgres_pki(tmp_path_factory: pytest.TempPathFactory) -> PostgresPki:
    return make_pki(tmp_path_factory.mktemp("postgres-pki"))


@pytest.fixture
def postgres(postgres_pki: PostgresPki) -> Iterator[PostgresServer]:
    """A started PostgreSQL, stopped and removed after the test."""
    assert (PG_BIN / "postgres").exists(), "postgresql-15 is not installed: `make test` does"
    server = PostgresServer(postgres_pki)
    try:
        server.start()
        yield server
    finally:
        server.close()

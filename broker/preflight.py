"""The start check: every file `broker.yaml` names is there, readable, and fit for its use,
before a process that needs it starts.

`dmzbroker run` calls it for both halves before starting either; `plant`, `enterprise` and
`validate` for their own half (so a half restarted by `run` is checked again, and a problem
of one half's material never stops the other); `diode send|receive` for what they share.
A mistake stops the command with one line that names the config and its line, the key and
the resolved file: `broker.yaml:23: enterprise.tls.cert: /etc/dmzbroker/tls/sever.crt: file
not found` (the check runs inside `config.load`, whose errors carry the line).

Every `Path` in the config is checked by its key path: the folders the broker creates
(`CREATED`) are not, `plant.opcua.trust_list` entries may be files or folders, everything
else must be a readable regular file (a link to one is followed; a FIFO, a device or a
folder is refused at once, never read or waited on). A file the half tolerates missing
(`TOLERATED`: the CMMS export) gets a warning, never a refusal. TLS material is then checked
as broker.trust.tls does when it builds a context (broker.trust.fitness): the purpose of
each certificate, that each key is its certificate's, that the client CA file holds CAs
only, that the anchors for the MQTT broker, the PostgreSQL server and the collector are
certificates, and that the CRL is signed by the client CA. A PostgreSQL client key must also
have the mode libpq accepts (0600 or less; 0640 or less when root owns it): libpq refuses any
other at every connection, so the sink would never connect. A PostgreSQL password file
must give others no access and its group at most read (0640 or less).

Files are read as the user that starts the command. When `run` starts as root, each half
checks its own files again as its own user when it starts. This module never writes,
creates or fixes anything, and never reads a device or a peer.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import msgspec
import structlog

from broker.config import BrokerConfig
from broker.conversion_errors import KeyPath, render_path
from broker.errors import TrustError
from broker.safe_files import read_regular
from broker.trust import fitness
from broker.trust.revocation import read_crl

# Folders the broker makes when they are missing: never "not found".
CREATED = frozenset(
    {"spool.dir", "plant.state_dir", "enterprise.state_dir", "audit.dir", "diode.state_dir"}
)
# Files a half reads as an ordinary hiccup when they are missing or unreadable (the CMMS
# export: a copy may be under way): a warning, never a refusal (broker.plant.maintenance).
TOLERATED = frozenset({"plant.maintenance.file"})
_FILE_OR_FOLDER = re.compile(r"plant\.opcua\.trust_list\[\d+\]")
# Leaf certificates with their keys: (section, certificate key, private key key, purpose).
_LEAVES: tuple[tuple[str, str, str, fitness.Purpose | None], ...] = (
    ("enterprise.tls", "cert", "key", "server"),
    ("enterprise.mqtt", "cert", "key", "client"),
    ("enterprise.postgres", "cert", "key", "client"),
    ("enterprise.postgres.owner", "cert", "key", "client"),
    ("enterprise.opcua", "certificate", "private_key", "opcua-server"),
    ("audit.siem", "cert", "key", "client"),
    ("plant.opcua", "certificate", "private_key", "opcua"),
)
_USER_CERTIFICATE = re.compile(r"(plant\.opcua\.users\.[^.]+)\.certificate")  # purpose: any
# The CA that issues consumers' certificates must be a CA. The anchors for a server the
# appliance connects to need only be certificates: a pinned self-signed server certificate
# (CA:FALSE) or a v1 root is an anchor OpenSSL accepts.
_ANCHOR_FILES = {
    "enterprise.mqtt.ca": "give the MQTT broker's certificate or the CA that issued it",
    "enterprise.postgres.ca": "give the PostgreSQL server's certificate or the CA that issued it",
    "audit.siem.ca": "give the collector's certificate or the CA that issued it",
}
# Keys libpq reads (sslkey): it refuses one with more access than its mode rule allows.
_LIBPQ_KEYS = ("enterprise.postgres.key", "enterprise.postgres.owner.key")
_PASSWORD_FILES = ("enterprise.postgres.password_file", "enterprise.postgres.owner.password_file")


def problems(halves: Collection[str]) -> Callable[[BrokerConfig], Iterator[str]]:
    """The check for `config.load` of a process running `halves` ("plant", "enterprise";
    none: only what every process reads): it yields each problem with a file that process
    needs as `key.path: FILE: what is wrong` (documents.load raises the first, with its line)."""

    def check(config: BrokerConfig) -> Iterator[str]:
        named = {key: path for key, path in paths(config) if half_of(key) in (None, *halves)}
        for key, path in named.items():
            yield from _unreadable(key, path)
        for section, cert_name, key_name, purpose in _LEAVES:
            cert_key, key_key = f"{section}.{cert_name}", f"{section}.{key_name}"
            if cert_key in named and key_key in named:
                yield from _unfit_leaf(named, (cert_key, key_key), purpose)
        for user in filter(None, map(_USER_CERTIFICATE.fullmatch, list(named))):
            yield from _unfit_leaf(named, (user[0], f"{user[1]}.private_key"), None)
        if "enterprise.tls.client_ca" in named:
            path = named["enterprise.tls.client_ca"]
            yield from _unfit(
                "enterprise.tls.client_ca", path, fitness.unfit_ca, fitness.CONSUMERS_CA
            )
        modes = [(k, _too_open_for_libpq) for k in _LIBPQ_KEYS]
        for key, too_open in modes + [(k, _too_open_password) for k in _PASSWORD_FILES]:
            if key in named:
                yield from too_open(key, named[key])
        for anchor_key, fix in _ANCHOR_FILES.items():
            if anchor_key in named:
                yield from _unfit(anchor_key, named[anchor_key], fitness.unfit_anchors, fix)
        crl = named.get("enterprise.tls.crl")
        if crl is not None:
            try:
                read_crl(crl, named["enterprise.tls.client_ca"])
            except TrustError as e:
                yield f"enterprise.tls.crl: {e}"

    return check


def warn(config: BrokerConfig, halves: Collection[str]) -> None:
    """Log `start_file_unreadable` for each file of `halves` that is TOLERATED missing and is
    missing or unreadable now (called once logging is set up, so it reaches the log)."""
    for key, path in paths(config):
        if key in TOLERATED and half_of(key) in (None, *halves):
            problem = _unreadable_file(key, path)
            if problem is not None:
                structlog.get_logger("preflight").warning(
                    "start_file_unreadable", key=key, file=str(path), error=problem,
                    consequence="the half starts; maintenance reads unknown until it is back",
                )  # fmt: skip


def paths(config: BrokerConfig) -> Iterator[tuple[str, Path]]:
    """Every path the config holds, with its key path (`plant.opcua.trust_list[0]`)."""
    for steps, path in _walk(config, ()):
        yield render_path(steps), path


def half_of(key: str) -> str | None:
    """The half that reads the file at `key`; None: every process reads it (or none does)."""
    if key.startswith("audit.siem."):
        return "enterprise"  # the enterprise half exports the audit log
    first = key.split(".", 1)[0]
    return first if first in ("plant", "enterprise", "diode") else None


def _walk(value: object, steps: KeyPath) -> Iterator[tuple[KeyPath, Path]]:
    if isinstance(value, Path):
        yield steps, value
    elif isinstance(value, msgspec.Struct):
        for field in msgspec.structs.fields(value):
            yield from _walk(getattr(value, field.name), (*steps, field.name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*steps, index))
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _walk(item, (*steps, name))


# The largest file the config names: a signed policy of 100,000 signals is 70 MB
# (broker.policy.envelope.MAX_ENVELOPE_BYTES); each file's own reader holds it to its own limit.
_READ_LIMIT = 128 * 1024 * 1024


def _unreadable(key: str, path: Path) -> Iterator[str]:
    if key in CREATED:
        return
    if key == "audit.key" and path.with_suffix(".pub").is_file():
        return  # the private root key may be kept off the appliance (broker.audit.epochs)
    problem = None if key in TOLERATED else _unreadable_file(key, path)
    if problem is not None:
        yield f"{key}: {path}: {problem}"


def _unreadable_file(key: str, path: Path) -> str | None:
    """What keeps `path` from being read as a file (a link to one is followed): the read is
    bounded and never blocks, so a FIFO or a device at the path is refused at once."""
    try:
        if path.is_dir():
            return None if _FILE_OR_FOLDER.fullmatch(key) else "a folder; name the file itself"
        read_regular(path, _READ_LIMIT, follow_links=True)
    except FileNotFoundError:
        hint = " (nor audit.pub beside it); make it with `dmzbroker audit keygen`"
        return f"file not found{hint if key == 'audit.key' else ''}"
    except OSError as e:
        return f"cannot read: {e.strerror}"
    return None


def _unfit_leaf(
    named: dict[str, Path], keys: tuple[str, str], purpose: fitness.Purpose | None
) -> Iterator[str]:
    cert, key = (named[k] for k in keys)
    try:
        unfit = fitness.unfit_leaf(cert, key, purpose)
    except OSError as e:  # gone since it was opened, or unreadable: said above
        yield f"{keys[str(e.filename) != str(cert)]}: {e.filename}: cannot read: {e.strerror}"
        return
    if unfit is not None:
        at_fault, problem = unfit
        yield f"{keys[at_fault != cert]}: {at_fault}: {problem}"


def _unfit(
    key: str, path: Path, judge: Callable[[Path, str], str | None], fix: str
) -> Iterator[str]:
    try:
        problem = judge(path, fix)
    except OSError as e:  # gone since it was opened, or unreadable: said above
        yield f"{key}: {path}: cannot read: {e.strerror}"
        return
    if problem is not None:
        yield f"{key}: {path}: {problem}"


def _too_open_password(key: str, path: Path) -> Iterator[str]:
    """A password others may read, or anyone but its owner change, is no secret."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:  # said above
        return
    if mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO):
        yield (
            f"{key}: {path}: mode {mode:04o}: a password file must give others no access and "
            "its group at most read; chmod 600 it (or 640 for a group that must read it)"
        )


def _too_open_for_libpq(key: str, path: Path) -> Iterator[str]:
    """libpq's rule for a client key (fe-secure-openssl.c): group and others no access; when
    root owns it, the group may read it (system-wide keys read through a group)."""
    try:
        status = path.stat()
    except OSError:  # said above
        return
    by_root = status.st_uid == 0
    too_open = (
        stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO if by_root else stat.S_IRWXG | stat.S_IRWXO
    )
    if status.st_mode & too_open:
        mode, limit = stat.S_IMODE(status.st_mode), "0640" if by_root else "0600"
        owner = "owned by root" if by_root else "not owned by root"
        yield (
            f"{key}: {path}: mode {mode:04o}, {owner}: libpq refuses a key with more access "
            f"than {limit} at every connection; chmod {limit[1:]} it"
        )

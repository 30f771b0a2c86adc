"""Every file broker.yaml names is checked before a half starts: the error names the key and
the resolved file, and no half is started (nothing is written: no audit log, no spool).

Certificates come from our own CLI (the `pki` fixture): a client certificate given as the
server's, a key of another certificate, a server certificate given as the client CA are the
mistakes an operator makes with them. What our CLI cannot make (a CA whose key usage leaves
out keyCertSign, a server certificate without any extended key usage) is built with
`cryptography` here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from cryptography import x509

from broker import config as broker_config
from broker import preflight
from broker.commands.validate import NOT_FIT
from broker.errors import ConfigError
from broker.trust import fitness
from tests.certificates import Extension, certificate, localhost
from tests.harness import (
    BrokerProcess,
    Owners,
    Pki,
    demo_policy,
    dmzbroker,
    eventually,
    free_port,
    sign_policy,
    write_config,
)


@pytest.fixture
def site(tmp_path: Path, pki: Pki, owners: Owners) -> Path:
    """A good broker.yaml in tmp_path, for a plant nobody serves (no half needs it to start)."""
    envelope = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key, owners.it_key])
    return write_config(tmp_path, envelope, pki, free_port(), owners)


def edit(config: Path, key: str, value: Any) -> None:
    """Set `key` (dotted) in the YAML file `config`."""
    document = yaml.safe_load(config.read_text())
    *parents, last = key.split(".")
    node = document
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    config.write_text(yaml.safe_dump(document))


def refused(command: str, config: Path) -> str:
    """Run `command` on `config`: it must exit 2 with one line and start no half (write
    nothing next to the config). The line."""
    before = {p.name for p in config.parent.iterdir()}
    fresh = ["--reset-state"] if command != "validate" else []  # so that only the check stops it
    result = dmzbroker(command, "--config", str(config), *fresh, check=False, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert re.match(rf"dmzbroker: error: {re.escape(str(config))}:\d+: ", line), line
    assert {p.name for p in config.parent.iterdir()} == before  # no audit, spool or state
    return line


def craft(
    directory: Path,
    name: str,
    ca: Path,
    *,
    is_ca: bool,
    key_usage: x509.KeyUsage | None,
) -> tuple[Path, Path]:
    """A certificate issued by our CLI's CA `ca` with exactly these extensions."""
    extensions: list[Extension] = [
        (x509.BasicConstraints(ca=is_ca, path_length=None), True),
        localhost(),
    ]
    if key_usage is not None:
        extensions.append((key_usage, True))
    return certificate(directory, name, extensions, issuer=ca)


def usage(**allowed: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{n: allowed.get(n, False) for n in names})


# `dmzbroker run`: the four faults, found before either half starts.


def test_a_missing_file_names_its_key_and_the_resolved_file(site: Path) -> None:
    edit(site, "enterprise.tls.cert", "tls/sever.crt")  # relative: to broker.yaml's folder
    line = refused("run", site)
    (number,) = (n for n, text in enumerate(site.read_text().splitlines(), 1) if "sever" in text)
    resolved = site.parent / "tls" / "sever.crt"
    assert (
        line
        == f"dmzbroker: error: {site}:{number}: enterprise.tls.cert: {resolved}: file not found"
    )


def test_a_server_certificate_without_server_auth_is_refused(site: Path, pki: Pki) -> None:
    edit(site, "enterprise.tls.cert", str(pki.client_cert))  # clientAuth only
    edit(site, "enterprise.tls.key", str(pki.client_key))
    line = refused("run", site)
    assert f"enterprise.tls.cert: {pki.client_cert}: its extended key usage (clientAuth) " in line
    assert "leaves out serverAuth" in line
    assert line.endswith("issue it with `dmzbroker certs issue server`")


def test_a_key_that_is_not_the_certificates_is_refused(site: Path, pki: Pki) -> None:
    edit(site, "enterprise.tls.key", str(pki.client_key))
    line = refused("run", site)
    assert f"enterprise.tls.key: {pki.client_key}: not the private key of {pki.server_cert}" in line


def test_a_client_ca_that_is_not_a_ca_is_refused(site: Path, pki: Pki) -> None:
    edit(site, "enterprise.tls.client_ca", str(pki.server_cert))
    line = refused("run", site)
    assert f"enterprise.tls.client_ca: {pki.server_cert}: certificate 1 (CN=" in line
    assert "is not a CA (no basicConstraints CA:TRUE)" in line


def test_a_ca_whose_key_usage_leaves_out_key_cert_sign_is_refused(
    site: Path, pki: Pki, tmp_path: Path
) -> None:
    ca, _ = craft(tmp_path, "signs-nothing", pki.ca, is_ca=True, key_usage=usage(crl_sign=True))
    edit(site, "enterprise.tls.client_ca", str(ca))
    assert "is a CA whose key usage leaves out keyCertSign" in refused("run", site)


# Each half alone checks its own files; validate checks the plant's.


def test_the_enterprise_half_alone_refuses_its_missing_file(site: Path) -> None:
    edit(site, "enterprise.tls.key", "missing.key")
    assert f"enterprise.tls.key: {site.parent / 'missing.key'}: file not found" in refused(
        "enterprise", site
    )


def test_a_missing_maintenance_file_is_a_warning_that_names_it_never_a_refusal(
    site: Path, tmp_path: Path
) -> None:
    """The plant half reads a missing CMMS export as an ordinary hiccup (maintenance
    `unknown`): validate passes and warns, naming the key and the file."""
    edit(site, "plant.maintenance", {"file": "cmms.csv"})
    result = dmzbroker(
        "validate", "--config", str(site), "--duration", "1s", check=False, timeout=30
    )
    assert result.returncode in (0, NOT_FIT), result.stderr  # no device answers: not fit
    assert "dmzbroker: error" not in result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if "start_file_unreadable" in line]
    assert "plant.maintenance.file" in warning and str(tmp_path / "cmms.csv") in warning
    assert "file not found" in warning


@pytest.mark.timeout(60)
@pytest.mark.parametrize("at", ["enterprise.tls.cert", "enterprise.tls.key"])
def test_a_fifo_or_a_device_at_a_file_path_is_refused_at_once(
    site: Path, tmp_path: Path, at: str
) -> None:
    """No writer ever opens the FIFO and /dev/zero never ends: a start check that waited
    on either would never start a half, and never exit for systemd to see."""
    fifo = tmp_path / "planted"
    os.mkfifo(fifo)
    edit(site, at, str(fifo) if at.endswith("cert") else "/dev/zero")
    started = time.monotonic()
    line = refused("run", site)
    assert line.endswith(f"{at}: {fifo if at.endswith('cert') else '/dev/zero'}: cannot read: "
                         "not a regular file"), line  # fmt: skip
    assert time.monotonic() - started < 30


def events(process: BrokerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.events() if line.startswith("{")]


def named(process: BrokerProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in events(process) if e.get("event") == event]


async def test_the_plant_half_starts_whatever_the_enterprise_material(
    site: Path, start_broker: Callable[[str, Path], BrokerProcess]
) -> None:
    """The plant's availability never depends on the enterprise side's files, nor on a CMMS
    export that is missing or is a FIFO nobody writes (maintenance `unknown` meanwhile)."""
    edit(site, "enterprise.tls.cert", "tls/sever.crt")
    os.mkfifo(site.parent / "cmms.csv")
    edit(site, "plant.maintenance", {"file": "cmms.csv"})
    plant = start_broker("plant", site)
    await eventually(lambda: named(plant, "policy_accepted"), timeout=30)
    assert plant.process.poll() is None
    (warned,) = named(plant, "start_file_unreadable")
    assert warned["key"] == "plant.maintenance.file" and "not a regular file" in warned["error"]


async def test_an_enterprise_half_restarted_onto_bad_files_never_touches_the_plant_half(
    site: Path, start_broker: Callable[[str, Path], BrokerProcess]
) -> None:
    """`run` checks both halves once; a restart checks the restarted half alone. Files the
    enterprise half finds wrong at its restart keep it down (exit 2, restarted with backoff)
    while the plant half started before runs on untouched."""
    edit(site, "supervisor", {"restart_initial_s": 0.1, "restart_max_s": 0.5})
    run = start_broker("run", site)
    await eventually(lambda: len(named(run, "policy_accepted")) >= 2, timeout=45)
    pids = {e["half"]: e["pid"] for e in named(run, "half_started")}
    edit(site, "enterprise.tls.cert", "tls/sever.crt")  # an IT-side mistake, made meanwhile
    os.kill(pids["enterprise"], signal.SIGKILL)

    def refused_restarts() -> list[dict[str, Any]]:
        return [
            e for e in named(run, "half_exited")
            if e["half"] == "enterprise" and e.get("exit_code") == 2
        ]  # fmt: skip

    await eventually(lambda: len(refused_restarts()) >= 2, timeout=45)
    assert any("enterprise.tls.cert" in line and "file not found" in line for line in run.events())
    assert all(e["half"] == "enterprise" for e in named(run, "half_exited"))
    assert all(e["half"] == "enterprise" for e in named(run, "half_restarted"))
    os.kill(pids["plant"], 0)  # the very plant half started first, still running
    assert run.process.poll() is None


async def test_the_good_config_starts_both_halves(
    site: Path, start_broker: Callable[[str, Path], BrokerProcess]
) -> None:
    """The positive control: the same config, unedited, passes and both halves admit."""
    run = start_broker("run", site)
    await eventually(lambda: len(named(run, "policy_accepted")) >= 2, timeout=45)
    assert run.process.poll() is None
    assert {e["half"] for e in named(run, "half_started")} == {"plant", "enterprise"}
    assert not named(run, "half_exited")


# The check itself, in process: every key it knows, every fault it names.


def full_config(directory: Path, pki: Pki, owners: Owners) -> Path:
    """A config with every optional section that names a file, all of them good."""
    config = write_config(directory, directory / "policy.dsse.json", pki, 1, owners)
    (directory / "policy.dsse.json").write_text("{}")
    (directory / "cmms.csv").write_text("asset,next_due\n")
    (directory / "password").write_text("secret\n")
    (directory / "trusted").mkdir()
    client = {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}
    edit(config, "enterprise.mqtt", {"host": "localhost", "identity": "x", **client})
    edit(config, "audit.siem", {"host": "localhost", **client})
    edit(config, "plant.maintenance", {"file": "cmms.csv"})
    edit(config, "diode", {"host": "127.0.0.1", "state_dir": "diode"})
    edit(
        config,
        "plant.opcua",
        {
            "certificate": str(pki.client_cert),
            "private_key": str(pki.client_key),
            "trust_list": [str(pki.ca), "trusted"],
            "users": {
                "plc-a": {"username": "u", "password_file": "password"},
                "plc-b": {"certificate": str(pki.energy_cert), "private_key": str(pki.energy_key)},
            },
        },
    )
    return config


def check(config: Path, halves: tuple[str, ...] = ("plant", "enterprise")) -> None:
    broker_config.load(config, preflight.problems(halves))


def test_every_path_key_is_known_and_a_full_good_config_passes(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    config = full_config(tmp_path, pki, owners)
    keys = {key for key, _ in preflight.paths(broker_config.load(config))}
    assert keys >= preflight.CREATED  # the folders it skips are real keys
    assert {"plant.opcua.trust_list[1]", "plant.opcua.users.plc-b.private_key"} <= keys
    check(config)


@pytest.mark.parametrize(
    ("key", "value", "halves", "expected"),
    [
        ("enterprise.mqtt.cert", "server", ("enterprise",), "leaves out clientAuth"),
        ("enterprise.mqtt.ca", "client_key", ("enterprise",), "not a PEM certificate"),
        ("enterprise.tls.client_ca", "server", ("enterprise",), "is not a CA"),
        ("audit.siem.ca", "missing", ("enterprise",), "file not found"),
        ("audit.siem.key", "energy_key", ("enterprise",), "not the private key of"),
        ("audit.key", "missing", (), "file not found (nor audit.pub beside it)"),
        ("policy", "missing", (), "file not found"),
        ("trust_root", "folder", (), "a folder; name the file itself"),
        ("plant.opcua.certificate", "server", ("plant",), "leaves out clientAuth"),
        ("plant.opcua.trust_list", "missing list", ("plant",), "file not found"),
        ("plant.opcua.users.plc-b.private_key", "client_key", ("plant",), "not the private key"),
        ("plant.opcua.users.plc-a.password_file", "missing", ("plant",), "file not found"),
        ("enterprise.tls.crl", "ca", ("enterprise",), "not a PEM CRL"),
    ],
)
def test_each_file_key_is_checked_by_the_half_that_reads_it(
    tmp_path: Path,
    pki: Pki,
    owners: Owners,
    key: str,
    value: str,
    halves: tuple[str, ...],
    expected: str,
) -> None:
    config = full_config(tmp_path, pki, owners)
    files = {
        "server": pki.server_cert,
        "energy_key": pki.energy_key,
        "client_key": pki.client_key,
        "ca": pki.ca,
        "missing": tmp_path / "missing",
        "folder": tmp_path / "trusted",
    }
    given: object = [str(pki.ca), str(tmp_path / "missing")] if value == "missing list" else value
    edit(config, key, str(files[value]) if value in files else given)
    at = f"{key}[1]" if value == "missing list" else key
    with pytest.raises(ConfigError) as error:
        check(config, halves)
    assert re.match(rf"{re.escape(str(config))}:\d+: {re.escape(at)}: ", str(error.value))
    assert expected in str(error.value), error.value
    other = {"plant": ("enterprise",), "enterprise": ("plant",)}.get(next(iter(halves), ""))
    if other is not None:
        check(config, other)  # the other half does not read it: it starts


def test_a_key_beside_audit_pub_may_be_kept_off_the_appliance(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    config = full_config(tmp_path, pki, owners)
    (tmp_path / "audit.pub").write_bytes(owners.audit_key.with_suffix(".pub").read_bytes())
    edit(config, "audit.key", "audit.key")  # beside its .pub, and absent
    check(config)


def test_a_server_certificate_without_extended_key_usage_is_fit_for_any_purpose(
    tmp_path: Path, pki: Pki
) -> None:
    """X.509 and OpenSSL read no EKU as any purpose; only a key usage without a TLS key
    exchange is refused then."""
    cert, key = craft(tmp_path, "no-eku", pki.ca, is_ca=False, key_usage=None)
    assert fitness.unfit_leaf(cert, key, "server") is None
    cert, key = craft(
        tmp_path, "signs-certs", pki.ca, is_ca=False, key_usage=usage(key_cert_sign=True)
    )
    unfit = fitness.unfit_leaf(cert, key, "server")
    assert unfit is not None and unfit[0] == cert
    assert "allows none of digitalSignature, keyEncipherment, keyAgreement" in unfit[1]


def test_the_anchors_of_a_server_we_connect_to_may_be_a_pinned_leaf(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    """enterprise.mqtt.ca and audit.siem.ca given a server's own CA:FALSE certificate pass
    (OpenSSL anchors on it: tests/trust/test_tls.py); the client CA never does."""
    config = full_config(tmp_path, pki, owners)
    edit(config, "enterprise.mqtt.ca", str(pki.server_cert))
    edit(config, "audit.siem.ca", str(pki.server_cert))
    check(config)
    edit(config, "enterprise.tls.client_ca", str(pki.server_cert))
    with pytest.raises(ConfigError, match=r"enterprise\.tls\.client_ca: .* is not a CA"):
        check(config)


def test_a_maintenance_file_that_is_not_a_regular_file_is_only_warned_about(
    tmp_path: Path, pki: Pki, owners: Owners
) -> None:
    config = full_config(tmp_path, pki, owners)
    (tmp_path / "cmms.csv").unlink()
    os.mkfifo(tmp_path / "cmms.csv")
    check(config, ("plant",))  # no refusal
    with structlog.testing.capture_logs() as logs:
        preflight.warn(broker_config.load(config), ("plant",))
    (warned,) = logs
    assert (warned["event"], warned["key"]) == ("start_file_unreadable", "plant.maintenance.file")
    assert warned["file"] == str(tmp_path / "cmms.csv")
    assert warned["error"] == "cannot read: not a regular file"
    with structlog.testing.capture_logs() as logs:
        preflight.warn(broker_config.load(config), ("enterprise",))
    assert logs == []  # not the enterprise half's file


# The outputs' material (issue 17): the PostgreSQL sink's TLS and login files, the OPC UA
# server's application certificate.


@pytest.fixture(scope="session")
def opcua_certs(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Path:
    """An `issue opcua-server` certificate (RSA, serverAuth) and an `issue opcua` one (the
    plant's client kind: RSA, clientAuth only), from the pki fixture's CA."""
    out = tmp_path_factory.mktemp("opcua-certs")
    common = ("--ca", str(pki.ca.parent), "--out", str(out), "--uri", "urn:test:dmzbroker")
    dmzbroker("certs", "issue", "opcua-server", *common, "--dns", "localhost")
    dmzbroker("certs", "issue", "opcua", *common, "--name", "client")
    return out


def outputs_config(directory: Path, pki: Pki, owners: Owners, opcua_certs: Path) -> Path:
    """full_config with a PostgreSQL sink (its user by client certificate, its owner by
    password file) and an OPC UA server, all of their files good."""
    config = full_config(directory, pki, owners)
    (directory / "pg-password").write_text("owner secret\n")
    (directory / "pg-password").chmod(0o600)
    login = {"user": "dmzbroker_sink", "cert": str(pki.client_cert), "key": str(pki.client_key)}
    owner = {"user": "dmzbroker_owner", "password_file": "pg-password"}
    postgres = {"host": "localhost", "database": "historian", "ca": str(pki.ca),
                "identity": "x", **login, "owner": owner}  # fmt: skip
    edit(config, "enterprise.postgres", postgres)
    server = {"certificate": str(opcua_certs / "opcua-server-cert.pem"),
              "private_key": str(opcua_certs / "opcua-server-key.pem")}  # fmt: skip
    edit(config, "enterprise.opcua", server)
    return config


def test_the_outputs_good_material_passes(
    tmp_path: Path, pki: Pki, owners: Owners, opcua_certs: Path
) -> None:
    config = outputs_config(tmp_path, pki, owners, opcua_certs)
    keys = {key for key, _ in preflight.paths(broker_config.load(config))}
    assert {"enterprise.postgres.owner.password_file", "enterprise.opcua.private_key"} <= keys
    check(config)
    check(config, ("enterprise",))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("enterprise.postgres.ca", "client_key", "not a PEM certificate; give the PostgreSQL"),
        ("enterprise.postgres.ca", "missing", "file not found"),
        ("enterprise.postgres.cert", "server", "leaves out clientAuth"),
        ("enterprise.postgres.key", "energy_key", "not the private key of"),
        ("enterprise.postgres.owner.password_file", "missing", "file not found"),
        ("enterprise.postgres.owner", "server login", "leaves out clientAuth"),
        ("enterprise.opcua.certificate", "missing", "file not found"),
        # our CLI's server certificate is ECDSA: no OPC UA security policy signs with it
        ("enterprise.opcua.certificate", "ec server", "its key is not RSA"),
        ("enterprise.opcua.certificate", "opcua client", "leaves out serverAuth"),
        ("enterprise.opcua.private_key", "opcua client key", "not the private key of"),
    ],
)
def test_each_output_file_is_checked_by_the_enterprise_half(
    tmp_path: Path,
    pki: Pki,
    owners: Owners,
    opcua_certs: Path,
    key: str,
    value: str,
    expected: str,
) -> None:
    config = outputs_config(tmp_path, pki, owners, opcua_certs)
    client = (opcua_certs / "client-cert.pem", opcua_certs / "client-key.pem")
    given: dict[str, object] = {
        "client_key": str(pki.client_key),
        "missing": str(tmp_path / "missing"),
        "server": str(pki.server_cert),
        "energy_key": str(pki.energy_key),
        "server login": {"user": "o", "cert": str(pki.server_cert), "key": str(pki.server_key)},
        "opcua client key": str(client[1]),
    }
    if value == "ec server":
        edit(config, "enterprise.opcua.private_key", str(pki.server_key))
        given[value] = str(pki.server_cert)
    if value == "opcua client":
        edit(config, "enterprise.opcua.private_key", str(client[1]))
        given[value] = str(client[0])
    edit(config, key, given[value])
    at = f"{key}.cert" if value == "server login" else key
    with pytest.raises(ConfigError) as error:
        check(config, ("enterprise",))
    assert re.match(rf"{re.escape(str(config))}:\d+: {re.escape(at)}: ", str(error.value))
    assert expected in str(error.value), error.value
    if key.startswith("enterprise.opcua.") and value != "missing":
        assert "issue it with `dmzbroker certs issue opcua-server`" in str(error.value)
    check(config, ("plant",))  # the plant half does not read it: it starts


def _libpq_refuses(cert: Path, key: Path) -> bool:
    """Whether libpq itself (psycopg's) refuses `key` for its mode: it reads the key when it
    starts TLS, so a socket that listens and never answers is peer enough."""
    import psycopg  # noqa: PLC0415 - only this test needs the driver

    with socket.create_server(("127.0.0.1", 0)) as peer:
        try:
            psycopg.connect(
                host="127.0.0.1", port=peer.getsockname()[1], dbname="x", user="x",
                sslmode="require", sslnegotiation="direct", sslcert=str(cert), sslkey=str(key),
                connect_timeout=2,
            )  # fmt: skip
        except psycopg.OperationalError as e:
            return "has group or world access" in str(e)
    raise AssertionError("a peer that never answers was taken for a PostgreSQL server")


def test_a_postgres_password_file_others_may_read_is_refused(
    tmp_path: Path, pki: Pki, owners: Owners, opcua_certs: Path
) -> None:
    config = outputs_config(tmp_path, pki, owners, opcua_certs)
    password = tmp_path / "pg-password"
    for mode, refused_ in ((0o600, False), (0o640, False), (0o644, True), (0o660, True)):
        password.chmod(mode)
        if not refused_:
            check(config)
            continue
        with pytest.raises(ConfigError) as error:
            check(config)
        assert str(error.value).endswith(
            f"enterprise.postgres.owner.password_file: {password}: mode {mode:04o}: a password "
            "file must give others no access and its group at most read; chmod 600 it (or 640 "
            "for a group that must read it)"
        ), error.value


def test_a_postgres_key_is_refused_exactly_when_libpq_would_refuse_it(
    tmp_path: Path, pki: Pki, owners: Owners, opcua_certs: Path
) -> None:
    """libpq checks its client key's mode at every connection: a key it refuses would keep the
    sink from ever connecting, so the start check refuses it, by libpq's own rule (asked of
    libpq here, for each mode and owner)."""
    config = outputs_config(tmp_path, pki, owners, opcua_certs)
    key = tmp_path / "sink.key"
    key.write_bytes(pki.client_key.read_bytes())
    edit(config, "enterprise.postgres.key", str(key))
    me = os.geteuid()
    cases = [(me, 0o600, False), (me, 0o644, True), (me, 0o604, True), (me, 0o640, me != 0)]
    if me == 0:  # a key root owns may be read by its group; any other owner's may not
        cases += [(65534, 0o640, True), (65534, 0o600, False)]
    for owner, mode, refused_ in cases:
        os.chown(key, owner, -1)
        os.chmod(key, mode)
        assert _libpq_refuses(pki.client_cert, key) == refused_, (owner, oct(mode))
        if not refused_:
            check(config)
            continue
        with pytest.raises(ConfigError) as error:
            check(config)
        limit = "0640" if owner == 0 else "0600"
        assert str(error.value).endswith(
            f"enterprise.postgres.key: {key}: mode {mode:04o}, "
            f"{'owned by root' if owner == 0 else 'not owned by root'}: libpq refuses a key "
            f"with more access than {limit} at every connection; chmod {limit[1:]} it"
        ), error.value

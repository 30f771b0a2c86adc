"""The real CLI in a child process: user mistakes give one line and exit code 2, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness import DEMO_POLICY, Pki, dmzbroker, free_port, write_config


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dmzbroker: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", ["run", "plant", "enterprise"])
def test_missing_config_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "broker.yaml"
    assert_one_line_error(
        dmzbroker(command, "--config", str(missing), check=False), f"{missing}: file not found"
    )


@pytest.mark.parametrize("command", ["run", "plant", "enterprise"])
def test_bad_policy_stops_every_command_before_it_starts(
    tmp_path: Path, pki: Pki, command: str
) -> None:
    document = yaml.safe_load(DEMO_POLICY.read_text())
    document["signals"][3]["source"]["address"] = 70000
    bad_policy = tmp_path / "policy.yaml"
    bad_policy.write_text(yaml.safe_dump(document))
    config = write_config(tmp_path, bad_policy, pki, free_port())
    result = dmzbroker(command, "--config", str(config), check=False)
    assert_one_line_error(
        result, f"{bad_policy}: signals[3].source.address: expected `int` <= 65535, got `70000`"
    )
    assert not (tmp_path / "spool").exists()  # nothing started


def test_enterprise_with_a_missing_server_key_names_the_file(tmp_path: Path, pki: Pki) -> None:
    config = write_config(tmp_path, DEMO_POLICY, pki, free_port())
    document = yaml.safe_load(config.read_text())
    document["enterprise"]["tls"]["key"] = str(tmp_path / "gone.key")
    config.write_text(yaml.safe_dump(document))
    assert_one_line_error(
        dmzbroker("enterprise", "--config", str(config), check=False), "gone.key: file not found"
    )


def test_enterprise_whose_port_is_taken_says_so(tmp_path: Path, pki: Pki) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, DEMO_POLICY, pki, taken.getsockname()[1])
        result = dmzbroker("enterprise", "--config", str(config), check=False)
    assert_one_line_error(result, "enterprise.listen: cannot listen on 127.0.0.1:")


def test_certs_issue_a_client_certificate_with_one_uri_and_a_private_key_only_we_can_read(
    tmp_path: Path,
) -> None:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "site CA")
    result = dmzbroker("certs", "issue", "client", "--ca", str(tmp_path), "--out", str(tmp_path),
                       "--uri", "spiffe://site/consumer/mes")  # fmt: skip
    assert str(tmp_path / "mes.crt") in result.stdout
    cert = x509.load_pem_x509_certificate((tmp_path / "mes.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://site/consumer/mes"
    ]
    assert len(list(sans)) == 1
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for key in ("mes.key", "ca.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600


def test_certs_refuse_to_overwrite_and_refuse_a_non_uri_identity(tmp_path: Path) -> None:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "site CA")
    again = dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "site CA", check=False)
    assert_one_line_error(again, "a CA already exists")
    not_uri = dmzbroker("certs", "issue", "client", "--ca", str(tmp_path), "--out", str(tmp_path),
                        "--uri", "historian", check=False)  # fmt: skip
    assert_one_line_error(not_uri, "--uri 'historian'")


def test_issuing_without_a_ca_tells_how_to_make_one(tmp_path: Path) -> None:
    result = dmzbroker("certs", "issue", "server", "--ca", str(tmp_path), "--out", str(tmp_path),
                       "--dns", "localhost", check=False)  # fmt: skip
    assert_one_line_error(result, "dmzbroker certs init-ca")

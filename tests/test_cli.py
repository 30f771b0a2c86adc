"""The real CLI in a child process: user mistakes give one line and exit code 2, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness import Owners, Pki, demo_policy, dmzbroker, free_port, sign_policy, write_config


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2 and one `dmzbroker: error:` line (log events may come before it)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dmzbroker: error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize("command", ["run", "plant", "enterprise"])
def test_missing_config_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "broker.yaml"
    assert_one_line_error(
        dmzbroker(command, "--config", str(missing), check=False), f"{missing}: file not found"
    )


@pytest.fixture
def signed_config(tmp_path: Path, pki: Pki, owners: Owners) -> Path:
    envelope = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key, owners.it_key])
    return write_config(tmp_path, envelope, pki, free_port(), owners)


@pytest.mark.parametrize("command", ["run", "plant", "enterprise"])
def test_a_policy_without_both_signatures_stops_every_command_before_it_starts(
    tmp_path: Path, pki: Pki, owners: Owners, command: str
) -> None:
    envelope = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key])
    config = write_config(tmp_path, envelope, pki, free_port(), owners)
    result = dmzbroker(command, "--config", str(config), "--reset-state", check=False)
    assert_one_line_error(result, f"{envelope}: needs 1 more IT owner signature(s)")
    assert not (tmp_path / "spool").exists()  # nothing started


def test_enterprise_with_a_missing_server_key_names_the_file(
    tmp_path: Path, signed_config: Path
) -> None:
    document = yaml.safe_load(signed_config.read_text())
    document["enterprise"]["tls"]["key"] = str(tmp_path / "gone.key")
    signed_config.write_text(yaml.safe_dump(document))
    result = dmzbroker("enterprise", "--config", str(signed_config), "--reset-state", check=False)
    assert_one_line_error(result, "gone.key: file not found")


def test_enterprise_whose_port_is_taken_says_so(signed_config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        document = yaml.safe_load(signed_config.read_text())
        document["enterprise"]["listen"]["port"] = taken.getsockname()[1]
        signed_config.write_text(yaml.safe_dump(document))
        result = dmzbroker(
            "enterprise", "--config", str(signed_config), "--reset-state", check=False
        )
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

"""`dmzbroker policy sign` and `trust sign`: which file the key must be, and signing again.

Each refusal names the file and says what it is instead (missing, a folder, a public key, a
certificate, not a key, another algorithm, a wrong passphrase), exits 2 and leaves the envelope
as it was. Signing again with a key that signed replaces that key's signature, says so, and
the envelope still verifies. The commands run in process (`main()`), as a child would.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.cli import main
from broker.errors import ConfigError
from broker.policy import envelope as envelopes
from tests.harness import DEMO_POLICY, Owners


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _refused(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("dmzbroker: error: ")
    assert "Traceback" not in result.stderr
    return result.stderr


def _keyids(envelope: Path) -> list[str]:
    return [s["keyid"] for s in json.loads(envelope.read_bytes())["signatures"]]


@pytest.fixture
def unsigned(tmp_path: Path) -> Path:
    out = tmp_path / "policy.dsse.json"
    made = _cli("policy", "compile", str(DEMO_POLICY), "--out", str(out))
    assert made.returncode == 0, made.stderr
    return out


def _sign(envelope: Path, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli("policy", "sign", str(envelope), "--key", str(key), *extra)


# --- which file --key names ----------------------------------------------------------------


def test_a_public_key_is_refused_naming_the_private_key_beside_it(
    unsigned: Path, owners: Owners
) -> None:
    before = unsigned.read_bytes()
    public = owners.ot_key.with_suffix(".pub")
    error = _refused(_sign(unsigned, public))
    assert f"{public}: a public key, which cannot sign; sign with its private key " in error
    assert str(owners.ot_key) in error
    assert "passphrase" not in error
    assert unsigned.read_bytes() == before


def test_a_public_key_without_its_private_key_beside_it_says_which_file_to_give(
    tmp_path: Path, unsigned: Path, owners: Owners
) -> None:
    alone = tmp_path / "olga.pub"
    alone.write_bytes(owners.ot_key.with_suffix(".pub").read_bytes())
    error = _refused(_sign(unsigned, alone))
    assert f"{alone}: a public key, which cannot sign; give the .key file" in error


def test_a_missing_key_file_is_named(tmp_path: Path, unsigned: Path) -> None:
    missing = tmp_path / "ot-olga.key"
    assert f"{missing}: key file not found" in _refused(_sign(unsigned, missing))


def test_a_folder_is_refused_naming_a_key_file_in_it(unsigned: Path, owners: Owners) -> None:
    folder = owners.ot_key.parent
    error = _refused(_sign(unsigned, folder))
    assert f"{folder}: a folder, not a key file; name the .key file, e.g. {folder}/" in error


def test_a_file_that_is_not_a_key_is_refused(unsigned: Path) -> None:
    error = _refused(_sign(unsigned, DEMO_POLICY))
    assert f"{DEMO_POLICY}: not a key: no PEM private key in it" in error
    assert "passphrase" not in error


def test_a_certificate_is_refused_as_a_certificate(tmp_path: Path, unsigned: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ot owner")])
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name)
    builder = builder.public_key(key.public_key()).serial_number(1)
    now = datetime.now(UTC)
    cert = builder.not_valid_before(now).not_valid_after(now + timedelta(days=1))
    path = tmp_path / "owner.crt"
    path.write_bytes(cert.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    assert f"{path}: a certificate, which cannot sign" in _refused(_sign(unsigned, path))


def test_a_key_of_another_algorithm_is_refused_naming_it(tmp_path: Path, unsigned: Path) -> None:
    path = tmp_path / "ec.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert f"{path}: the key is EC, not Ed25519" in _refused(_sign(unsigned, path))


def test_a_wrong_passphrase_is_named_as_such(tmp_path: Path, unsigned: Path) -> None:
    right, wrong = tmp_path / "right.txt", tmp_path / "wrong.txt"
    right.write_text("correct horse\n")
    wrong.write_text("not it\n")
    made = _cli("keys", "generate", "--role", "ot", "--name", "Enc", "--out", str(tmp_path),
                "--passphrase-file", str(right))  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = tmp_path / "ot-enc.key"
    before = unsigned.read_bytes()
    error = _refused(_sign(unsigned, key, "--passphrase-file", str(wrong)))
    assert f"{key}: wrong passphrase: the one given does not decrypt this key" in error
    assert unsigned.read_bytes() == before
    assert _sign(unsigned, key, "--passphrase-file", str(right)).returncode == 0


def test_a_passphrase_for_a_key_without_one_is_refused(tmp_path: Path, unsigned: Path) -> None:
    passphrase = tmp_path / "p.txt"
    passphrase.write_text("something\n")
    made = _cli("keys", "generate", "--role", "it", "--name", "plain", "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    key = tmp_path / "it-plain.key"
    error = _refused(_sign(unsigned, key, "--passphrase-file", str(passphrase)))
    assert f"{key}: it is not passphrase-protected; drop --passphrase-file" in error


def test_trust_sign_refuses_a_public_key_the_same_way(owners: Owners) -> None:
    before = owners.trust_root.read_bytes()
    public = owners.it_key.with_suffix(".pub")
    error = _refused(_cli("trust", "sign", str(owners.trust_root), "--key", str(public)))
    assert f"{public}: a public key, which cannot sign; sign with its private key" in error
    assert owners.trust_root.read_bytes() == before


# --- signing again -------------------------------------------------------------------------


def test_signing_again_replaces_that_keys_signature_and_still_verifies(
    unsigned: Path, owners: Owners
) -> None:
    assert _sign(unsigned, owners.ot_key).returncode == 0
    assert _sign(unsigned, owners.it_key).returncode == 0
    first = _keyids(unsigned)
    again = _sign(unsigned, owners.ot_key)
    assert again.returncode == 0, again.stderr
    assert "replacing its earlier signature (one signature per key; 2 signature(s)" in again.stdout
    assert sorted(_keyids(unsigned)) == sorted(first)  # one per key, none added
    checked = _cli("policy", "verify", str(unsigned), "--trust", str(owners.trust_root))
    assert checked.returncode == 0, checked.stdout
    assert "OT: 1 of 1" in checked.stdout
    assert "IT: 1 of 1" in checked.stdout


def test_with_the_trust_root_signing_again_names_the_owner_and_role(
    unsigned: Path, owners: Owners
) -> None:
    trust = ("--trust", str(owners.trust_root))
    first = _sign(unsigned, owners.ot_key, *trust)
    assert "signed by Olga OT (OT owner, key " in first.stdout
    assert "not yet: needs 1 more IT owner signature(s)" in first.stdout
    again = _sign(unsigned, owners.ot_key, *trust)
    assert "replacing Olga OT's earlier OT signature (one signature per key; 1 " in again.stdout
    done = _sign(unsigned, owners.it_key, *trust)
    assert "thresholds met" in done.stdout


def test_a_second_owner_of_the_same_role_adds_a_signature_and_a_stranger_does_not_count(
    unsigned: Path, owners: Owners
) -> None:
    trust = ("--trust", str(owners.trust_root))
    for key in (owners.ot_key, owners.second_ot_key, owners.it_key):
        assert _sign(unsigned, key, *trust).returncode == 0
    assert len(_keyids(unsigned)) == 3
    stranger = _sign(unsigned, owners.stranger_key, *trust)
    assert f"note: this key is not an owner in {owners.trust_root}" in stranger.stdout
    assert "not in the trust root, not counted" in stranger.stdout
    checked = _cli("policy", "verify", str(unsigned), "--trust", str(owners.trust_root))
    assert checked.returncode == 0, checked.stdout


def test_trust_sign_again_names_the_owner_whose_signature_it_replaced(
    tmp_path: Path, owners: Owners
) -> None:
    root = tmp_path / "trust-root.yaml"
    root.write_bytes(owners.trust_root.read_bytes())
    again = _cli("trust", "sign", str(root), "--key", str(owners.it_key))
    assert again.returncode == 0, again.stderr
    assert "replacing Ivan IT's earlier IT signature (one signature per key; 2 " in again.stdout
    assert _cli("trust", "verify", str(root)).returncode == 0


def test_an_envelope_that_cannot_be_written_is_named_not_a_traceback(
    tmp_path: Path, unsigned: Path
) -> None:
    envelope = envelopes.read(unsigned)
    with pytest.raises(ConfigError, match=f"{tmp_path}: cannot write: Is a directory"):
        envelopes.write(envelope, tmp_path)

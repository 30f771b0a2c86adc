"""The trust root file: which owner keys may sign, with which role, and how many per role."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import ConfigError
from broker.policy import trustroot
from broker.trust.keys import Role
from tests.harness import Owners


def _pub(key: Path) -> Path:
    return key.with_suffix(".pub")


def _document(owners: Owners) -> dict[str, Any]:
    """A valid trust root as data: Olga (OT), Ivan (IT), thresholds 1 and 1."""
    listed: list[tuple[str, Role, Path]] = [
        ("Olga OT", "ot", _pub(owners.ot_key)),
        ("Ivan IT", "it", _pub(owners.it_key)),
    ]
    document = yaml.safe_load(trustroot.render("coldstore-demo", listed))
    assert isinstance(document, dict)
    return document


def _write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "trust-root.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _refusal(tmp_path: Path, document: dict[str, Any]) -> str:
    path = _write(tmp_path, document)
    with pytest.raises(ConfigError) as refused:
        trustroot.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}:")
    return message


def _raw_sha256(pub: Path) -> str:
    key = serialization.load_pem_public_key(pub.read_bytes())
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def test_valid_trust_root_loads_with_key_ids_of_the_raw_public_keys(
    tmp_path: Path, owners: Owners
) -> None:
    loaded = trustroot.load(_write(tmp_path, _document(owners)))
    expected = {
        _raw_sha256(_pub(owners.ot_key)): ("Olga OT", "ot"),
        _raw_sha256(_pub(owners.it_key)): ("Ivan IT", "it"),
    }
    assert {k: (v.name, v.role) for k, v in loaded.keys.items()} == expected
    assert all(keyid == key.keyid for keyid, key in loaded.keys.items())
    assert loaded.deployment_id == "coldstore-demo"
    assert loaded.thresholds == {"ot": 1, "it": 1}


def test_thresholds_default_to_one_per_role(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    del document["thresholds"]
    assert trustroot.load(_write(tmp_path, document)).thresholds == {"ot": 1, "it": 1}


def test_a_key_listed_under_both_roles_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    olga = document["keys"][0]
    document["keys"].append({"name": "Olga as IT", "role": "it", "public_key": olga["public_key"]})
    assert "one key may hold only one role" in _refusal(tmp_path, document)


def test_the_same_key_twice_in_one_role_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    olga = document["keys"][0]
    document["keys"].append({"name": "Olga again", "role": "ot", "public_key": olga["public_key"]})
    message = _refusal(tmp_path, document)
    assert "keys[2]" in message
    assert "twice" in message


def test_ot_threshold_above_the_number_of_ot_keys_is_refused(
    tmp_path: Path, owners: Owners
) -> None:
    document = _document(owners)
    document["thresholds"]["ot"] = 2
    assert "thresholds.ot" in _refusal(tmp_path, document)


def test_threshold_zero_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    document["thresholds"]["it"] = 0
    assert "thresholds.it" in _refusal(tmp_path, document)


def test_an_unknown_field_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    document["quorum"] = 1
    assert "quorum" in _refusal(tmp_path, document)


def test_a_non_ed25519_public_key_is_refused_naming_its_position(
    tmp_path: Path, owners: Owners
) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = p256.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    document = _document(owners)
    document["keys"][1]["public_key"] = pem
    message = _refusal(tmp_path, document)
    assert "keys[1]" in message
    assert "Ed25519" in message


def test_a_public_key_that_is_not_pem_is_refused_naming_its_position(
    tmp_path: Path, owners: Owners
) -> None:
    document = _document(owners)
    document["keys"][1]["public_key"] = "ssh-ed25519 AAAA not a pem key"
    message = _refusal(tmp_path, document)
    assert "keys[1]" in message
    assert "PEM" in message

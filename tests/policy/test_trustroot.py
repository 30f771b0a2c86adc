"""The trust root: a signed document listing owner keys and thresholds, valid only when its
own owners signed it, and replaced only as TUF rotates a root (broker/policy/trustroot.py)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.errors import ConfigError, TrustRootRefused
from broker.policy import envelope as envelopes
from broker.policy import trustroot
from broker.policy.envelope import Envelope
from broker.trust import keys
from broker.trust.keys import Role
from tests.harness import Owners


def _pub(key: Path) -> Path:
    return key.with_suffix(".pub")


def _private(key: Path) -> Ed25519PrivateKey:
    return keys.load_private(key, passphrase=None)


def _document(owners: Owners) -> dict[str, Any]:
    """A valid trust root's payload as data: Olga (OT), Ivan (IT), thresholds 1 and 1."""
    return {
        "deployment_id": "coldstore-demo",
        "version": 1,
        "thresholds": {"ot": 1, "it": 1},
        "keys": [
            {"name": "Olga OT", "role": "ot", "public_key": _pub(owners.ot_key).read_text()},
            {"name": "Ivan IT", "role": "it", "public_key": _pub(owners.it_key).read_text()},
        ],
    }


def _write(tmp_path: Path, document: dict[str, Any], signers: list[Ed25519PrivateKey]) -> Path:
    """`document` as a trust root envelope signed by `signers`."""
    payload = rfc8785.dumps(document)
    root = Envelope(trustroot.PAYLOAD_TYPE, base64.b64encode(payload).decode(), [])
    for key in signers:
        root = envelopes.sign(root, key)
    path = tmp_path / "trust-root.yaml"
    envelopes.write(root, path)
    return path


def _signed(tmp_path: Path, document: dict[str, Any], owners: Owners) -> Path:
    return _write(tmp_path, document, [_private(owners.ot_key), _private(owners.it_key)])


def _refusal(tmp_path: Path, document: dict[str, Any], owners: Owners) -> str:
    path = _signed(tmp_path, document, owners)
    with pytest.raises(ConfigError) as refused:
        trustroot.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}:")
    return message


def _raw_sha256(pub: Path) -> str:
    key = serialization.load_pem_public_key(pub.read_bytes())
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _root(
    deployment_id: str,
    version: int,
    listed: list[tuple[str, Role, Ed25519PrivateKey]],
    signers: list[Ed25519PrivateKey],
    thresholds: dict[Role, int] | None = None,
) -> trustroot.TrustRoot:
    """A root made and signed in process, parsed back as the broker would read it."""
    owners = [trustroot.owner(name, role, key.public_key()) for name, role, key in listed]
    root = trustroot.unsigned(deployment_id, version, thresholds or {"ot": 1, "it": 1}, owners)
    for key in signers:
        root = envelopes.sign(root, key)
    return trustroot.parse(envelopes.encode(root), f"root v{version}")


def test_valid_trust_root_loads_with_key_ids_of_the_raw_public_keys(
    tmp_path: Path, owners: Owners
) -> None:
    path = _signed(tmp_path, _document(owners), owners)
    loaded = trustroot.load(path)
    expected = {
        _raw_sha256(_pub(owners.ot_key)): ("Olga OT", "ot"),
        _raw_sha256(_pub(owners.it_key)): ("Ivan IT", "it"),
    }
    assert {k: (v.name, v.role) for k, v in loaded.keys.items()} == expected
    assert all(keyid == key.keyid for keyid, key in loaded.keys.items())
    assert loaded.deployment_id == "coldstore-demo"
    assert loaded.thresholds == {"ot": 1, "it": 1}
    assert loaded.document == path.read_bytes()
    assert loaded.sha256 == hashlib.sha256(rfc8785.dumps(_document(owners))).hexdigest()
    assert {k.name for k in loaded.signers} == {"Olga OT", "Ivan IT"}
    assert trustroot.parse(loaded.document, "restored") == loaded


def test_the_conftest_root_made_by_the_cli_verifies(owners: Owners) -> None:
    loaded = trustroot.load(owners.trust_root)
    assert sorted(k.name for k in loaded.keys.values()) == ["Ivan IT", "Olga OT", "Otto OT"]


def test_thresholds_default_to_one_per_role(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    del document["thresholds"]
    assert trustroot.load(_signed(tmp_path, document, owners)).thresholds == {"ot": 1, "it": 1}


def test_a_root_signed_by_one_role_only_is_refused_naming_the_missing_role(
    tmp_path: Path, owners: Owners
) -> None:
    path = _write(tmp_path, _document(owners), [_private(owners.ot_key)])
    with pytest.raises(TrustRootRefused) as refused:
        trustroot.load(path)
    assert refused.value.reason == "threshold_not_met"
    assert "1 more IT owner signature" in str(refused.value)
    assert "OT owner" not in str(refused.value)


def test_an_unsigned_root_is_refused(tmp_path: Path, owners: Owners) -> None:
    with pytest.raises(TrustRootRefused) as refused:
        trustroot.load(_write(tmp_path, _document(owners), []))
    assert refused.value.reason == "unsigned"
    assert "dmzbroker trust init" in str(refused.value)


def test_a_signature_by_a_key_the_root_does_not_list_does_not_count(
    tmp_path: Path, owners: Owners
) -> None:
    path = _write(
        tmp_path, _document(owners), [_private(owners.stranger_key), _private(owners.it_key)]
    )
    with pytest.raises(
        TrustRootRefused, match=r"1 more OT owner signature.*not in this trust root"
    ):
        trustroot.load(path)


def test_a_root_edited_after_signing_is_refused(tmp_path: Path, owners: Owners) -> None:
    path = _signed(tmp_path, _document(owners), owners)
    envelope = envelopes.read(path)
    forged = _document(owners)
    forged["keys"][0]["public_key"] = _pub(owners.stranger_key).read_text()
    forged["keys"].append(
        {"name": "Olga OT", "role": "ot", "public_key": _pub(owners.ot_key).read_text()}
    )
    payload = base64.b64encode(rfc8785.dumps(forged)).decode()
    envelopes.write(Envelope(envelope.payloadType, payload, envelope.signatures), path)
    # Olga is still listed, but her signature is over the old payload: it does not count.
    with pytest.raises(TrustRootRefused, match="do not match the payload"):
        trustroot.load(path)


def test_an_old_unsigned_yaml_root_is_refused_naming_trust_init(
    tmp_path: Path, owners: Owners
) -> None:
    path = tmp_path / "trust-root.yaml"
    path.write_text(yaml.safe_dump(_document(owners), sort_keys=False))
    with pytest.raises(TrustRootRefused) as refused:
        trustroot.load(path)
    assert refused.value.reason == "unsigned"
    assert str(refused.value).startswith(f"{path}: an unsigned trust root (plain YAML)")
    assert "`dmzbroker trust init`" in str(refused.value)


def test_a_policy_envelope_given_as_trust_root_is_refused(tmp_path: Path, owners: Owners) -> None:
    path = _signed(tmp_path, _document(owners), owners)
    envelope = envelopes.read(path)
    envelopes.write(Envelope(envelopes.PAYLOAD_TYPE, envelope.payload, envelope.signatures), path)
    with pytest.raises(ConfigError, match="is not a trust root"):
        trustroot.load(path)


def test_a_key_listed_under_both_roles_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    olga = document["keys"][0]
    document["keys"].append({"name": "Olga as IT", "role": "it", "public_key": olga["public_key"]})
    assert "one key may hold only one role" in _refusal(tmp_path, document, owners)


def test_the_same_key_twice_in_one_role_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    olga = document["keys"][0]
    document["keys"].append({"name": "Olga again", "role": "ot", "public_key": olga["public_key"]})
    message = _refusal(tmp_path, document, owners)
    assert "keys[2]" in message
    assert "twice" in message


def test_ot_threshold_above_the_number_of_ot_keys_is_refused(
    tmp_path: Path, owners: Owners
) -> None:
    document = _document(owners)
    document["thresholds"]["ot"] = 2
    assert "thresholds.ot" in _refusal(tmp_path, document, owners)


def test_threshold_zero_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    document["thresholds"]["it"] = 0
    assert "thresholds.it" in _refusal(tmp_path, document, owners)


def test_an_unknown_field_is_refused(tmp_path: Path, owners: Owners) -> None:
    document = _document(owners)
    document["quorum"] = 1
    assert "quorum" in _refusal(tmp_path, document, owners)


def test_a_non_ed25519_public_key_is_refused_naming_its_position(
    tmp_path: Path, owners: Owners
) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = p256.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    document = _document(owners)
    document["keys"][1]["public_key"] = pem
    message = _refusal(tmp_path, document, owners)
    assert "keys[1]" in message
    assert "Ed25519" in message


def test_a_public_key_that_is_not_pem_is_refused_naming_its_position(
    tmp_path: Path, owners: Owners
) -> None:
    document = _document(owners)
    document["keys"][1]["public_key"] = "ssh-ed25519 AAAA not a pem key"
    message = _refusal(tmp_path, document, owners)
    assert "keys[1]" in message
    assert "PEM" in message


# Rotation, as TUF rotates its root: the current root's owners vouch for the next one.

OLGA, IVAN, NINA = (Ed25519PrivateKey.generate() for _ in range(3))
MALLORY_OT, MALLORY_IT = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
CURRENT_OWNERS: list[tuple[str, Role, Ed25519PrivateKey]] = [
    ("Olga", "ot", OLGA),
    ("Ivan", "it", IVAN),
]
NEXT_OWNERS: list[tuple[str, Role, Ed25519PrivateKey]] = [
    ("Nina", "ot", NINA),
    ("Ivan", "it", IVAN),
]


def _current() -> trustroot.TrustRoot:
    return _root("site", 1, CURRENT_OWNERS, [OLGA, IVAN])


def _refused(current: trustroot.TrustRoot, new: trustroot.TrustRoot) -> TrustRootRefused:
    with pytest.raises(TrustRootRefused) as refused:
        trustroot.check_rotation(current, new)
    return refused.value


def test_a_rotation_signed_by_the_current_and_the_new_thresholds_is_accepted() -> None:
    new = _root("site", 2, NEXT_OWNERS, [OLGA, IVAN, NINA])
    trustroot.check_rotation(_current(), new)  # raises when refused


def test_a_swapped_root_with_attacker_keys_and_the_same_version_is_refused() -> None:
    attacker: list[tuple[str, Role, Ed25519PrivateKey]] = [
        ("Mallory", "ot", MALLORY_OT),
        ("Mallory", "it", MALLORY_IT),
    ]
    swapped = _root("site", 1, attacker, [MALLORY_OT, MALLORY_IT])  # valid alone
    refused = _refused(_current(), swapped)
    assert refused.reason == "swapped"
    assert "version 1" in str(refused)


def test_a_root_swapped_for_a_higher_version_signed_by_attacker_keys_is_refused() -> None:
    attacker: list[tuple[str, Role, Ed25519PrivateKey]] = [
        ("Mallory", "ot", MALLORY_OT),
        ("Mallory", "it", MALLORY_IT),
    ]
    refused = _refused(_current(), _root("site", 7, attacker, [MALLORY_OT, MALLORY_IT]))
    assert refused.reason == "not_signed_by_current"
    assert "1 more OT owner signature(s), 1 more IT owner signature(s)" in str(refused)


def test_a_rollback_to_a_lower_version_is_refused() -> None:
    current = _root("site", 3, CURRENT_OWNERS, [OLGA, IVAN])
    refused = _refused(current, _root("site", 2, CURRENT_OWNERS, [OLGA, IVAN]))
    assert refused.reason == "rollback"
    assert "version 2, lower than version 3" in str(refused)


def test_a_rotation_signed_only_by_the_new_keys_is_refused_naming_what_is_missing() -> None:
    new = _root("site", 2, NEXT_OWNERS, [NINA, IVAN])  # Olga (current OT) did not sign
    refused = _refused(_current(), new)
    assert refused.reason == "not_signed_by_current"
    assert "needs 1 more OT owner signature(s)" in str(refused)
    assert "IT owner" not in str(refused).partition("needs")[2].partition(";")[0]


def test_a_rotation_signed_only_by_the_current_keys_is_not_valid_alone() -> None:
    with pytest.raises(TrustRootRefused, match="1 more OT owner signature"):
        _root("site", 2, NEXT_OWNERS, [OLGA, IVAN])  # Nina (new OT) did not sign


def test_a_root_for_another_deployment_is_refused() -> None:
    refused = _refused(_current(), _root("elsewhere", 2, CURRENT_OWNERS, [OLGA, IVAN]))
    assert refused.reason == "wrong_deployment"


def test_the_root_in_force_is_no_rotation_of_itself() -> None:
    current = _current()
    trustroot.check_rotation(current, trustroot.parse(current.document, "again"))


def test_a_raised_threshold_of_the_current_root_must_be_met_by_the_rotation() -> None:
    current = _root("site", 1, [*CURRENT_OWNERS, ("Nina", "ot", NINA)], [OLGA, NINA, IVAN],
                    thresholds={"ot": 2, "it": 1})  # fmt: skip
    new = _root("site", 2, CURRENT_OWNERS, [OLGA, IVAN])
    refused = _refused(current, new)
    assert refused.reason == "not_signed_by_current"
    assert "1 more OT owner signature" in str(refused)


@pytest.mark.parametrize("name", ["Olga\x1b[2J", "Olga\rVERIFIED", "Olga\nforged", "Olga\u202e"])
def test_an_owner_name_or_deployment_with_a_control_or_format_character_is_refused(
    name: str,
) -> None:
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate()
    owners = [trustroot.owner(name, "ot", key.public_key())]
    owners.append(trustroot.owner("Ivan", "it", other.public_key()))
    with pytest.raises(ConfigError, match=r"keys\[0\]\.name: holds a control or format character"):
        trustroot.unsigned("coldstore-demo", 1, {"ot": 1, "it": 1}, owners)
    with pytest.raises(ConfigError, match="deployment_id: holds a control or format character"):
        trustroot.unsigned(
            name,
            1,
            {"ot": 1, "it": 1},
            [trustroot.owner("Olga", "ot", key.public_key()), owners[1]],
        )

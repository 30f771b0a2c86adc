"""The co-signing workflow through the real CLI: keys generate, policy compile|show|diff|sign|verify.

Every command runs as a child process, as an owner would run it; expected values are computed
here from the key files and the policy YAML, not taken from the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker import policy
from broker.policy.access import Access
from tests.harness import (
    DEMO_POLICY,
    Owners,
    demo_policy,
    dmzbroker,
    sign_policy,
    write_policy_yaml,
)

PAYLOAD_TYPE = "application/vnd.dmzbroker.policy+json; v=1"


# --- helpers -------------------------------------------------------------------------------


def _public_key(pub: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pub.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    return key


def _keyid(pub: Path) -> str:
    raw = _public_key(pub).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _pub(key: Path) -> Path:
    return key.with_suffix(".pub")


def _compile(source: Path, out: Path) -> Path:
    dmzbroker("policy", "compile", str(source), "--out", str(out))
    return out


def _read(envelope: Path) -> dict[str, Any]:
    data = json.loads(envelope.read_bytes())
    assert isinstance(data, dict)
    return data


def _payload(envelope: Path) -> bytes:
    return base64.b64decode(_read(envelope)["payload"], validate=True)


def _sign(envelope: Path, key: Path, *extra: str, check: bool = True) -> Any:
    return dmzbroker("policy", "sign", str(envelope), "--key", str(key), *extra, check=check)


def _verify(envelope: Path, trust: Path) -> Any:
    return dmzbroker("policy", "verify", str(envelope), "--trust", str(trust), check=False)


def _shortfall(stdout: str) -> str:
    """The verdict line of `policy verify` when thresholds are not met."""
    lines = [line for line in stdout.splitlines() if line.startswith("NOT VERIFIED")]
    assert len(lines) == 1, stdout
    return lines[0]


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding, written out from the DSSE spec."""
    kind = payload_type.encode()
    lengths = [str(len(kind)).encode(), str(len(payload)).encode()]
    return b" ".join([b"DSSEv1", lengths[0], kind, lengths[1], payload])


def _line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of a character offset in `text`."""
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _reversed_keys(value: Any) -> Any:
    """The same document with every mapping's keys in reverse order (lists untouched)."""
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compiled_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(DEMO_POLICY, tmp_path_factory.mktemp("compiled") / "policy.dsse.json")


@pytest.fixture
def unsigned(compiled_once: Path, tmp_path: Path) -> Path:
    """The demo policy compiled by the CLI, not yet signed: this test's own copy."""
    copy = tmp_path / "policy.dsse.json"
    shutil.copyfile(compiled_once, copy)
    return copy


# --- keys generate -------------------------------------------------------------------------


def _generate(out: Path, *extra: str, check: bool = True) -> Any:
    return dmzbroker(
        "keys", "generate", "--role", "ot", "--name", "Test Owner", "--out", str(out), *extra,
        check=check,
    )  # fmt: skip


def test_generated_private_key_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    _generate(tmp_path)
    [private] = tmp_path.glob("*.key")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_printed_key_id_is_sha256_of_the_raw_public_key(tmp_path: Path) -> None:
    printed = _generate(tmp_path).stdout
    [public] = tmp_path.glob("*.pub")
    match = re.search(r"key id:\s+([0-9a-f]{64})\b", printed)
    assert match is not None, printed
    assert match[1] == _keyid(public)


def test_generate_refuses_to_overwrite_existing_key_files(tmp_path: Path) -> None:
    _generate(tmp_path)
    [private] = tmp_path.glob("*.key")
    [public] = tmp_path.glob("*.pub")
    before = private.read_bytes(), public.read_bytes()
    again = _generate(tmp_path, check=False)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert (private.read_bytes(), public.read_bytes()) == before


@pytest.fixture
def encrypted_key(tmp_path: Path) -> tuple[Path, Path]:
    """A key generated with --passphrase-file, and that file."""
    passphrase = tmp_path / "passphrase.txt"
    passphrase.write_text("correct horse battery staple\n")
    _generate(tmp_path / "keys", "--passphrase-file", str(passphrase))
    [private] = (tmp_path / "keys").glob("*.key")
    return private, passphrase


def test_passphrase_file_encrypts_the_private_key(encrypted_key: tuple[Path, Path]) -> None:
    private, passphrase = encrypted_key
    with pytest.raises(TypeError):  # cryptography: encrypted, but no password given
        serialization.load_pem_private_key(private.read_bytes(), password=None)
    loaded = serialization.load_pem_private_key(
        private.read_bytes(), password=passphrase.read_text().splitlines()[0].encode()
    )
    assert (
        _keyid(_pub(private))
        == hashlib.sha256(
            loaded.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        ).hexdigest()
    )


def test_encrypted_key_signs_with_the_same_passphrase_file(
    unsigned: Path, encrypted_key: tuple[Path, Path]
) -> None:
    private, passphrase = encrypted_key
    _sign(unsigned, private, "--passphrase-file", str(passphrase))
    [signature] = _read(unsigned)["signatures"]
    assert signature["keyid"] == _keyid(_pub(private))


def test_encrypted_key_without_passphrase_file_is_refused(
    unsigned: Path, encrypted_key: tuple[Path, Path]
) -> None:
    if os.isatty(0):
        pytest.skip("the CLI would ask on this terminal; run with output capture")
    private, _ = encrypted_key
    refused = _sign(unsigned, private, check=False)
    assert refused.returncode == 2
    assert "--passphrase-file" in refused.stderr
    assert _read(unsigned)["signatures"] == []


def test_encrypted_key_with_a_wrong_passphrase_is_refused(
    tmp_path: Path, unsigned: Path, encrypted_key: tuple[Path, Path]
) -> None:
    private, _ = encrypted_key
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the passphrase\n")
    refused = _sign(unsigned, private, "--passphrase-file", str(wrong), check=False)
    assert refused.returncode == 2
    assert _read(unsigned)["signatures"] == []


def test_generate_with_encrypt_and_no_terminal_asks_for_a_passphrase_file(tmp_path: Path) -> None:
    if os.isatty(0):
        pytest.skip("the CLI would ask on this terminal; run with output capture")
    refused = _generate(tmp_path, "--encrypt", check=False)
    assert refused.returncode == 2
    assert "--passphrase-file" in refused.stderr
    assert list(tmp_path.iterdir()) == []


# --- policy compile ------------------------------------------------------------------------


def test_compile_writes_an_unsigned_dsse_envelope(unsigned: Path) -> None:
    envelope = _read(unsigned)
    assert set(envelope) == {"payloadType", "payload", "signatures"}
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert envelope["signatures"] == []


def test_compiled_payload_is_rfc8785_canonical_json(unsigned: Path) -> None:
    payload = _payload(unsigned)
    assert rfc8785.dumps(json.loads(payload)) == payload


def test_compiled_payload_holds_the_policy_as_written(unsigned: Path) -> None:
    written = yaml.safe_load(DEMO_POLICY.read_text())
    compiled = json.loads(_payload(unsigned))
    assert compiled["deployment_id"] == written["deployment_id"]
    assert compiled["version"] == written["version"]
    assert [s["path"] for s in compiled["signals"]] == [s["path"] for s in written["signals"]]
    assert [c["identity"] for c in compiled["consumers"]] == [
        c["identity"] for c in written["consumers"]
    ]


def test_compiling_the_same_yaml_twice_gives_identical_bytes(tmp_path: Path) -> None:
    first = _compile(DEMO_POLICY, tmp_path / "first.dsse.json")
    second = _compile(DEMO_POLICY, tmp_path / "second.dsse.json")
    assert first.read_bytes() == second.read_bytes()


def test_key_order_in_the_yaml_does_not_change_the_payload(tmp_path: Path, unsigned: Path) -> None:
    document = yaml.safe_load(DEMO_POLICY.read_text())
    reordered = write_policy_yaml(tmp_path, _reversed_keys(document), name="reordered")
    assert reordered.read_text() != write_policy_yaml(tmp_path, document).read_text()
    compiled = _compile(reordered, tmp_path / "reordered.dsse.json")
    assert _payload(compiled) == _payload(unsigned)


YAML_REFUSALS = {
    # name: (document, the text where the error must point, words the message must contain)
    "duplicate-key": ("deployment_id: coldstore-demo\nversion: 1\nversion: 2\n", "version: 2", "duplicate"),
    "anchor-and-alias": ("deployment_id: coldstore-demo\nversion: &v 1\nexpires: *v\n", "&v", "anchor"),
    "python-tag": ("deployment_id: coldstore-demo\nversion: !!python/object:os.system {}\n", "!!", "tag"),
    "merge-key": ("deployment_id: coldstore-demo\ndevices:\n  - <<: {name: a}\n    protocol: modbus\n", "<<", "merge"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(YAML_REFUSALS))
def test_compile_refuses_hidden_yaml_with_one_line_naming_file_line_col(
    tmp_path: Path, case: str
) -> None:
    text, where, word = YAML_REFUSALS[case]
    source = tmp_path / "site.yaml"
    source.write_text(text)
    out = tmp_path / "site.dsse.json"
    refused = dmzbroker("policy", "compile", str(source), "--out", str(out), check=False)
    line, col = _line_col(text, text.index(where))
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"dmzbroker: error: {source}:{line}:{col}: ")
    assert word in refused.stderr.lower()
    assert not out.exists()


def _compile_edited(tmp_path: Path, old: str, new: str) -> tuple[Path, Any]:
    """Compile the demo policy with one line edited; the source and the CLI's result."""
    text = DEMO_POLICY.read_text()
    assert old in text
    source = tmp_path / "site.yaml"
    source.write_text(text.replace(old, new, 1))
    out = tmp_path / "site.dsse.json"
    return source, dmzbroker("policy", "compile", str(source), "--out", str(out), check=False)


def test_compile_refuses_a_standard_yaml_tag_naming_file_line_col(tmp_path: Path) -> None:
    line = "deployment_id: coldstore-demo"
    source, refused = _compile_edited(tmp_path, line, "deployment_id: !!str coldstore-demo")
    row = DEMO_POLICY.read_text().splitlines().index(line) + 1
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        f"dmzbroker: error: {source}:{row}:{len('deployment_id: ') + 1}: "
    )


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_compile_refuses_a_non_finite_scale_with_one_line(tmp_path: Path, value: str) -> None:
    source, refused = _compile_edited(tmp_path, "    scale: 0.01\n", f"    scale: {value}\n")
    row = DEMO_POLICY.read_text().splitlines().index("    scale: 0.01") + 1
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"dmzbroker: error: {source}:{row}: signals[")
    assert "scale and offset must be finite numbers" in refused.stderr


def test_compile_refuses_a_version_beyond_the_json_safe_integers_with_one_line(
    tmp_path: Path,
) -> None:
    source, refused = _compile_edited(tmp_path, "version: 1\n", f"version: {2**53 + 1}\n")
    row = DEMO_POLICY.read_text().splitlines().index("version: 1") + 1
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"dmzbroker: error: {source}:{row}: version: ")


# --- policy sign and verify ----------------------------------------------------------------


def test_signature_is_ed25519_over_dsse_pae_of_the_exact_payload(
    unsigned: Path, owners: Owners
) -> None:
    _sign(unsigned, owners.ot_key)
    envelope = _read(unsigned)
    [signature] = envelope["signatures"]
    message = _pae(envelope["payloadType"], base64.b64decode(envelope["payload"]))
    _public_key(_pub(owners.ot_key)).verify(base64.b64decode(signature["sig"]), message)


def test_unsigned_policy_fails_verification_naming_both_missing_roles(
    unsigned: Path, owners: Owners
) -> None:
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 1
    shortfall = _shortfall(result.stdout)
    assert re.search(r"\bOT\b", shortfall)
    assert re.search(r"\bIT\b", shortfall)


@pytest.mark.parametrize(("signer", "missing", "present"), [("ot", "IT", "OT"), ("it", "OT", "IT")])
def test_one_side_alone_fails_verification_naming_the_other_sides_missing_signature(
    unsigned: Path, owners: Owners, signer: str, missing: str, present: str
) -> None:
    _sign(unsigned, owners.ot_key if signer == "ot" else owners.it_key)
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 1
    shortfall = _shortfall(result.stdout)
    assert re.search(rf"\b{missing}\b", shortfall)
    assert not re.search(rf"\b{present}\b", shortfall)


def test_ot_and_it_signatures_verify_and_name_both_signers_with_roles(
    unsigned: Path, owners: Owners
) -> None:
    _sign(unsigned, owners.ot_key)
    _sign(unsigned, owners.it_key)
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name, role, key in (("Olga OT", "OT", owners.ot_key), ("Ivan IT", "IT", owners.it_key)):
        [line] = [line for line in lines if name in line and "signed" in line]
        assert re.search(rf"\b{role}\b", line.replace(name, "")), line
        assert _keyid(_pub(key)) in line


def test_signing_twice_with_one_key_keeps_one_signature_and_does_not_verify(
    unsigned: Path, owners: Owners
) -> None:
    _sign(unsigned, owners.ot_key)
    _sign(unsigned, owners.ot_key)
    assert [s["keyid"] for s in _read(unsigned)["signatures"]] == [_keyid(_pub(owners.ot_key))]
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 1
    assert re.search(r"\bIT\b", _shortfall(result.stdout))


@pytest.fixture
def strict(tmp_path: Path, owners: Owners) -> Path:
    """The test trust root, but two OT signatures needed."""
    path = tmp_path / "trust-ot-2.yaml"
    listed = [("ot", "Olga OT", owners.ot_key), ("ot", "Otto OT", owners.second_ot_key),
              ("it", "Ivan IT", owners.it_key)]  # fmt: skip
    specs = [f"--owner={role}:{name}:{key.with_suffix('.pub')}" for role, name, key in listed]
    dmzbroker("trust", "init", "--deployment-id", "coldstore-demo", *specs,
              "--threshold-ot", "2", "--out", str(path))  # fmt: skip
    for _, _, key in listed:
        dmzbroker("trust", "sign", str(path), "--key", str(key))
    return path


def test_a_duplicated_signature_does_not_count_twice_towards_a_threshold(
    unsigned: Path, owners: Owners, strict: Path
) -> None:
    _sign(unsigned, owners.ot_key)
    _sign(unsigned, owners.it_key)
    envelope = _read(unsigned)
    [olga] = [s for s in envelope["signatures"] if s["keyid"] == _keyid(_pub(owners.ot_key))]
    envelope["signatures"].append(dict(olga))
    unsigned.write_text(json.dumps(envelope))
    result = _verify(unsigned, strict)
    assert result.returncode == 1
    assert re.search(r"\bOT\b", _shortfall(result.stdout))


def test_two_ot_keys_and_the_it_key_meet_an_ot_threshold_of_two(
    unsigned: Path, owners: Owners, strict: Path
) -> None:
    for key in (owners.ot_key, owners.second_ot_key, owners.it_key):
        _sign(unsigned, key)
    result = _verify(unsigned, strict)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_different_ot_keys_without_it_do_not_verify(unsigned: Path, owners: Owners) -> None:
    _sign(unsigned, owners.ot_key)
    _sign(unsigned, owners.second_ot_key)
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 1
    assert re.search(r"\bIT\b", _shortfall(result.stdout))


def test_key_not_in_the_trust_root_does_not_count_and_is_named(
    unsigned: Path, owners: Owners
) -> None:
    _sign(unsigned, owners.stranger_key)
    _sign(unsigned, owners.it_key)
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 1
    mallory = _keyid(_pub(owners.stranger_key))
    [line] = [line for line in result.stdout.splitlines() if mallory in line]
    assert "not in the trust root" in line
    assert re.search(r"\bOT\b", _shortfall(result.stdout))


def test_one_flipped_payload_byte_fails_both_signatures(unsigned: Path, owners: Owners) -> None:
    _sign(unsigned, owners.ot_key)
    _sign(unsigned, owners.it_key)
    envelope = _read(unsigned)
    payload = bytearray(base64.b64decode(envelope["payload"]))
    payload[len(payload) // 2] ^= 0x01
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    unsigned.write_text(json.dumps(envelope))
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 1
    shortfall = _shortfall(result.stdout)
    assert "do not match" in shortfall
    assert "Olga OT" in shortfall
    assert "Ivan IT" in shortfall


def test_changed_payload_type_fails_verification(unsigned: Path, owners: Owners) -> None:
    _sign(unsigned, owners.ot_key)
    _sign(unsigned, owners.it_key)
    envelope = _read(unsigned)
    envelope["payloadType"] = "application/json"
    unsigned.write_text(json.dumps(envelope))
    result = _verify(unsigned, owners.trust_root)
    assert result.returncode == 1
    assert "payloadType" in result.stdout


def test_signing_refuses_an_envelope_of_another_payload_type(
    unsigned: Path, owners: Owners
) -> None:
    envelope = _read(unsigned)
    envelope["payloadType"] = "application/json"
    unsigned.write_text(json.dumps(envelope))
    result = dmzbroker("policy", "sign", str(unsigned), "--key", str(owners.ot_key), check=False)
    assert result.returncode == 2
    assert "is not a dmzbroker policy; not signing" in result.stderr
    assert _read(unsigned)["signatures"] == []


# --- policy show ---------------------------------------------------------------------------


@pytest.fixture
def shown(unsigned: Path) -> str:
    return str(dmzbroker("policy", "show", str(unsigned)).stdout)


def _lines_with(text: str, *parts: str) -> list[str]:
    return [line for line in text.splitlines() if all(p in line for p in parts)]


def test_show_gives_version_expiry_and_deployment(shown: str) -> None:
    written = yaml.safe_load(DEMO_POLICY.read_text())
    assert re.search(rf"(?im)^\s*version\b\D*\b{written['version']}\b", shown)
    assert _lines_with(shown, "deployment", written["deployment_id"])
    assert _lines_with(shown, "expires", f"{written['expires']:%Y-%m-%dT%H:%M:%S}")


def test_show_lists_every_device_with_host_and_port(shown: str) -> None:
    for device in yaml.safe_load(DEMO_POLICY.read_text())["devices"]:
        assert _lines_with(shown, device["name"], f"{device['host']}:{device['port']}"), device


def test_show_lists_every_signal_with_its_source_table_and_address(shown: str) -> None:
    for signal in yaml.safe_load(DEMO_POLICY.read_text())["signals"]:
        source = signal["source"]
        lines = [line for line in shown.splitlines() if line.strip().startswith(signal["path"])]
        if "expression" in source:
            where = rf"= {re.escape(source['expression'])}"
        elif "object_type" in source:  # BACnet
            where = rf"\b{source['object_type']},{source['instance']} present-value\b"
        else:
            where = rf"\b{source['table']}\s+{source['address']}\b"
        assert any(re.search(where, line) for line in lines), signal["path"]


def test_show_gives_each_signals_meaning_and_flags_the_proposed_ones(shown: str) -> None:
    lines = shown.splitlines()
    for signal in yaml.safe_load(DEMO_POLICY.read_text())["signals"]:
        [at] = [i for i, line in enumerate(lines) if line.startswith(f"  {signal['path']} ")]
        meaning = lines[at + 1]
        assert signal.get("description", "(no description)") in meaning
        if "range" in signal:
            assert f"valid {signal['range']['min']:g} to {signal['range']['max']:g}" in meaning
        assert ("PROPOSED" in lines[at]) == (signal.get("lifecycle") == "proposed")


def test_show_gives_each_assets_states_baselines_and_rules(shown: str) -> None:
    for asset in yaml.safe_load(DEMO_POLICY.read_text())["assets"]:
        assert _lines_with(shown, asset["path"], f"({asset['type']})"), asset["path"]
        for rule in asset.get("rules", []):
            assert _lines_with(shown, f"rule {rule['name']}", rule["when"])
            assert _lines_with(shown, rule["alert"], rule["action"])
        for baseline in asset.get("baselines", []):
            assert _lines_with(shown, "baseline:", baseline["measure"], baseline["ambient"])


def test_show_gives_each_consumer_with_how_many_signals_it_may_see(shown: str) -> None:
    loaded = policy.load(DEMO_POLICY)
    access = Access(loaded)
    for consumer in loaded.consumers:
        count = len(access.visible_to(consumer.identity))
        [line] = _lines_with(shown, consumer.identity)
        assert re.search(rf"(?<![\d.]){count}\s+signals?\b", line), line


def test_show_says_its_contents_are_not_verified(shown: str) -> None:
    assert re.search(r"(?i)not verified|unverified|policy verify", shown)


# --- policy diff ---------------------------------------------------------------------------

ADDED = "coldstore/machine-room/compressor-1/oil_pressure"
REMOVED = "coldstore/machine-room/compressor-1/run_time"
UNCHANGED = "coldstore/storage/cold-room-1/temperature"
NEW_CONSUMER = "spiffe://demo/consumer/maintenance"
PROMOTED = "coldstore/storage/cold-room-1/defrost_heater_current"  # proposed in the demo
NEW_ROLE_PREFIX = "coldstore/machine-room/compressor-1/"


def _sections(output: str) -> dict[str, str]:
    """The WIDENS, NARROWS and CHANGES sections of `policy diff`, each as its lines' text."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        heading = re.match(r"(WIDENS|NARROWS|CHANGES)\b", line)
        if heading:
            current = sections.setdefault(heading[1], [])
        elif current is not None:
            current.append(line)
    assert set(sections) == {"WIDENS", "NARROWS", "CHANGES"}, output
    return {name: "\n".join(lines) for name, lines in sections.items()}


@pytest.fixture(scope="module")
def new_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DEMO_POLICY.read_text())
    document["version"] = 2
    document["signals"] = [s for s in document["signals"] if s["path"] != REMOVED]
    document["signals"].append(
        {
            "path": ADDED,
            "device": "plc-machine-room",
            "source": {"table": "input_register", "address": 5, "type": "int16"},
            "scale": 0.01,
            "unit": "bar",
        }
    )
    for signal in document["signals"]:
        if signal["path"] == PROMOTED:
            del signal["lifecycle"]  # approved by default
    document["roles"].append({"name": "maintenance", "signals": [NEW_ROLE_PREFIX + "*"]})
    document["consumers"].append({"identity": NEW_CONSUMER, "roles": ["maintenance"]})
    return document


@pytest.fixture(scope="module")
def diffed(
    tmp_path_factory: pytest.TempPathFactory, new_document: dict[str, Any]
) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("diff")
    old = _compile(DEMO_POLICY, directory / "old.dsse.json")
    new = _compile(write_policy_yaml(directory, new_document, "new"), directory / "new.dsse.json")
    return _sections(dmzbroker("policy", "diff", str(old), str(new)).stdout)


def test_diff_shows_a_promoted_signal_as_widening(diffed: dict[str, str]) -> None:
    assert _lines_with(diffed["WIDENS"], PROMOTED, "approved")
    assert PROMOTED not in diffed["NARROWS"]


def test_diff_shows_an_added_signal_as_widening(diffed: dict[str, str]) -> None:
    assert ADDED in diffed["WIDENS"]
    assert ADDED not in diffed["NARROWS"]


def test_diff_shows_a_new_consumers_visibility_as_widening(
    diffed: dict[str, str], new_document: dict[str, Any]
) -> None:
    expected = [s["path"] for s in new_document["signals"] if s["path"].startswith(NEW_ROLE_PREFIX)]
    assert expected
    for path in expected:
        assert _lines_with(diffed["WIDENS"], NEW_CONSUMER, path), path


def test_diff_shows_a_removed_signal_as_narrowing(diffed: dict[str, str]) -> None:
    assert REMOVED in diffed["NARROWS"]
    assert REMOVED not in diffed["WIDENS"]


def test_diff_does_not_mention_an_unchanged_signal(diffed: dict[str, str]) -> None:
    assert UNCHANGED in {s["path"] for s in yaml.safe_load(DEMO_POLICY.read_text())["signals"]}
    assert UNCHANGED not in diffed["WIDENS"]
    assert UNCHANGED not in diffed["NARROWS"]


def test_diff_of_a_policy_with_itself_neither_widens_nor_narrows(
    tmp_path: Path, unsigned: Path
) -> None:
    again = _compile(DEMO_POLICY, tmp_path / "again.dsse.json")
    sections = _sections(dmzbroker("policy", "diff", str(unsigned), str(again)).stdout)
    for name in ("WIDENS", "NARROWS"):
        assert "coldstore/" not in sections[name]
        assert "spiffe://" not in sections[name]


def test_verify_refuses_a_policy_for_another_deployment(tmp_path: Path, owners: Owners) -> None:
    document = demo_policy(502, deployment_id="other-site")
    envelope = sign_policy(tmp_path, document, [owners.ot_key, owners.it_key])
    result = _verify(envelope, owners.trust_root)
    assert result.returncode == 1
    assert "is for deployment 'other-site', this trust root for 'coldstore-demo'" in result.stdout

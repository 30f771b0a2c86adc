"""`dmzbroker trust init|sign|show|verify|rotate` through the CLI: exit codes and messages.

One workflow runs in child processes; the rest call the same `main()` in process (a child
process costs seconds on a loaded machine, and proves nothing more about these commands).

Attacks: a root signed by one role, a swapped root (attacker keys, same version, signed by
the attacker), a rollback, a rotation signed only by the new owners, an old unsigned root.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import rfc8785
import yaml

from broker.cli import main
from broker.policy import envelope as envelopes
from tests.harness import Owners, dmzbroker


@dataclass(frozen=True)
class Keys:
    olga: Path  # OT, in the first root
    ivan: Path  # IT, in the first root
    nina: Path  # OT, added by the rotation
    mallory_ot: Path  # the attacker's keys
    mallory_it: Path


@pytest.fixture(scope="module")
def owner_keys(owners: Owners, tmp_path_factory: pytest.TempPathFactory) -> Keys:
    out = tmp_path_factory.mktemp("trust-keys")
    for role, name in (("ot", "Nina New"), ("it", "Mallory")):
        dmzbroker("keys", "generate", "--role", role, "--name", name, "--out", str(out))
    return Keys(
        olga=owners.ot_key,
        ivan=owners.it_key,
        nina=out / "ot-nina-new.key",
        mallory_ot=owners.stranger_key,
        mallory_it=out / "it-mallory.key",
    )


def _spec(role: str, name: str, key: Path) -> str:
    return f"{role}:{name}:{key.with_suffix('.pub')}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`dmzbroker ARGS` in process: exit code, stdout and stderr as a child would give them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _trust(*args: str) -> subprocess.CompletedProcess[str]:
    return _cli("trust", *args)


def _sign(root: Path, *keys: Path) -> None:
    for key in keys:
        signed = _trust("sign", str(root), "--key", str(key))
        assert signed.returncode == 0, signed.stderr


def _init(path: Path, *owners: str, deployment: str = "site-1") -> Path:
    specs = [f"--owner={owner}" for owner in owners]
    made = _trust("init", "--deployment-id", deployment, *specs, "--out", str(path))
    assert made.returncode == 0, made.stderr
    return path


@pytest.fixture
def current(tmp_path: Path, owner_keys: Keys) -> Path:
    """Version 1: Olga (OT) and Ivan (IT), signed by both."""
    root = _init(
        tmp_path / "trust-root.yaml",
        _spec("ot", "Olga OT", owner_keys.olga),
        _spec("it", "Ivan IT", owner_keys.ivan),
    )
    _sign(root, owner_keys.olga, owner_keys.ivan)
    return root


@pytest.fixture
def rotated(tmp_path: Path, current: Path, owner_keys: Keys) -> Path:
    """Version 2, unsigned: Nina replaces Olga as the OT owner."""
    new = tmp_path / "trust-root-v2.yaml"
    made = _trust("rotate", str(current), "--out", str(new),
                  "--add-owner", _spec("ot", "Nina New", owner_keys.nina),
                  "--remove-owner", "Olga OT")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert f"dmzbroker trust verify {new} --current {current}" in made.stdout
    return new


def _error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("dmzbroker: error: ")
    assert "Traceback" not in result.stderr
    return result.stderr


def _verdict(result: subprocess.CompletedProcess[str]) -> str:
    [last] = result.stdout.splitlines()[-1:]
    return last


def test_keys_generate_says_which_trust_command_to_run(tmp_path: Path) -> None:
    made = dmzbroker(
        "keys", "generate", "--role", "ot", "--name", "Jane Doe", "--out", str(tmp_path)
    )
    pub = tmp_path / "ot-jane-doe.pub"
    assert f"dmzbroker trust init --deployment-id ID --owner 'ot:Jane Doe:{pub}'" in made.stdout
    assert f"dmzbroker trust rotate trust-root.yaml --add-owner 'ot:Jane Doe:{pub}'" in made.stdout
    assert "dmzbroker trust sign" in made.stdout


def test_init_then_both_owners_sign_then_verified(tmp_path: Path, owner_keys: Keys) -> None:
    """In child processes, as an owner runs it."""
    root = tmp_path / "trust-root.yaml"
    dmzbroker("trust", "init", "--deployment-id", "site-1", "--out", str(root),
              "--owner", _spec("ot", "Olga OT", owner_keys.olga),
              "--owner", _spec("it", "Ivan IT", owner_keys.ivan))  # fmt: skip
    unsigned = dmzbroker("trust", "verify", str(root), check=False)
    assert unsigned.returncode == 1
    assert _verdict(unsigned).startswith("NOT VERIFIED")
    dmzbroker("trust", "sign", str(root), "--key", str(owner_keys.olga))
    ot_only = dmzbroker("trust", "verify", str(root), check=False)
    assert ot_only.returncode == 1
    assert "needs 1 more IT owner signature(s)" in _verdict(ot_only)
    assert "OT owner signature" not in _verdict(ot_only)
    dmzbroker("trust", "sign", str(root), "--key", str(owner_keys.ivan))
    verified = dmzbroker("trust", "verify", str(root), check=False)
    assert verified.returncode == 0, verified.stdout
    assert re.fullmatch(r"VERIFIED: version 1, sha256 [0-9a-f]{64}", _verdict(verified))
    shown = dmzbroker("trust", "show", str(root), check=False)
    assert shown.returncode == 0
    assert "deployment:  site-1" in shown.stdout
    assert "thresholds:  OT 1, IT 1" in shown.stdout
    assert re.search(r"^  OT  Olga OT  key [0-9a-f]{64}$", shown.stdout, re.MULTILINE)
    assert "signed by its own owners at their thresholds" in shown.stdout


def test_a_root_signed_by_one_role_only_cannot_verify_a_policy(
    tmp_path: Path, owner_keys: Keys
) -> None:
    root = _init(
        tmp_path / "trust-root.yaml",
        _spec("ot", "Olga OT", owner_keys.olga),
        _spec("it", "Ivan IT", owner_keys.ivan),
    )
    _sign(root, owner_keys.ivan)
    refused = _cli("policy", "verify", str(root), "--trust", str(root))
    assert "the trust root is not signed by its own owners: needs 1 more OT owner" in _error(
        refused
    )


def test_signing_again_with_the_same_key_says_it_replaced_its_signature(
    current: Path, owner_keys: Keys
) -> None:
    again = _trust("sign", str(current), "--key", str(owner_keys.olga))
    assert again.returncode == 0
    assert "replacing Olga OT's earlier OT signature (one signature per key" in again.stdout
    assert _trust("verify", str(current)).returncode == 0


def test_a_public_key_given_as_key_is_refused(current: Path, owner_keys: Keys) -> None:
    before = current.read_bytes()
    refused = _trust("sign", str(current), "--key", str(owner_keys.olga.with_suffix(".pub")))
    error = _error(refused)
    assert "a public key, which cannot sign; sign with its private key" in error
    assert str(owner_keys.olga) in error
    assert current.read_bytes() == before


def test_init_never_overwrites_a_file(current: Path, owner_keys: Keys) -> None:
    before = current.read_bytes()
    refused = _trust("init", "--deployment-id", "site-1", "--out", str(current),
                     "--owner", _spec("ot", "Olga OT", owner_keys.olga),
                     "--owner", _spec("it", "Ivan IT", owner_keys.ivan))  # fmt: skip
    assert f"{current}: already exists; not overwriting it" in _error(refused)
    assert current.read_bytes() == before


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("admin:Olga OT:{pub}", "expected ROLE:NAME:PUBFILE with ROLE ot or it"),
        ("ot:{pub}", "expected ROLE:NAME:PUBFILE"),
        ("ot:Olga OT:{key}", "a private key; give the owner's public key"),
        ("ot:Olga OT:{pub}.missing", "file not found"),
        ("ot:Olga OT:{yaml}", "not a PEM public key"),
    ],
)
def test_a_malformed_owner_is_refused_naming_it(
    tmp_path: Path, owner_keys: Keys, spec: str, expected: str
) -> None:
    other = tmp_path / "notes.yaml"
    other.write_text("just: text\n")
    owner = spec.format(pub=owner_keys.olga.with_suffix(".pub"), key=owner_keys.olga, yaml=other)
    out = tmp_path / "root.yaml"
    refused = _trust("init", "--deployment-id", "site-1", "--out", str(out),
                     "--owner", owner, "--owner", _spec("it", "Ivan IT", owner_keys.ivan))  # fmt: skip
    message = _error(refused)
    assert f"--owner {owner!r}" in message
    assert expected in message
    assert not out.exists()


def test_a_threshold_above_the_number_of_keys_of_that_role_is_refused(
    tmp_path: Path, owner_keys: Keys
) -> None:
    out = tmp_path / "root.yaml"
    refused = _trust("init", "--deployment-id", "site-1", "--out", str(out), "--threshold-ot", "2",
                     "--owner", _spec("ot", "Olga OT", owner_keys.olga),
                     "--owner", _spec("it", "Ivan IT", owner_keys.ivan))  # fmt: skip
    assert "--threshold-ot 2: needs 2 OT signature(s) but only 1 OT" in _error(refused)
    assert not out.exists()


def test_a_key_listed_twice_is_refused(tmp_path: Path, owner_keys: Keys) -> None:
    refused = _trust("init", "--deployment-id", "site-1", "--out", str(tmp_path / "r.yaml"),
                     "--owner", _spec("ot", "Olga OT", owner_keys.olga),
                     "--owner", _spec("it", "Olga as IT", owner_keys.olga))  # fmt: skip
    assert "one key may hold only one role" in _error(refused)


def test_an_old_unsigned_yaml_root_is_refused_naming_trust_init(
    tmp_path: Path, owner_keys: Keys
) -> None:
    old = tmp_path / "trust-root.yaml"
    old.write_text(
        yaml.safe_dump(
            {
                "deployment_id": "site-1",
                "version": 1,
                "thresholds": {"ot": 1, "it": 1},
                "keys": [
                    {
                        "name": "Olga",
                        "role": "ot",
                        "public_key": owner_keys.olga.with_suffix(".pub").read_text(),
                    },
                    {
                        "name": "Ivan",
                        "role": "it",
                        "public_key": owner_keys.ivan.with_suffix(".pub").read_text(),
                    },
                ],
            }
        )
    )
    for command in (("trust", "verify", str(old)), ("trust", "show", str(old)),
                    ("policy", "verify", str(old), "--trust", str(old))):  # fmt: skip
        message = _error(_cli(*command))
        assert f"{old}: an unsigned trust root (plain YAML) is no longer accepted" in message
        assert "`dmzbroker trust init`" in message


def test_a_proper_rotation_is_verified_against_the_current_root(
    current: Path, rotated: Path, owner_keys: Keys
) -> None:
    shown = _trust("show", str(rotated))
    assert "version:     2" in shown.stdout
    assert "Nina New" in shown.stdout
    assert "Olga OT" not in shown.stdout.partition("owners:")[2].partition("signed")[0]
    _sign(rotated, owner_keys.nina, owner_keys.ivan, owner_keys.olga)
    result = _trust("verify", str(rotated), "--current", str(current))
    assert result.returncode == 0, result.stdout
    assert _verdict(result).endswith(", may replace version 1")


def test_a_rotation_signed_only_by_the_new_owners_is_refused(
    current: Path, rotated: Path, owner_keys: Keys
) -> None:
    signing = _trust("sign", str(rotated), "--key", str(owner_keys.nina))
    assert "note:" not in signing.stdout  # Nina is an owner of the new root
    _sign(rotated, owner_keys.ivan)
    assert _trust("verify", str(rotated)).returncode == 0  # valid alone ...
    result = _trust("verify", str(rotated), "--current", str(current))
    assert result.returncode == 1  # ... but the owners of the root in force did not vouch
    verdict = _verdict(result)
    assert verdict.startswith("NOT VERIFIED: not_signed_by_current:")
    assert "needs 1 more OT owner signature(s)" in verdict
    note = _trust("sign", str(rotated), "--key", str(owner_keys.olga))
    assert "note: this key is not an owner in this root" in note.stdout


def test_a_swapped_root_with_attacker_keys_and_the_same_version_is_refused(
    tmp_path: Path, current: Path, owner_keys: Keys
) -> None:
    swapped = _init(
        tmp_path / "swapped.yaml",
        _spec("ot", "Olga OT", owner_keys.mallory_ot),  # the names are free to lie
        _spec("it", "Ivan IT", owner_keys.mallory_it),
    )
    _sign(swapped, owner_keys.mallory_ot, owner_keys.mallory_it)
    assert _trust("verify", str(swapped)).returncode == 0  # self-consistent ...
    result = _trust("verify", str(swapped), "--current", str(current))
    assert result.returncode == 1  # ... and refused against the root in force
    assert _verdict(result).startswith("NOT VERIFIED: swapped: the new trust root has version 1")


def test_a_rollback_to_the_previous_root_is_refused(
    current: Path, rotated: Path, owner_keys: Keys
) -> None:
    _sign(rotated, owner_keys.nina, owner_keys.ivan, owner_keys.olga)
    result = _trust("verify", str(current), "--current", str(rotated))
    assert result.returncode == 1
    assert "rollback: the new trust root has version 1, lower than version 2" in _verdict(result)


def test_rotate_refuses_an_unknown_owner_and_an_unmet_threshold(
    tmp_path: Path, current: Path
) -> None:
    unknown = _trust("rotate", str(current), "--out", str(tmp_path / "a.yaml"),
                     "--remove-owner", "Nobody")  # fmt: skip
    assert "--remove-owner 'Nobody': " in _error(unknown)
    assert "'Olga OT'" in unknown.stderr
    no_it = _trust("rotate", str(current), "--out", str(tmp_path / "b.yaml"),
                   "--remove-owner", "Ivan IT")  # fmt: skip
    assert "the IT threshold 1: needs 1 IT signature(s) but only 0" in _error(no_it)
    assert not (tmp_path / "a.yaml").exists()
    assert not (tmp_path / "b.yaml").exists()


def test_rotate_starts_only_from_a_verified_root(tmp_path: Path, owner_keys: Keys) -> None:
    half = _init(
        tmp_path / "half.yaml",
        _spec("ot", "Olga OT", owner_keys.olga),
        _spec("it", "Ivan IT", owner_keys.ivan),
    )
    _sign(half, owner_keys.olga)
    refused = _trust("rotate", str(half), "--out", str(tmp_path / "next.yaml"))
    assert "needs 1 more IT owner signature(s)" in _error(refused)


HOSTILE = "Olga\x1b[2J\x1b[31m\rVERIFIED\nforged\u202e"


def test_trust_init_refuses_an_owner_name_with_control_characters(
    tmp_path: Path, owner_keys: Keys
) -> None:
    made = _trust("init", "--deployment-id", "site-1", "--out", str(tmp_path / "root.json"),
                  f"--owner={_spec('ot', HOSTILE, owner_keys.olga)}",
                  f"--owner={_spec('it', 'Ivan IT', owner_keys.ivan)}")  # fmt: skip
    error = _error(made)
    assert "keys[0].name: holds a control or format character (\\x1b)" in error
    assert not any(c in made.stdout + error for c in "\x1b\r\u202e")
    assert not (tmp_path / "root.json").exists()
    made = _trust("init", "--deployment-id", "site\n1", "--out", str(tmp_path / "root.json"),
                  f"--owner={_spec('ot', 'Olga', owner_keys.olga)}",
                  f"--owner={_spec('it', 'Ivan IT', owner_keys.ivan)}")  # fmt: skip
    assert "deployment_id: holds a control or format character (\\n)" in _error(made)


def test_a_hand_made_root_with_a_hostile_owner_name_is_refused_by_show_and_verify(
    tmp_path: Path, current: Path, owner_keys: Keys
) -> None:
    envelope = envelopes.read_bytes(current)
    decoded = json.loads(envelope)
    payload = json.loads(base64.b64decode(decoded["payload"]))
    payload["keys"][0]["name"] = HOSTILE
    decoded["payload"] = base64.b64encode(rfc8785.dumps(payload)).decode()
    decoded["signatures"] = []
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(decoded))
    _sign_raw = _trust("sign", str(hostile), "--key", str(owner_keys.olga))
    for result in (
        _sign_raw,
        _trust("show", str(hostile)),
        _trust("verify", str(hostile)),
        _cli("policy", "verify", str(current), "--trust", str(hostile)),
    ):
        error = _error(result)
        assert "keys[0].name: holds a control or format character" in error
        assert not any(c in result.stdout + error for c in "\x1b\r\u202e")

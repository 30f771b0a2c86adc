"""Options every command shares the meaning of: `--out FILE` names a file, never a folder
(`audit keygen`, `policy compile`, `trust init|rotate`), and `--help` gives each option's default.

The commands run in process (`main()`); argparse's refusals exit 2 with `error: argument --out`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
from pathlib import Path

import pytest

from broker.cli import _parser, main
from broker.trust import keys


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, or a refused argument
            code = int(e.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _refused_out(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "error: argument --out: " in result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


# --- audit keygen --out FILE ---------------------------------------------------------------


def test_audit_keygen_writes_the_key_to_the_file_named_and_the_public_key_beside_it(
    tmp_path: Path,
) -> None:
    private = tmp_path / "appliance-audit.key"
    made = _cli("audit", "keygen", "--out", str(private))
    assert made.returncode == 0, made.stderr
    public = tmp_path / "appliance-audit.pub"
    assert made.stdout == f"private key: {private} (mode 0600)\npublic key:  {public}\n"
    assert sorted(tmp_path.iterdir()) == [private, public]
    assert private.stat().st_mode & 0o777 == 0o600
    key = keys.load_private(private, None)
    assert keys.key_id(keys.parse_public_pem(public.read_text(), "pub")) == keys.key_id(
        key.public_key()
    )


def test_audit_keygen_refuses_a_folder_naming_a_file_that_would_do(tmp_path: Path) -> None:
    error = _refused_out(_cli("audit", "keygen", "--out", str(tmp_path)))
    assert f"{tmp_path}: a folder; name the file to write, e.g. {tmp_path}/audit.key" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("given", "instead"), [("keys", "keys/audit.key"),
                                                 ("audit.pub", "audit.key")])  # fmt: skip
def test_audit_keygen_refuses_a_name_without_key_suffix(
    tmp_path: Path, given: str, instead: str
) -> None:
    error = _refused_out(_cli("audit", "keygen", "--out", str(tmp_path / given)))
    assert f"the file name must end in .key, e.g. {tmp_path / instead}" in error
    assert list(tmp_path.iterdir()) == []


def test_audit_keygen_refuses_a_missing_folder_and_an_existing_key(tmp_path: Path) -> None:
    error = _refused_out(_cli("audit", "keygen", "--out", str(tmp_path / "no" / "audit.key")))
    assert f"the folder {tmp_path / 'no'} does not exist" in error
    private = tmp_path / "audit.key"
    assert _cli("audit", "keygen", "--out", str(private)).returncode == 0
    before = private.read_bytes()
    again = _cli("audit", "keygen", "--out", str(private))
    assert again.returncode == 2
    assert f"{private}: already exists; not overwriting it" in again.stderr
    assert private.read_bytes() == before


@pytest.mark.parametrize("linked", ["audit.key", "audit.pub"])
def test_audit_keygen_refuses_a_dangling_link_and_never_writes_through_it(
    tmp_path: Path, linked: str
) -> None:
    target = tmp_path / "elsewhere" / "target"
    target.parent.mkdir()
    (tmp_path / linked).symlink_to(target)
    made = _cli("audit", "keygen", "--out", str(tmp_path / "audit.key"))
    assert made.returncode == 2, (made.stdout, made.stderr)
    assert made.stderr == (
        f"dmzbroker: error: {tmp_path / linked}: a symbolic link; not writing a key through it "
        "(choose another --out)\n"
    )
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([linked, "elsewhere"])


# --- the same for the other --out FILE options ---------------------------------------------


def test_policy_compile_and_trust_init_refuse_a_folder(tmp_path: Path) -> None:
    source = tmp_path / "site.yaml"
    source.write_text("not compiled: --out is checked first\n")
    error = _refused_out(_cli("policy", "compile", str(source), "--out", str(tmp_path)))
    assert f"a folder; name the file to write, e.g. {tmp_path}/site.dsse.json" in error
    owner = "--owner=ot:Olga:olga.pub"
    error = _refused_out(
        _cli("trust", "init", "--deployment-id", "d", owner, "--out", str(tmp_path))
    )
    assert f"e.g. {tmp_path}/trust-root.yaml" in error


# --- defaults in --help --------------------------------------------------------------------


def _helps() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command's parser, by its words (`("certs", "issue", "server")`)."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        found[words] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*words, name))

    walk(_parser(), ())
    return found


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (("certs", "init-ca"), "(default: 3650)"),
        (("certs", "issue", "server"), "(default: 366)"),
        (("certs", "issue", "client"), "(default: 90)"),
        (("certs", "crl"), "(default: 7)"),
        (("audit", "show"), "(default: table)"),
        (("run",), "(default: /etc/dmzbroker/broker.yaml)"),
    ],
)
def test_help_shows_the_default_of_days_and_the_other_options(
    command: tuple[str, ...], shown: str
) -> None:
    text = " ".join(_helps()[command].format_help().split())  # joined across wrapped lines
    assert shown in text


def test_every_option_with_a_default_shows_it_and_none_shows_an_empty_one() -> None:
    for words, parser in _helps().items():
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text, words
        assert "(default: False)" not in text, words
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, "", [], argparse.SUPPRESS):
                continue
            if isinstance(default, bool):
                continue
            assert "default" in text.lower(), (words, action.option_strings)
            assert f"default: {default}" in text or "default" in (action.help or ""), (
                words,
                action.option_strings,
            )

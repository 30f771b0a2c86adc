"""`make sbom`: a CycloneDX SBOM of what the appliance runs, made by a kept tool (cyclonedx-py).

The target itself runs, with its folder and output moved under the test's tmp_path (about
10-20 s: a venv with dmzbroker and its runtime dependencies, from pip's cache). Its SBOM must be
valid CycloneDX, list exactly the distributions installed in that venv with versions and purls,
and list none of the dev extra's tools; an SBOM of the dev venv, which the same check reads,
lists them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
RUNTIME = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PROJECT["dependencies"]}
DEV_TOOLS = {
    canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["dev"]
}
# An environment's own installers are not what the appliance runs either.
INSTALLERS = {"pip", "setuptools", "wheel"}


def _components(bom: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {canonicalize_name(c["name"]): c for c in bom["components"]}


def not_runtime(bom: dict[str, Any]) -> set[str]:
    """The components of `bom` that are dev tools or installers, not the appliance's.

    A dev tool that became a runtime dependency's dependency would be listed rightly; say so
    here then, with the dependency that brings it."""
    return set(_components(bom)) & ((DEV_TOOLS - set(RUNTIME)) | INSTALLERS)


def _installed(venv: Path) -> dict[str, str]:
    """Distribution -> version, as the venv's own interpreter sees them."""
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = subprocess.run(
        [venv / "bin" / "python", "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return {canonicalize_name(name): version for name, version in json.loads(out).items()}


def _make_sbom(tmp: Path) -> tuple[Path, Path]:
    venv, output = tmp / "sbom-venv", tmp / "dmzbroker.cdx.json"
    subprocess.run(
        # --old-file: never reinstall the dev venv from here, whatever pyproject.toml's mtime.
        ["make", "--old-file=.venv/.installed", "sbom", f"SBOM_VENV={venv}", f"SBOM_FILE={output}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv, output


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    venv, output = _make_sbom(tmp_path_factory.mktemp("sbom"))
    return venv, output.read_text()


def test_the_sbom_is_valid_cyclonedx_naming_dmzbroker(made: tuple[Path, str]) -> None:
    _, text = made
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")
    root = bom["metadata"]["component"]
    assert (root["name"], root["version"], root["type"]) == (
        "dmzbroker",
        PROJECT["version"],
        "application",
    )


def test_it_lists_what_the_runtime_venv_holds_with_versions_and_purls(
    made: tuple[Path, str],
) -> None:
    venv, text = made
    components = _components(json.loads(text))
    installed = _installed(venv)
    assert installed.pop("dmzbroker") == PROJECT["version"]  # the root component, not a part
    assert {name: c["version"] for name, c in components.items()} == installed
    for name, component in components.items():
        assert component["purl"] == f"pkg:pypi/{name}@{component['version']}"
    for name, requirement in RUNTIME.items():
        assert name in components, f"runtime dependency {name} missing"
        assert components[name]["version"] in SpecifierSet(str(requirement.specifier))
    for name in ("asyncua", "pymodbus", "cryptography", "aiohttp"):
        assert name in components


def test_it_lists_no_dev_tool(made: tuple[Path, str]) -> None:
    _, text = made
    assert not_runtime(json.loads(text)) == set()


def test_the_dev_venv_would_list_them() -> None:
    """What the sketched target did (the dev venv): the check above sees the difference."""
    out = subprocess.run(
        [
            Path(sys.prefix) / "bin" / "cyclonedx-py",
            "environment",
            "--no-validate",  # what it lists is the point here; validating takes 20 s
            "-o",
            "-",
            sys.prefix,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert {"pytest", "mypy", "ruff", "cyclonedx-bom"} <= not_runtime(json.loads(out))

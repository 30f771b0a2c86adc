"""The boundary in the code itself: import contracts and the absence of any write path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO

BROKER = REPO / "broker"
# Every pymodbus client call that writes, and the generic ones that could.
WRITE_CALLS = {
    "write_coil", "write_coils", "write_register", "write_registers", "mask_write_register",
    "readwrite_registers", "execute", "write_value", "write_attribute", "write_values", "call_method",
}  # fmt: skip


def product_modules() -> list[Path]:
    """The code that runs in the broker's processes (the simulators are not part of it)."""
    return [p for p in BROKER.rglob("*.py") if "sim" not in p.relative_to(BROKER).parts]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports)], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_no_product_module_calls_a_write_service() -> None:
    offenders = []
    for path in product_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in WRITE_CALLS:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.attr}")
            if isinstance(node, ast.Constant) and node.value in WRITE_CALLS:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_the_plant_half_has_no_server_code() -> None:
    listening = {"start_server", "create_server", "TCPSite", "listen", "serve_forever"}
    offenders = [
        f"{path.relative_to(REPO)}:{node.lineno}: {node.attr}"
        for path in (BROKER / "plant").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in listening
    ]
    assert offenders == []

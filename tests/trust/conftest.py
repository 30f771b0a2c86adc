"""What the TLS tests share: a CA made by our own CLI, with a server certificate for
localhost and two consumer certificates (`good`, `revoked`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import dmzbroker


@pytest.fixture(scope="session")
def ca_made_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once by the CLI (four processes, over a second); each test gets its own copy."""
    made = tmp_path_factory.mktemp("tls-ca")
    dmzbroker("certs", "init-ca", "--out", str(made), "--name", "TLS test CA")
    dmzbroker("certs", "issue", "server", "--ca", str(made), "--out", str(made),
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    for name in ("good", "revoked"):
        dmzbroker("certs", "issue", "client", "--ca", str(made), "--out", str(made),
                  "--uri", f"spiffe://t/consumer/{name}")  # fmt: skip
    return made


@pytest.fixture
def ca(ca_made_once: Path, tmp_path: Path) -> Path:
    """A CA folder of this test's own: what a test revokes or replaces stays in its copy
    (files keep their modes: the keys stay 0600)."""
    shutil.copytree(ca_made_once, tmp_path, dirs_exist_ok=True)
    return tmp_path

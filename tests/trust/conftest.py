"""What the TLS tests share: a CA made by our own CLI, with a server certificate for
localhost and two consumer certificates (`good`, `revoked`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import dmzbroker


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "TLS test CA")
    dmzbroker("certs", "issue", "server", "--ca", str(tmp_path), "--out", str(tmp_path),
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    for name in ("good", "revoked"):
        dmzbroker("certs", "issue", "client", "--ca", str(tmp_path), "--out", str(tmp_path),
                  "--uri", f"spiffe://t/consumer/{name}")  # fmt: skip
    return tmp_path

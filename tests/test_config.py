"""The appliance config: typed, unknown keys refused, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import config
from broker.errors import ConfigError

GOOD = """\
policy: policies/site.dsse.json
trust_root: trust-root.yaml
spool: {dir: spool}
plant: {state_dir: plant-state}
audit: {dir: audit, key: audit.key}
enterprise:
  state_dir: state
  tls: {cert: certs/server.crt, key: certs/server.key, client_ca: certs/ca.crt}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, GOOD))
    assert loaded.policy == tmp_path / "policies" / "site.dsse.json"
    assert loaded.trust_root == tmp_path / "trust-root.yaml"
    assert loaded.enterprise.tls.client_ca == tmp_path / "certs" / "ca.crt"
    assert loaded.enterprise.listen.port == 8443  # the documented default
    assert loaded.spool.retention_mib == 1024
    listen = loaded.enterprise.listen
    assert (listen.max_connections, listen.max_connections_per_address) == (1024, 64)
    assert (listen.header_timeout_s, listen.idle_timeout_s) == (10.0, 60.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "colour: red\n", "9: (top level): unknown key 'colour' (known keys: policy, trust_root, "
         "spool, plant, enterprise, audit, log, supervisor, diode)"),
        (GOOD.replace("spool: {dir: spool}", "spool: {dir: spool, size: 3}"),
         "3: spool: unknown key 'size' (known keys: dir, segment_mib, retention_mib)"),
        (GOOD + "  listen: {port: 70000}\n", "9: enterprise.listen.port: expected `int` <= 65535, got `70000`"),
        (GOOD + "  listen: {max_connections: 10, max_connections_per_address: 20}\n",
         "9: enterprise.listen: max_connections_per_address (20) cannot exceed max_connections (10)"),
        (GOOD + "  listen: {header_timeout_s: 0}\n", "9: enterprise.listen.header_timeout_s: expected `float` > 0.0, got `0`"),
        (GOOD + "  listen: {max_connections: 0}\n", "9: enterprise.listen.max_connections: expected `int` >= 1, got `0`"),
        (GOOD.replace("  tls: {cert: certs/server.crt, key: certs/server.key, client_ca: certs/ca.crt}\n", ""),
         "6: enterprise: missing required key 'tls'"),
        (GOOD + "log: {format: xml}\n", "9: log.format: invalid enum value 'xml' (one of: auto, json, console)"),
        (GOOD.replace("dir: spool", "dir: 42"), "3: spool.dir: expected a file system path, got `42`"),
        (GOOD.replace("spool: {dir: spool}", "spool: {dir: spool, segment_mib: 64, retention_mib: 100}"),
         "3: spool: retention_mib (100) must be at least twice segment_mib (64): the spool always keeps the newest full segment"),
    ],
)  # fmt: skip
def test_mistakes_are_named_by_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        config.load(path)
    assert str(refused.value) == f"{path}:{expected}"

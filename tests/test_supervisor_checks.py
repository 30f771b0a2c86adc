"""`run` uses only the config and trust root its checks child verified (ADR 0031, review F5).

The child is the real `run --checks-only` process; the supervisor's side is the function `run`
calls after it, so that a file changed between the two is a plain write, not a race.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broker import config
from broker.commands.processes import read_as_checked
from broker.errors import ConfigError
from broker.run_checks import Checked, checked_in_child, config_digest, refuse_unless_checked
from tests.harness import Deployment

pytestmark = pytest.mark.timeout(90)


def test_a_config_changed_after_the_checks_child_is_refused_and_an_unchanged_one_read(
    deployment: Deployment,
) -> None:
    code, checked = checked_in_child(deployment.config, None, True, True)
    assert code == 0
    assert checked is not None
    cfg, root = read_as_checked(deployment.config, checked)  # nothing changed: used
    assert config_digest(cfg) == checked.config
    assert root.sha256 == checked.trust_root
    document = yaml.safe_load(deployment.config.read_text())
    document["supervisor"] = {"restart_initial_s": 7.0}  # valid, but never checked
    deployment.config.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as refused:
        read_as_checked(deployment.config, checked)
    assert str(refused.value) == (
        f"{deployment.config} changed after `run` checked it; nothing was started: run again "
        "once the files are no longer being changed"
    )


def test_a_refused_check_reports_nothing_to_use(deployment: Deployment) -> None:
    deployment.config.write_text(deployment.config.read_text() + "unknown_key: 1\n")
    code, checked = checked_in_child(deployment.config, None, True, True)
    assert (code, checked) == (2, None)


def test_a_changed_trust_root_or_no_report_is_refused_naming_the_file(tmp_path: Path) -> None:
    cfg, root = tmp_path / "broker.yaml", tmp_path / "trust-root.yaml"
    read = Checked("c" * 64, "r" * 64)
    refuse_unless_checked(read, read, cfg, root)
    with pytest.raises(ConfigError, match=f"^{root} changed after `run` checked it;"):
        refuse_unless_checked(Checked("c" * 64, "0" * 64), read, cfg, root)
    with pytest.raises(ConfigError, match=f"^{cfg} and {root} changed after"):
        refuse_unless_checked(Checked("0" * 64, "0" * 64), read, cfg, root)
    with pytest.raises(ConfigError, match="did not report what they checked; nothing was started"):
        refuse_unless_checked(None, read, cfg, root)


def test_the_config_digest_is_the_same_in_another_process(deployment: Deployment) -> None:
    """Hash randomisation differs per process: sets and keys must not change the digest."""
    here = config_digest(config.load(deployment.config))
    there = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from broker import config;"
         "from broker.run_checks import config_digest;"
         "print(config_digest(config.load(Path(sys.argv[1]))))", str(deployment.config)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert there == here

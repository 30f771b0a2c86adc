"""Policy files that must be refused, each with one clear line naming file and key.

Data-driven: each folder in cases/ holds a `policy.yaml` and the `expected.err` line that
must end the error message: after the file name, `LINE: key.path: what` (or `LINE:COLUMN:`
for YAML the strict parser refuses). Add a case by adding a folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import policy
from broker.errors import ConfigError
from tests.harness import DEMO_POLICY

CASES = sorted((Path(__file__).parent / "cases").iterdir())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_with_a_message_naming_file_and_key(case: Path) -> None:
    expected = (case / "expected.err").read_text().strip()
    with pytest.raises(ConfigError) as refused:
        policy.load(case / "policy.yaml")
    message = str(refused.value)
    assert message.startswith(str(case / "policy.yaml") + ":")
    assert message.endswith(expected)
    assert "\n" not in message


def test_the_demo_policy_loads() -> None:
    loaded = policy.load(DEMO_POLICY)
    assert loaded.version == 1
    assert len(loaded.signals) == len({s.path for s in loaded.signals}) == 20


def test_a_missing_policy_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: file not found"):
        policy.load(Path("nowhere.yaml"))

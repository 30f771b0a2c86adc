"""`widening`: what a new policy lets cross that the old did not, kept short for the audit log."""

from __future__ import annotations

from pathlib import Path

from broker import policy
from broker.policy.access import Access
from broker.policy.report import WIDENING_LIMIT, widening
from tests.harness import CONSUMER_URI, demo_policy, write_policy_yaml


def test_widening_lists_added_consumers_and_nothing_for_a_narrower_policy(tmp_path: Path) -> None:
    wide = demo_policy(5020, version=2)
    wide["consumers"].append({"identity": "spiffe://demo/consumer/new", "roles": ["historian"]})
    old = policy.load(write_policy_yaml(tmp_path, demo_policy(5020), "old"))
    new = policy.load(write_policy_yaml(tmp_path, wide, "new"))
    found = widening(old, new)
    assert found and all(
        line.startswith("spiffe://demo/consumer/new may now see ") for line in found
    )
    assert widening(new, old) == []  # taking it away again widens nothing


def test_widening_is_cut_to_its_limit_and_says_how_many_more(tmp_path: Path) -> None:
    wide = demo_policy(5020, version=2)
    wide["consumers"] += [
        {"identity": f"spiffe://demo/consumer/c{i:02d}", "roles": ["historian"]} for i in range(5)
    ]
    old = policy.load(write_policy_yaml(tmp_path, demo_policy(5020), "old"))
    new = policy.load(write_policy_yaml(tmp_path, wide, "new"))
    found = widening(old, new)
    assert len(found) == WIDENING_LIMIT
    gained = 5 * len(Access(new).visible_to(CONSUMER_URI))  # each sees what the historian sees
    more = gained - (WIDENING_LIMIT - 1)
    assert found[-1] == f"… and {more} more (`dmzbroker policy diff` lists all)"

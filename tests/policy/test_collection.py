"""Settling the cyclic collector after a policy is loaded (ADR 0031, review F6)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from broker.policy.collection import collection_paused, settle


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # leave the test process's collector as it was


def test_settle_frees_the_cycles_a_paused_parse_left_and_freezes_what_lives() -> None:
    with collection_paused():
        dropped = Node()
        gone = weakref.ref(dropped)
        del dropped
    settle()
    assert gone() is None
    assert gc.get_freeze_count() > 0


def test_settle_again_frees_what_an_earlier_settle_froze_and_is_gone_now() -> None:
    """A reload: the replaced policy was frozen at start; settling after it frees it."""
    old_policy = Node()
    gone = weakref.ref(old_policy)
    settle()
    del old_policy
    gc.collect()
    assert gone() is not None  # frozen: a collection alone never looks at it
    settle()
    assert gone() is None

"""``settle_heap``: what ``xpuflow serve`` does to the collector before it serves."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from xpuflow.serving.server import GC_YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settle_heap_freezes_survivors_and_raises_the_young_threshold(restored_gc: None) -> None:
    older = gc.get_threshold()[1:]
    survivor = [object() for _ in range(10)]
    settle_heap()
    assert gc.get_freeze_count() > len(survivor)
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older)


def test_cycles_made_after_settling_are_still_collected(restored_gc: None) -> None:
    settle_heap()

    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b  # made after the freeze: the collector still sees it
    assert gc.collect() >= 2

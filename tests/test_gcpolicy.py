"""The relay's garbage collection policy (kasagi_relay.gcpolicy): what is frozen is still
collected by a full collection, young garbage by every turn, and stop hands back."""

from __future__ import annotations

import asyncio
import gc
import weakref

from kasagi_relay.gcpolicy import Collector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> tuple[weakref.ref[Node], list[Node]]:
    """A two-object reference cycle, held by the returned list; a weak reference to it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a), [a, b]


async def test_turns_collect_young_cycles_and_a_full_collection_the_frozen_ones() -> None:
    collector = Collector(period_s=0.01)
    collector.start(asyncio.get_running_loop())
    try:
        young, holder = cycle()
        del holder  # garbage before the next turn: that turn collects it
        old, kept = cycle()
        await asyncio.sleep(0.05)  # a few turns: `kept` is frozen with its cycle
        assert young() is None
        assert gc.get_freeze_count() > 0
        kept.clear()
        gc.collect()  # an ordinary collection does not look at frozen objects
        assert old() is not None
        collector.full()
        assert old() is None
    finally:
        collector.stop()
    assert gc.get_freeze_count() == 0


async def test_stop_gives_cpython_back_every_object() -> None:
    collector = Collector(period_s=0.01)
    collector.start(asyncio.get_running_loop())
    ref, kept = cycle()
    await asyncio.sleep(0.03)
    collector.stop()
    kept.clear()
    gc.collect()
    assert ref() is None

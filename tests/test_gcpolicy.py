"""The relay's garbage collection policy (kasagi_relay.gcpolicy): what is frozen is still
collected by a full collection, young garbage by every turn, and stop hands back."""

from __future__ import annotations

import asyncio
import gc
import urllib.request
import weakref

from kasagi_relay.gcpolicy import Collector
from testkit.relay import relay_process


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


def test_each_full_collection_is_observed_with_its_duration() -> None:
    seen: list[float] = []
    collector = Collector(observe=seen.append)
    collector.full()
    collector.full()
    assert len(seen) == 2
    assert all(0 <= took < 10 for took in seen)
    gc.unfreeze()


def read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


async def test_a_relay_reports_its_full_collections_in_metrics() -> None:
    """The start-up full collection (--gc freeze, the default) is in /metrics; with --gc
    default there is none."""
    for flag, expected in (("freeze", 1.0), ("default", 0.0)):
        async with relay_process("--gc", flag) as rp:
            url = rp.url.replace("ws://", "http://").replace("/ws", "/metrics")
            text = await asyncio.to_thread(read, url)
            name = "kasagi_gc_full_collection_seconds_count "
            (line,) = [x for x in text.splitlines() if x.startswith(name)]
            assert float(line.split()[-1]) == expected, (flag, line)


async def test_a_full_collection_that_finds_nothing_backs_off_and_garbage_resets_it() -> None:
    gc.collect()
    collector = Collector(growth=1.0)
    collector.full()  # nothing to find here: the next one waits for twice the growth
    assert collector.next_growth == 2.0
    collector.full()
    collector.full()
    assert collector.next_growth == 4.0  # capped at MAX_BACKOFF x growth
    holder = []
    for _ in range(collector._base // 50):  # garbage: cycles, > 1 % of the heap's blocks
        a, b = Node(), Node()
        a.other, b.other = b, a
        holder.append(a)
    holder.clear()
    collector.full()
    assert collector.next_growth == 1.0
    gc.unfreeze()

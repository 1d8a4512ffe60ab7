"""Cyclic garbage collection for a long-running relay: collections that scan only what is new.

CPython's full (generation 2) collection scans every tracked object, on the loop thread. A
relay's heap is mostly its connections: about 100 tracked objects each (websockets'
connection, its tasks, futures, timers, headers...), so with 10,000 members one full
collection took 0.7 s, and CPython runs one whenever a quarter more objects have reached the
old generation, which members joining and the memory backend's history (an `Op` per delta)
do within seconds. Each one stopped every room for 0.7 s: at 3,000 publishes/s the delivery
p99 went from ~20 ms to 0.7 s (docs/benchmarks.md "Many rooms").

So the relay keeps the old generation small instead. Every `period_s` it collects what is
not frozen (the objects that survived since the last turn: milliseconds) and freezes the
survivors (`gc.freeze`: the permanent generation, which no automatic collection scans).
Frozen objects are still freed by reference counting; only garbage cycles among them wait.
Those are collected by a full collection (`gc.unfreeze`, collect, freeze again) when the
heap (`sys.getallocatedblocks`, allocated objects) has grown by `growth` times its size
after the last full one: while a relay fills with members (as CPython would, less often),
and when garbage cycles have piled up to the size of the live heap, so the memory held by
such garbage is at most about the live heap's. A connection that ends leaves no cycle (the
session and connection cut theirs, session.py), so member churn no longer piles garbage
up; a full collection that finds almost nothing doubles the growth the next one waits for
(up to MAX_BACKOFF times), since the heap's growth was live data or passing buffers.
Operators see each full collection in /metrics (kasagi_gc_full_collection_seconds) and in
the log (debug) with its duration. (The heap is measured by its allocated blocks, half a
millisecond for a gigabyte, not by `gc.get_freeze_count()`, which walks the frozen list:
0.2 s at 10,000 members.)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Final

__all__ = ["Collector"]

logger = logging.getLogger("kasagi_relay.gc")

# Below this many allocated blocks (~100 MB of small objects) a full collection is cheap
# whatever the growth.
MIN_FULL: Final = 1_000_000
# A full collection that frees fewer objects than 1/NOTHING_FOUND of the blocks it keeps
# found nothing worth its stall; the growth that starts the next one doubles, up to
# MAX_BACKOFF times the configured one (garbage held: at most that many live heaps).
NOTHING_FOUND: Final = 100
MAX_BACKOFF: Final = 4


class Collector:
    """Collect-and-freeze every `period_s`; a full collection when the heap has grown by
    `growth` times its size after the last one. One per process (the collector is)."""

    def __init__(
        self,
        period_s: float = 1.0,
        growth: float = 1.0,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.period_s = period_s
        self.growth = growth
        self.observe = observe  # given each full collection's duration in seconds
        self.full_collections = 0
        self._base = 0
        self.next_growth = growth  # the growth that starts the next full collection (backs off)
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Freeze what start-up made (modules, config) and begin the periodic turns."""
        self.full()
        self._handle = loop.call_later(self.period_s, self._turn, loop)

    def stop(self) -> None:
        """Stop the turns and hand everything back to CPython's own collections."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        gc.unfreeze()

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = loop.call_later(self.period_s, self._turn, loop)
        gc.collect()  # only what is not frozen: what survived since the last turn
        gc.freeze()
        blocks = sys.getallocatedblocks()
        if blocks > MIN_FULL and blocks > self._base * (1 + self.next_growth):
            self.full()

    def full(self) -> None:
        """Collect everything, frozen or not, and freeze the survivors."""
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self._base = sys.getallocatedblocks()
        self.full_collections += 1
        # One that found (almost) no garbage stopped every room for nothing: the heap had
        # grown with live objects (members, history) or with buffers that come and go, not
        # with cycles (an ended connection leaves none). The next waits for twice the
        # growth, up to MAX_BACKOFF times `growth`; one that finds garbage resets it.
        if collected * NOTHING_FOUND < self._base:
            self.next_growth = min(2 * self.next_growth, MAX_BACKOFF * self.growth)
        else:
            self.next_growth = self.growth
        took = time.perf_counter() - started
        if self.observe is not None:
            self.observe(took)
        logger.debug(
            "full garbage collection: %d objects collected, %d blocks kept, %.0f ms",
            collected,
            self._base,
            1000 * took,
        )

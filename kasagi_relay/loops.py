"""The running event loop, for the hot paths; stopping a background task for good.

`asyncio.get_running_loop()` makes a getpid system call on every call on Python 3.11 (it
checks that the loop was not inherited through a fork): ~0.5 us here, and the publish and
fan-out paths asked for the loop several times per socket read (`strace -c`: ~3 getpid
per read at ingest load). `running_loop()` asks once and keeps the loop while it runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait", "running_loop"]

_loop: asyncio.AbstractEventLoop | None = None


def running_loop() -> asyncio.AbstractEventLoop:
    """The loop running in this thread. The relay runs one loop, in one thread; a loop
    that stopped (a test's) is replaced by the next one asked for."""
    global _loop
    loop = _loop
    if loop is None or not loop.is_running():
        loop = _loop = asyncio.get_running_loop()
    return loop


async def cancel_and_wait(task: asyncio.Future[Any], retry_s: float = 0.5) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again every `retry_s` while
    it runs on. A cancellation can be lost below the relay: redis-py sends each command
    through `asyncio.wait_for`, which on Python 3.11 returns the command's result when the
    cancellation comes in the loop turn the send finished (CPython gh-86296, fixed in
    3.12), and the task goes on as if never cancelled (a shutdown waited on one for good).
    A cancellation of the caller is not swallowed (`asyncio.wait`, not `await task`); the
    task's own error, if any, is retrieved and dropped: the caller is stopping it."""
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=retry_s)
    if not task.cancelled():
        task.exception()

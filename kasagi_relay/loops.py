"""The running event loop, for the hot paths.

`asyncio.get_running_loop()` makes a getpid system call on every call on Python 3.11 (it
checks that the loop was not inherited through a fork): ~0.5 us here, and the publish and
fan-out paths asked for the loop several times per socket read (`strace -c`: ~3 getpid
per read at ingest load). `running_loop()` asks once and keeps the loop while it runs.
"""

from __future__ import annotations

import asyncio

__all__ = ["running_loop"]

_loop: asyncio.AbstractEventLoop | None = None


def running_loop() -> asyncio.AbstractEventLoop:
    """The loop running in this thread. The relay runs one loop, in one thread; a loop
    that stopped (a test's) is replaced by the next one asked for."""
    global _loop
    loop = _loop
    if loop is None or not loop.is_running():
        loop = _loop = asyncio.get_running_loop()
    return loop

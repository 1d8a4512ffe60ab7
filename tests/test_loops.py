"""kasagi_relay.loops: the running loop without asking asyncio each time."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from kasagi_relay.loops import running_loop


async def current() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
    return running_loop(), asyncio.get_running_loop()


def test_each_loop_gets_itself_even_after_another_ran() -> None:
    for run in (asyncio.run, uvloop.run, asyncio.run):
        ours, theirs = run(current())
        assert ours is theirs


def test_outside_a_running_loop_it_raises_as_asyncio_does() -> None:
    asyncio.run(current())  # a loop seen, then stopped
    with pytest.raises(RuntimeError):
        running_loop()

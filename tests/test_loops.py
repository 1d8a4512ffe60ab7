"""kasagi_relay.loops: the running loop without asking asyncio each time."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from kasagi_relay.loops import cancel_and_wait, running_loop


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


async def _swallows(times: int, seen: list[str]) -> None:
    """A background loop that loses its first `times` cancellations, as a task does when
    one arrives in the loop turn a redis-py send finished (CPython gh-86296 on 3.11)."""
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if times == 0:
                seen.append("ended")
                raise
            times -= 1
            seen.append("lost")


async def test_cancel_and_wait_cancels_again_until_the_task_ends() -> None:
    seen: list[str] = []
    task = asyncio.create_task(_swallows(2, seen))
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, retry_s=0.05)
    assert task.cancelled()
    assert seen == ["lost", "lost", "ended"]


async def test_cancel_and_wait_leaves_a_cancellation_of_its_caller_alone() -> None:
    """Cut short itself (a shutdown given up on), it raises CancelledError at once rather
    than swallowing it, as `await task` inside suppress(CancelledError) did."""
    seen: list[str] = []
    stuck = asyncio.create_task(_swallows(3, seen))
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(stuck, retry_s=10))
    await asyncio.sleep(0.05)
    assert seen == ["lost"] and not stuck.done()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):  # a swallowed cancellation: TimeoutError here
            await caller
    assert caller.cancelled()
    async with asyncio.timeout(5):
        await cancel_and_wait(stuck, retry_s=0.01)
    assert seen == ["lost", "lost", "lost", "ended"]


async def test_cancel_and_wait_retrieves_the_error_of_a_task_that_failed() -> None:
    async def fails() -> None:
        raise ValueError("already broken")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # no raise: the caller is stopping it anyway
    assert isinstance(task.exception(), ValueError)

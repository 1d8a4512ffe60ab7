"""Waiting for state that other tasks or processes change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(pred: Callable[[], object], within: float = 5.0, what: str = "condition") -> None:
    """Poll `pred` until it is true; TimeoutError after `within` seconds (`what` names it)."""
    try:
        async with asyncio.timeout(within):
            while not pred():  # noqa: ASYNC110 (no event to wait on: the state is elsewhere)
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"{what} not reached within {within} s") from None

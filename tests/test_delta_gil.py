"""The native engine releases the GIL around work that grows with its input.

Measured from the outside: a Python thread counts loop iterations while a worker thread
runs one native call on a large state. With the GIL released the counter keeps going at a
good fraction of its solo speed; with the GIL held it stands still (the control case shows
that the harness sees the difference).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def big_state(entities: int) -> bytes:
    return json.dumps(
        {
            "tick": 0,
            "entities": {
                f"e{i}": {"x": i * 0.5, "y": -i, "hp": 100, "name": f"unit-{i}", "tags": ["a", "b"]}
                for i in range(entities)
            },
        },
        separators=(",", ":"),
    ).encode()


@pytest.fixture(scope="module")
def large() -> bytes:
    return big_state(100_000)  # about 9 MB


def counted_during(call: Callable[[], Any]) -> tuple[int, float]:
    """(iterations this thread made while `call` ran in another thread, seconds it took)."""
    counter = [0]
    done = threading.Event()
    result: dict[str, float] = {}

    def worker() -> None:
        start_count, start = counter[0], time.perf_counter()
        call()
        result["seconds"] = time.perf_counter() - start
        result["count"] = counter[0] - start_count
        done.set()

    # A short switch interval: a thread that holds the GIL in C code blocks the counter
    # completely, rather than in 5 ms slices around its few bytecodes.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        while not done.is_set():
            counter[0] += 1
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    return int(result["count"]), result["seconds"]


def solo_rate() -> float:
    """Iterations per second of the same loop with nothing else running."""
    counter = [0]
    done = threading.Event()
    timer = threading.Timer(0.2, done.set)
    timer.start()
    start = time.perf_counter()
    while not done.is_set():
        counter[0] += 1
    return counter[0] / (time.perf_counter() - start)


def test_harness_sees_a_call_that_holds_the_gil() -> None:
    rate = solo_rate()
    numbers = [random.random() for _ in range(1_000_000)]
    count, seconds = counted_during(lambda: sorted(numbers))  # C code, GIL held throughout
    assert seconds > 0.05
    assert count < 0.05 * rate * seconds, (count, rate, seconds)


def _calls(native: ModuleType, state: bytes) -> dict[str, Callable[[], Any]]:
    deltas = [
        json.dumps({"patch": [{"op": "replace", "path": f"/entities/e{i}/x", "value": i}]}).encode()
        for i in range(2000)
    ]
    other = state.replace(b'"hp":100', b'"hp":99', 500)
    return {
        "compact": lambda: native.compact(state, deltas),
        "diff": lambda: native.diff(state, other),
        "apply": lambda: native.apply(state, deltas[0]),
        "room": lambda: native.RoomState(state).to_msgpack(),
        "json_to_msgpack": lambda: native.json_to_msgpack(state),
    }


@pytest.mark.parametrize("name", ["compact", "diff", "apply", "room", "json_to_msgpack"])
def test_native_calls_let_python_threads_run(native: ModuleType, large: bytes, name: str) -> None:
    call = _calls(native, large)[name]
    call()  # warm up: allocator, page faults
    rate = solo_rate()
    count, seconds = counted_during(call)
    assert seconds > 0.01, "the call is too quick to tell anything"
    # Two cores shared with other work: ask for a quarter of the solo speed.
    assert count > 0.25 * rate * seconds, (count, rate, seconds)


@pytest.mark.parametrize(
    "op",
    [
        {"op": "replace", "path": "/entities", "value": 1},  # drops a large value
        {"op": "remove", "path": "/entities"},
        {"op": "add", "path": "", "value": {}},
    ],
)
def test_room_apply_of_a_small_delta_with_large_work_releases_the_gil(
    native: ModuleType, op: dict[str, Any]
) -> None:
    # RoomState.apply keeps the GIL for a small delta only when its work is bounded by the
    # delta's size; these few bytes drop most of an 18 MB state.
    room = native.RoomState(big_state(200_000))
    delta = json.dumps({"patch": [op]}).encode()
    rate = solo_rate()
    count, seconds = counted_during(lambda: room.apply(delta, 1))
    assert room.seq == 1
    assert seconds > 0.01, "the call is too quick to tell anything"
    assert count > 0.25 * rate * seconds, (count, rate, seconds)

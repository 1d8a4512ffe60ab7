"""Hostile deltas of #11 against a room's state (native engine): what one small delta costs.

Before the work budget and swap_remove removal (same 2-core VM): merge-nulling 2,000 keys
of a 400k-key object 15.4 s; 200 inserts at the head of a 400k-element array 0.75 s; 20
copy/remove pairs of a 4.3 MB subtree 3.1 s; 40 doubling copies aborted the process (2.3 GB
RSS). `json_size` after a small delta to an 8 MB state re-serialised it (6.5 ms).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def compact(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


def run(benchmark: Any, native: ModuleType, state: bytes, delta: bytes, applied: bool) -> None:
    """Time RoomState.apply of `delta` on a fresh room (built outside the timing)."""
    rooms: list[Any] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        rooms.append(native.RoomState(state))
        return (rooms[-1],), {}

    def step(room: Any) -> bool:
        return bool(room.apply(delta, 1))

    result = benchmark.pedantic(step, setup=setup, rounds=3)
    assert result is applied


@pytest.fixture(scope="module")
def native(engine_of: Callable[[str], ModuleType]) -> ModuleType:
    return engine_of("native")


@pytest.mark.benchmark(group="hostile")
def test_merge_null_2000_keys_of_400k(benchmark: Any, native: ModuleType) -> None:
    state = compact({f"k{i}": i for i in range(400_000)})
    delta = compact({"merge": {f"k{i * 17}": None for i in range(2000)}})
    run(benchmark, native, state, delta, applied=True)


@pytest.mark.benchmark(group="hostile")
def test_200_head_inserts_into_400k_array(benchmark: Any, native: ModuleType) -> None:
    state = compact({"a": list(range(400_000))})
    delta = compact({"patch": [{"op": "add", "path": "/a/0", "value": i} for i in range(200)]})
    run(benchmark, native, state, delta, applied=False)  # too much work


@pytest.mark.benchmark(group="hostile")
def test_copy_remove_pairs_of_a_4mb_subtree(benchmark: Any, native: ModuleType) -> None:
    sub = {f"e{i}": {"x": i, "y": "abcdefghij" * 3, "z": [i, i + 1]} for i in range(60_000)}
    ops: list[dict[str, Any]] = []
    for i in range(20):
        ops += [
            {"op": "copy", "from": "/big", "path": f"/c{i}"},
            {"op": "remove", "path": f"/c{i}"},
        ]
    run(benchmark, native, compact({"big": sub}), compact({"patch": ops}), applied=False)


@pytest.mark.benchmark(group="hostile")
def test_doubling_copies(benchmark: Any, native: ModuleType) -> None:
    delta = compact({"patch": [{"op": "copy", "from": "", "path": f"/k{i}"} for i in range(40)]})
    run(benchmark, native, compact({"s": "x" * 1000}), delta, applied=False)


@pytest.mark.benchmark(group="hostile")
def test_apply_and_size_near_8mb(benchmark: Any, native: ModuleType) -> None:
    room = native.RoomState(compact({"s": "x" * 8_000_000, "n": 0}), 0, max_bytes=8_100_000)
    seqs = iter(range(1, 10**9))

    def step() -> int:
        room.apply(b'{"patch":[{"op":"replace","path":"/n","value":1}]}', next(seqs))
        return int(room.json_size())

    assert benchmark(step) == 8_000_014


@pytest.mark.benchmark(group="hostile")
def test_worst_accepted_copy_for_a_1kib_delta(benchmark: Any, native: ModuleType) -> None:
    # The most expensive shape per unit of budget: small arrays, each one allocation.
    delta_len = 1024
    units = native.WORK_BASE + native.WORK_PER_BYTE * delta_len
    state = compact({"v": [[0]] * ((units - 2) // 4 - 10)})
    body: dict[str, Any] = {"patch": [{"op": "copy", "from": "/v", "path": "/w"}], "pad": ""}
    body["pad"] = "p" * (delta_len - len(compact(body)))
    delta = compact(body)
    assert len(delta) == delta_len
    run(benchmark, native, state, delta, applied=True)

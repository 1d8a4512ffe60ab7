"""MessagePack -> JSON of the `kasagi.v1.msgpack` members (native engine, #11 item 3).

Before the streaming transcoder (rust/codec.rs went through a serde_json Value tree; same
2-core VM): a 1 MiB array of empty arrays 34-41 ms (and ~100 MB of transient memory, the
relay's peak RSS 35 -> 135 MiB), refused only afterwards by protocol.py's bracket count;
an 873 KB mixed document 13.5-15.5 ms; 1M small integers 32-33 ms; a map of 524k repeated
empty keys 27 ms; a map of 141k distinct keys 22 ms.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from types import ModuleType
from typing import Any

import msgpack
import pytest

MIB = 1 << 20
CAP = 100_000  # protocol.MAX_CONTAINERS


@pytest.fixture(scope="module")
def native(engine_of: Callable[[str], ModuleType]) -> ModuleType:
    return engine_of("native")


def _empty_arrays(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def _doc(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 4 and r < 0.3:
        return {f"k{i}": _doc(rng, depth + 1) for i in range(rng.randint(0, 8))}
    if depth < 4 and r < 0.5:
        return [_doc(rng, depth + 1) for _ in range(rng.randint(0, 8))]
    return rng.choice([1, -5, 2**40, 1.5, 3.14159e-7, "hello é\n", True, None, "x" * 40])


@pytest.mark.benchmark(group="msgpack_to_json")
def test_a_megabyte_of_empty_arrays_refused_at_the_cap(benchmark: Any, native: ModuleType) -> None:
    data = _empty_arrays(MIB)

    def step() -> str:
        try:
            native.msgpack_to_json(data, CAP)
        except native.DeltaError as exc:
            return str(exc)
        return ""

    assert "arrays and objects" in benchmark(step)


@pytest.mark.benchmark(group="msgpack_to_json")
def test_a_megabyte_of_empty_arrays_uncapped(benchmark: Any, native: ModuleType) -> None:
    data = _empty_arrays(MIB)
    assert len(benchmark(native.msgpack_to_json, data)) == 3 * MIB + 1


@pytest.mark.benchmark(group="msgpack_to_json")
def test_mixed_document(benchmark: Any, native: ModuleType) -> None:
    rng = random.Random(1)
    value = {f"r{i}": _doc(rng) for i in range(3000)}
    out = benchmark(native.msgpack_to_json, msgpack.packb(value), CAP)
    assert json.loads(out) == value


@pytest.mark.benchmark(group="msgpack_to_json")
def test_a_map_of_repeated_keys(benchmark: Any, native: ModuleType) -> None:
    n = MIB // 2
    data = b"\xdf" + n.to_bytes(4, "big") + b"\xa0\xc0" * n
    assert benchmark(native.msgpack_to_json, data, CAP) == b'{"":null}'


@pytest.mark.benchmark(group="msgpack_to_json")
def test_a_map_of_distinct_keys(benchmark: Any, native: ModuleType) -> None:
    data = msgpack.packb({f"{i:x}": None for i in range(140_000)})
    assert len(benchmark(native.msgpack_to_json, data, CAP)) > 140_000 * 8

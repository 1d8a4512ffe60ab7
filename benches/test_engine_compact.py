"""Compaction: a ~1 MB room state (8,000 entities) and 10,000 small deltas -> new snapshot."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jsonpatch
import pytest


def jsonpatch_compact(state: bytes, ds: list[bytes]) -> bytes:
    """The reference: the jsonpatch library on a parsed document, bytes in and out."""
    doc = json.loads(state)
    for d in ds:
        # The failing deltas have one op: a failure changed nothing.
        with contextlib.suppress(jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
            doc = jsonpatch.apply_patch(doc, json.loads(d)["patch"], in_place=True)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.benchmark(group="compact")
@pytest.mark.parametrize("impl", ["native", "pure", "jsonpatch"])
def test_compact(
    benchmark: Any,
    engine_of: Callable[[str], ModuleType],
    impl: str,
    state_1mb: bytes,
    deltas_10k: list[bytes],
) -> None:
    benchmark.extra_info["impl"] = impl
    if impl == "jsonpatch":
        fn = jsonpatch_compact
        rounds = 3
    else:
        fn = engine_of(impl).compact
        rounds = 15 if impl == "native" else 3
    out = benchmark.pedantic(fn, args=(state_1mb, deltas_10k), rounds=rounds, warmup_rounds=1)
    # Every implementation computes the same snapshot (JSON-equal).
    assert json.loads(out) == json.loads(engine_of("pure").compact(state_1mb, deltas_10k))


@pytest.mark.benchmark(group="compact_ceiling")
def test_compact_ceiling(
    benchmark: Any, engine_of: Callable[[str], ModuleType], state_1mb: bytes
) -> None:
    """Native compaction with no deltas: parsing the 1 MB state and writing it back, which
    any compaction on a parsed document (serde_json's DOM here) pays. Pure full compaction /
    this is the highest ratio that design can reach (a ceiling row, not a result)."""
    benchmark.extra_info["impl"] = "native"
    compact = engine_of("native").compact
    out = benchmark.pedantic(compact, args=(state_1mb, []), rounds=15, warmup_rounds=1)
    assert out == state_1mb

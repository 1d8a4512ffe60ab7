"""Merging the deltas that queued while a broadcast was in flight into one delta."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


@pytest.mark.benchmark(group="merge")
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_merge_patches(
    benchmark: Any, engine_of: Callable[[str], ModuleType], impl: str, deltas_1k: list[bytes]
) -> None:
    benchmark.extra_info["impl"] = impl
    merge = engine_of(impl).merge
    out = benchmark.pedantic(merge, args=(deltas_1k,), rounds=30 if impl == "native" else 5)
    assert len(json.loads(out)["patch"]) < sum(len(json.loads(d)["patch"]) for d in deltas_1k)


@pytest.mark.benchmark(group="merge_compose")
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_merge_merge_patches(
    benchmark: Any, engine_of: Callable[[str], ModuleType], impl: str, merge_patches_1k: list[bytes]
) -> None:
    benchmark.extra_info["impl"] = impl
    merge = engine_of(impl).merge
    out = benchmark.pedantic(merge, args=(merge_patches_1k,), rounds=30 if impl == "native" else 5)
    assert "merge" in json.loads(out)

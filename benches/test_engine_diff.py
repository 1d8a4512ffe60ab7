"""diff of two ~1 MB room states (a snapshot and the same room 2,000 deltas later)."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jsonpatch
import pytest


def jsonpatch_diff(a: bytes, b: bytes) -> bytes:
    return jsonpatch.make_patch(json.loads(a), json.loads(b)).to_string().encode()


@pytest.mark.benchmark(group="diff")
@pytest.mark.parametrize("impl", ["native", "pure", "jsonpatch"])
def test_diff(
    benchmark: Any,
    engine_of: Callable[[str], ModuleType],
    impl: str,
    state_1mb: bytes,
    state_1mb_changed: bytes,
) -> None:
    benchmark.extra_info["impl"] = impl
    fn = jsonpatch_diff if impl == "jsonpatch" else engine_of(impl).diff
    out = benchmark.pedantic(
        fn, args=(state_1mb, state_1mb_changed), rounds=10 if impl == "native" else 3
    )
    body = json.loads(out)
    ops = body if isinstance(body, list) else body["patch"]  # jsonpatch gives a bare list
    assert jsonpatch.apply_patch(json.loads(state_1mb), ops) == json.loads(state_1mb_changed)

"""Public conformance cases: RFC 6902 (json-patch-tests spec_tests) and RFC 7396 Appendix A.

The RFC 6902 cases live in the repository (tests/data/, origin and licence in its README),
so a clone alone runs them; a missing or empty file fails, it never collects zero cases."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SPEC_TESTS = Path(__file__).resolve().parent / "data" / "rfc6902-spec-tests.json"


def canon(doc: bytes | str) -> str:
    """Type-exact (1 != 1.0, true != 1), key-order-free form of a JSON document."""
    return json.dumps(json.loads(doc), sort_keys=True)


def _spec_cases() -> list[Any]:
    if not SPEC_TESTS.is_file():
        return []  # test_the_spec_file_is_there fails with the path
    cases = json.loads(SPEC_TESTS.read_text(encoding="utf-8"))
    params = []
    for i, case in enumerate(cases):
        marks = [pytest.mark.skip(reason="disabled in the suite")] if case.get("disabled") else []
        params.append(pytest.param(case, id=f"{i}-{case.get('comment', '')[:40]}", marks=marks))
    return params


def test_the_spec_file_is_there() -> None:
    # A moved file must fail loudly, not collect zero cases.
    assert SPEC_TESTS.is_file(), f"{SPEC_TESTS} is missing (see tests/data/README.md)"
    assert len(json.loads(SPEC_TESTS.read_text(encoding="utf-8"))) >= 17


@pytest.mark.parametrize("case", _spec_cases())
def test_rfc6902_spec(engines: ModuleType, case: dict[str, Any]) -> None:
    doc = json.dumps(case["doc"]).encode()
    delta = json.dumps({"patch": case["patch"]}).encode()
    if "error" in case:
        with pytest.raises(engines.DeltaError):
            engines.apply(doc, delta)
        # A failing patch is a no-op for the room (docs/protocol.md) and check() reports it.
        room = engines.RoomState(doc)
        with pytest.raises(engines.DeltaError):
            room.check(delta)
        assert room.apply(delta, 1) is False
        assert canon(room.to_json()) == canon(doc)
        assert canon(engines.compact(doc, [delta])) == canon(doc)
    else:
        expected = json.dumps(case["expected"], sort_keys=True)
        assert canon(engines.apply(doc, delta)) == expected
        room = engines.RoomState(doc)
        room.check(delta)
        assert room.apply(delta, 1) is True
        assert canon(room.to_json()) == expected
        assert canon(engines.compact(doc, [delta])) == expected


# RFC 7396 Appendix A, all examples: (original, patch, result).
RFC7396_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC7396_EXAMPLES)
def test_rfc7396_appendix_a(engines: ModuleType, original: Any, patch: Any, result: Any) -> None:
    doc = json.dumps(original)
    delta = json.dumps({"merge": patch})
    expected = json.dumps(result, sort_keys=True)
    assert canon(engines.apply(doc, delta)) == expected
    room = engines.RoomState(doc)
    assert room.apply(delta, 7) is True
    assert room.seq == 7
    assert canon(room.to_json()) == expected
    assert canon(engines.compact(doc, [delta])) == expected


def test_rfc7396_key_order_is_kept(engines: ModuleType) -> None:
    # Byte-exact: existing keys keep their place, new ones are appended in patch order.
    out = engines.apply(
        b'{"z":1,"a":{"y":1,"b":2},"m":3}', b'{"merge":{"a":{"b":null,"c":4},"q":5}}'
    )
    assert out == b'{"z":1,"a":{"y":1,"c":4},"m":3,"q":5}'

"""What users of the engine see: apply, merge, diff, compact, codecs and RoomState."""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import msgpack
import pytest


def canon(doc: bytes | str) -> str:
    """Type-exact (1 != 1.0, true != 1), key-order-free form of a JSON document."""
    return json.dumps(json.loads(doc), sort_keys=True)


def P(*ops: dict[str, Any]) -> bytes:
    return json.dumps({"patch": list(ops)}).encode()


def M(body: Any) -> bytes:
    return json.dumps({"merge": body}).encode()


def add(path: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": path, "value": value}


def rep(path: str, value: Any) -> dict[str, Any]:
    return {"op": "replace", "path": path, "value": value}


def rem(path: str) -> dict[str, Any]:
    return {"op": "remove", "path": path}


def sequential(engine: ModuleType, state: bytes, ds: Sequence[bytes]) -> bytes:
    for d in ds:
        state = engine.apply(state, d)
    return state


# --------------------------------------------------------------------------- apply


def test_apply_order_is_deterministic_and_compact(engines: ModuleType) -> None:
    # Removing a member moves the last one into its place (swap_remove, _native.pyi); new
    # members are appended; a replaced value keeps its place.
    state = b'{ "z" : 1, "a" : { "y" : [ 1 , 2 ] }, "m" : "\xc3\xa9" }'
    out = engines.apply(state, P(rem("/z"), add("/a/x", True), rep("/a/y/0", 1.5), add("/b", None)))
    assert out == '{"m":"é","a":{"y":[1.5,2],"x":true},"b":null}'.encode()
    # Removing the last member moves nothing.
    assert engines.apply(state, P(rem("/m"))) == b'{"z":1,"a":{"y":[1,2]}}'


def test_test_op_equality(engines: ModuleType) -> None:
    state = b'{"i":1,"f":2.0,"t":true,"o":{"a":1,"b":[1,{"c":null}]},"big":9007199254740993}'
    passing: list[dict[str, Any]] = [
        {"op": "test", "path": "/i", "value": 1.0},
        {"op": "test", "path": "/f", "value": 2},
        {"op": "test", "path": "/t", "value": True},
        {"op": "test", "path": "/o", "value": {"b": [1.0, {"c": None}], "a": 1}},
        {"op": "test", "path": "/big", "value": 9007199254740993},
    ]
    for t in passing:
        assert engines.apply(state, P(t)) == state
    failing: list[dict[str, Any]] = [
        {"op": "test", "path": "/t", "value": 1},
        {"op": "test", "path": "/i", "value": True},
        {"op": "test", "path": "/i", "value": "1"},
        {"op": "test", "path": "/o", "value": {"a": 1}},
        {"op": "test", "path": "/o/b", "value": [{"c": None}, 1]},
        {"op": "test", "path": "/big", "value": 9007199254740992.0},  # compared exactly
    ]
    for t in failing:
        with pytest.raises(engines.DeltaError, match=r"^op 0 \(test "):
            engines.apply(state, P(t))


def test_move_and_copy(engines: ModuleType) -> None:
    state = b'{"a":[1,2,3],"b":{"c":{"d":1}}}'
    assert engines.apply(state, P({"op": "move", "from": "/a/0", "path": "/a/-"})) == (
        b'{"a":[2,3,1],"b":{"c":{"d":1}}}'
    )
    assert engines.apply(state, P({"op": "move", "from": "/b", "path": "/b"})) == state
    assert engines.apply(state, P({"op": "move", "from": "/b/c", "path": "/b"})) == (
        b'{"a":[1,2,3],"b":{"d":1}}'
    )
    # A copy is a copy: changing it leaves the source alone.
    out = engines.apply(state, P({"op": "copy", "from": "/b", "path": "/e"}, add("/e/c/x", 2)))
    assert out == b'{"a":[1,2,3],"b":{"c":{"d":1}},"e":{"c":{"d":1,"x":2}}}'
    assert engines.apply(state, P({"op": "copy", "from": "", "path": "/a/0"})) == (
        b'{"a":[{"a":[1,2,3],"b":{"c":{"d":1}}},1,2,3],"b":{"c":{"d":1}}}'
    )


def test_root_operations(engines: ModuleType) -> None:
    assert engines.apply(b'{"a":1}', P(rep("", [1]))) == b"[1]"
    assert engines.apply(b'{"a":1}', P(add("", "x"))) == b'"x"'
    assert engines.apply(b"[]", P(add("/-", 1), add("/0", 0))) == b"[0,1]"
    assert engines.apply(b"5", M({"a": 1})) == b'{"a":1}'
    assert engines.apply(b'{"a":1}', M(None)) == b"null"


def test_atomic_failure_restores_order(engines: ModuleType) -> None:
    state = b'{"a":1,"b":{"c":[1,2]},"d":2}'
    d = P(rem("/a"), rem("/b/c/0"), add("/b/c/-", 9), rep("", 7), rem("/nope"))
    room = engines.RoomState(state)
    with pytest.raises(engines.DeltaError, match=r"^op 4 \(remove /nope\)"):
        room.check(d)
    assert room.apply(d, 1) is False
    assert room.to_json() == state
    assert engines.compact(state, [d, P(rem("/a"))]) == b'{"d":2,"b":{"c":[1,2]}}'


# --------------------------------------------------------------------------- merge


def test_merge_of_nothing_and_of_one(engines: ModuleType) -> None:
    assert engines.merge([]) == b'{"patch":[]}'
    # One delta comes back canonical: compact, ops as {"op","from"?,"path","value"?}.
    one = b'{"patch":[{"path":"/a","value":1,"op":"add","x":0}],"seq":3}'
    assert engines.merge([one]) == b'{"patch":[{"op":"add","path":"/a","value":1}]}'
    assert engines.merge([b'{ "merge" : { "a" : null } }']) == b'{"merge":{"a":null}}'


@pytest.mark.parametrize(
    ("ds", "expected_ops"),
    [
        # repeated writes to one path collapse
        ([P(rep("/a", 1)), P(rep("/a", 2)), P(rep("/a", 3))], [rep("/a", 3)]),
        # add then replace of the same member: one add (the member may be new)
        ([P(add("/a", 1)), P(rep("/a", 2))], [add("/a", 2)]),
        # add then remove is kept: /a may have existed before
        ([P(add("/a", 1)), P(rem("/a"))], [add("/a", 1), rem("/a")]),
        # replace then remove: the remove alone
        ([P(rep("/a", 1)), P(rem("/a"))], [rem("/a")]),
        # a write below an overwritten ancestor is dead, test ops are dropped
        (
            [P(rep("/a/b", 1), {"op": "test", "path": "/a", "value": 1}), P(rep("/a", {}))],
            [rep("/a", {})],
        ),
        ([P(add("/a/b", 1), add("/a/c", 2)), P(rem("/a"))], [rem("/a")]),
        # a read in between keeps the earlier write
        (
            [P(rep("/a", 1)), P({"op": "copy", "from": "/a", "path": "/b"}), P(rep("/a", 2))],
            [rep("/a", 1), {"op": "copy", "from": "/a", "path": "/b"}, rep("/a", 2)],
        ),
        # a write below in between keeps it (that write relies on it)
        (
            [P(rep("/a", [])), P(add("/a/0", 1)), P(rep("/a", 5))],
            [rep("/a", []), add("/a/0", 1), rep("/a", 5)],
        ),
        # an array insert may shift the index: kept
        (
            [P(rep("/l/1/x", 1)), P(add("/l/0", 0)), P(rep("/l/1/x", 2))],
            [rep("/l/1/x", 1), add("/l/0", 0), rep("/l/1/x", 2)],
        ),
        # an index add does not overwrite, it inserts
        ([P(rep("/l/1", 1)), P(add("/l/1", 2))], [rep("/l/1", 1), add("/l/1", 2)]),
        # unrelated paths do not interfere
        (
            [P(rep("/a", 1), rep("/b", 1)), P(rep("/a", 2))],
            [rep("/b", 1), rep("/a", 2)],
        ),
        # the root overwrites everything written before
        ([P(add("/a", 1), rep("/b", 2)), P(rep("", {"c": 3}))], [rep("", {"c": 3})]),
    ],
)
def test_merge_collapses_patches(
    engines: ModuleType, ds: list[bytes], expected_ops: list[dict[str, Any]]
) -> None:
    assert json.loads(engines.merge(ds)) == {"patch": expected_ops}


def test_merge_composes_merge_patches(engines: ModuleType) -> None:
    ds = [
        M({"a": {"b": 1, "x": {"y": 1}}, "c": 1, "keep": 0}),
        M({"a": {"d": 2, "x": None}, "c": None, "e": {"g": [1]}}),
        M({"a": {"b": None}, "e": {"f": None}}),
    ]
    out = engines.merge(ds)
    assert json.loads(out) == {
        "merge": {
            "a": {"b": None, "x": None, "d": 2},
            "c": None,
            "keep": 0,
            "e": {"g": [1], "f": None},
        }
    }
    for s in [b"{}", b'{"a":{"b":0,"z":1},"c":3,"e":{"f":1,"g":2}}', b"[]", b"7"]:
        assert canon(engines.apply(s, out)) == canon(sequential(engines, s, ds))


@pytest.mark.parametrize(
    "ds",
    [
        [M({"a": 1}), M({"a": {"b": 1}})],  # non-object, then merged into
        [M({"a": None}), M({"a": {"b": 1}})],  # deleted, then merged into
        [M({"a": {"b": []}}), M({"a": {"b": {"c": 1}}})],
        [M({"a": 1}), P(add("/a", 2))],  # mixed kinds
        [P(add("/a", 2)), M({"a": 1})],
        [P(add("/a", 2)), M({})],
    ],
)
def test_merge_refuses_what_one_delta_cannot_express(engines: ModuleType, ds: list[bytes]) -> None:
    with pytest.raises(engines.DeltaError, match="cannot be merged into one delta"):
        engines.merge(ds)


def test_merge_of_whole_document_merge_patches(engines: ModuleType) -> None:
    # A non-object merge patch sets the whole document: it is `replace ""`.
    assert json.loads(engines.merge([M({"a": 1}), M([1])])) == {"merge": [1]}
    assert json.loads(engines.merge([M(5), M({"a": {"b": 1, "c": None}})])) == {
        "patch": [rep("", {"a": {"b": 1}})]
    }
    assert json.loads(engines.merge([P(add("/x", 1)), M(None)])) == {"patch": [rep("", None)]}
    assert json.loads(engines.merge([M("s"), P(add("", {"q": 1}), add("/r", 2))])) == {
        "patch": [add("", {"q": 1}), add("/r", 2)]
    }


def test_merge_names_the_bad_delta(engines: ModuleType) -> None:
    with pytest.raises(engines.DeltaError, match="delta 1"):
        engines.merge([P(), b"{nope", P()])


# --------------------------------------------------------------------------- diff


def test_diff_small_change_small_delta(engines: ModuleType) -> None:
    a = {"entities": {str(i): {"x": i, "y": [i, i + 1], "name": f"e{i}"} for i in range(500)}}
    b = json.loads(json.dumps(a))
    b["entities"]["7"]["x"] = 7.5
    del b["entities"]["9"]
    b["entities"]["new"] = {"x": 0}
    b["entities"]["3"]["y"].insert(1, "ins")
    d = engines.diff(json.dumps(a), json.dumps(b))
    ops = json.loads(d)["patch"]
    assert sorted(o["op"] for o in ops) == ["add", "add", "remove", "replace"]
    assert len(d) < 250
    assert canon(engines.apply(json.dumps(a), d)) == canon(json.dumps(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"a": 1}, {"a": 1.0}),  # int -> float is a change
        ({"a": True}, {"a": 1}),
        ({"a": 0.0}, {"a": -0.0}),
        ([1, 2, 3], [0, 1, 2, 3]),
        ([1, 2, 3], [1, 3]),
        ([1, 2, 3], []),
        ([], [1, [2]]),
        ({"a": [1]}, {"a": {"0": 1}}),
        ({"a~/b": 1}, {"a~/b": 2, "": 3}),
        (1, "1"),
        ({"a": 1}, {"a": 1}),
    ],
)
def test_diff_round_trips(engines: ModuleType, a: Any, b: Any) -> None:
    d = engines.diff(json.dumps(a), json.dumps(b))
    assert engines.validate(d)[0] == "patch"
    assert canon(engines.apply(json.dumps(a), d)) == canon(json.dumps(b))
    if json.dumps(a) == json.dumps(b):
        assert d == b'{"patch":[]}'


# --------------------------------------------------------------------------- compact, codecs


def test_compact_skips_failures(engines: ModuleType) -> None:
    ds = [P(add("/a", 1)), P(rem("/zz")), b"garbage", M({"b": 2}), P(rep("/a", 3), rem("/q"))]
    assert engines.compact(b"{}", ds) == b'{"a":1,"b":2}'
    assert engines.compact("{}", []) == b"{}"


def test_msgpack_round_trip(engines: ModuleType) -> None:
    doc = (
        '{"a":[1,-2,3.5,true,false,null,"é"],'
        '"b":{"c":18446744073709551615,"d":-9223372036854775808}}'
    )
    packed = engines.json_to_msgpack(doc)
    assert msgpack.unpackb(packed) == json.loads(doc)
    assert engines.msgpack_to_json(packed) == doc.encode()
    assert engines.msgpack_to_json(msgpack.packb({"x": [1.25, "y"]})) == b'{"x":[1.25,"y"]}'


def _empty_arrays(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def test_msgpack_to_json_container_cap(engines: ModuleType) -> None:
    # n inner arrays and the outer one: n + 1 containers.
    assert engines.msgpack_to_json(_empty_arrays(9), 10) == b"[" + b",".join([b"[]"] * 9) + b"]"
    with pytest.raises(engines.DeltaError) as e:
        engines.msgpack_to_json(_empty_arrays(10), 10)
    assert str(e.value) == "MessagePack: a document may hold at most 10 arrays and objects"
    # Maps count, scalars and strings holding brackets do not; 0 means no cap.
    assert engines.msgpack_to_json(msgpack.packb([{}, {"a": []}]), 4) == b'[{},{"a":[]}]'
    with pytest.raises(engines.DeltaError, match="at most 3 arrays and objects"):
        engines.msgpack_to_json(msgpack.packb([{}, {"a": []}]), 3)
    assert engines.msgpack_to_json(msgpack.packb(["[[[", 1, None]), 1) == b'["[[[",1,null]'
    assert len(engines.msgpack_to_json(_empty_arrays(200_000))) == 600_001
    assert len(engines.msgpack_to_json(_empty_arrays(200_000), 0)) == 600_001
    # A million arrays with a cap of 100,000 is refused (the cost of the refusal is measured
    # in benches/hostile, class 3, not here).
    with pytest.raises(engines.DeltaError, match="at most 100000 arrays and objects"):
        engines.msgpack_to_json(_empty_arrays(1_000_000), 100_000)


def test_msgpack_to_json_counted_shares_one_budget(engines: ModuleType) -> None:
    # An exact budget (0: no container at all) and the count, so that the members of one
    # message share MAX_CONTAINERS (protocol.py).
    data = msgpack.packb([{}, {"a": []}])
    assert engines.msgpack_to_json_counted(data, 4) == (b'[{},{"a":[]}]', 4)
    assert engines.msgpack_to_json_counted(data, 10) == (b'[{},{"a":[]}]', 4)
    with pytest.raises(engines.DeltaError, match="at most 3 arrays and objects"):
        engines.msgpack_to_json_counted(data, 3)
    assert engines.msgpack_to_json_counted(msgpack.packb("[{"), 0) == (b'"[{"', 0)
    with pytest.raises(engines.DeltaError, match="at most 0 arrays and objects"):
        engines.msgpack_to_json_counted(b"\x90", 0)
    with pytest.raises(ValueError, match="budget must be a non-negative integer"):
        engines.msgpack_to_json_counted(b"\x90", -1)


@pytest.mark.parametrize("bad_cap", [-1, 2**64, True, 1.5, "3"])
def test_msgpack_to_json_cap_must_be_a_non_negative_int(engines: ModuleType, bad_cap: Any) -> None:
    with pytest.raises(ValueError, match="max_containers must be a non-negative integer"):
        engines.msgpack_to_json(b"\x90", bad_cap)


def test_msgpack_to_json_repeated_keys_keep_first_position_last_value(
    engines: ModuleType,
) -> None:
    # {"a":1,"b":{"x":1,"x":[2]},"a":{"c":3},"d":null,"b":4}: MessagePack may repeat a key
    # (Python's msgpack cannot write one); the result is what a dict makes of it.
    data = b"\x85\xa1a\x01\xa1b\x82\xa1x\x01\xa1x\x91\x02\xa1a\x81\xa1c\x03\xa1d\xc0\xa1b\x04"
    out = engines.msgpack_to_json(data)
    assert out == b'{"a":{"c":3},"b":4,"d":null}'
    assert json.loads(out) == msgpack.unpackb(data)


# --------------------------------------------------------------------------- RoomState


def test_room_state_basics(engines: ModuleType) -> None:
    room = engines.RoomState()
    assert room.seq == 0
    assert room.to_json() == b"{}"
    assert room.apply(M({"a": 1}), 1) is True
    assert room.apply(P(rem("/zz")), 2) is False  # a no-op, the seq advances
    assert room.seq == 2
    assert room.to_json() == b'{"a":1}'
    assert room.apply(P(add("/b", [1, 2])), 5) is True  # gaps are allowed
    assert room.to_json() == b'{"a":1,"b":[1,2]}'
    assert room.json_size() == len(room.to_json())
    assert msgpack.unpackb(room.to_msgpack()) == {"a": 1, "b": [1, 2]}
    assert room.to_msgpack() == engines.json_to_msgpack(room.to_json())
    for seq in (5, 4, 0):
        with pytest.raises(ValueError):
            room.apply(M({"c": 1}), seq)
    assert room.seq == 5
    assert room.to_json() == b'{"a":1,"b":[1,2]}'


def test_room_state_from_a_snapshot(engines: ModuleType) -> None:
    room = engines.RoomState('{"k":[1]}', 41)
    assert room.seq == 41
    room.check(P(add("/k/-", 2)))
    with pytest.raises(engines.DeltaError):
        room.check(P(add("/k/5", 2)))
    assert room.to_json() == b'{"k":[1]}'
    assert room.apply(P(add("/k/-", 2)), 42)
    assert room.to_json() == b'{"k":[1,2]}'


def test_room_state_caches_follow_changes(engines: ModuleType) -> None:
    room = engines.RoomState(b'{"n":0}')
    # Cached: asking again without a change hands out the same encoded snapshot.
    assert room.to_json() is room.to_json()
    assert room.to_msgpack() is room.to_msgpack()
    for i in range(1, 20):
        assert room.to_json() == f'{{"n":{i - 1}}}'.encode()
        assert msgpack.unpackb(room.to_msgpack()) == {"n": i - 1}
        room.apply(P(rep("/n", i)), i)
    assert room.json_size() == len(b'{"n":19}')


def test_apply_batch(engines: ModuleType) -> None:
    state = b'{"a":{"x":1},"l":[1,2]}'
    room = engines.RoomState(state, 10)
    ds = [P(rep("/a/x", 2)), P(rem("/nope")), b"junk", P(add("/l/-", 3)), P(rep("/a/x", 4))]
    out = room.apply_batch(ds, 15)
    assert room.seq == 15
    assert room.to_json() == b'{"a":{"x":4},"l":[1,2,3]}'
    assert json.loads(out) == {"patch": [add("/l/-", 3), rep("/a/x", 4)]}
    assert engines.apply(state, out) == room.to_json()
    assert room.failed() == [12, 13]  # what the relay replays as {"patch": []}


def test_apply_batch_leaves_test_ops_out(engines: ModuleType) -> None:
    """A merged frame carries only effective changes (docs/protocol.md): no `test`."""
    room = engines.RoomState(b'{"a":1}', 0)
    ds = [P({"op": "test", "path": "/a", "value": 1}, rep("/a", 2)), P(add("/b", 1))]
    out = room.apply_batch(ds, 2)
    assert json.loads(out) == {"patch": [rep("/a", 2), add("/b", 1)]}
    assert room.failed() == []
    # A later batch forgets the earlier one's failures.
    room.apply_batch([P({"op": "test", "path": "/a", "value": 1})], 3)
    assert room.failed() == [3]
    room.apply_batch([P(add("/c", 1))], 4)
    assert room.failed() == []


def test_apply_batch_of_merge_patches(engines: ModuleType) -> None:
    room = engines.RoomState(b'{"a":{"x":1},"b":2}')
    out = room.apply_batch([M({"a": {"y": 2}}), M({"b": None})], 2)
    assert json.loads(out) == {"merge": {"a": {"y": 2}, "b": None}}
    assert room.to_json() == b'{"a":{"x":1,"y":2}}'


def test_apply_batch_makes_merge_patches_concrete(engines: ModuleType) -> None:
    state = b'{"a":{"x":1},"b":2,"c":"s"}'
    room = engines.RoomState(state)
    # Not one merge patch (a key deleted, then merged into), nor mixable with a patch:
    ds = [M({"b": None}), M({"b": {"n": 1}, "c": {"m": None}}), P(add("/a/z", 0))]
    with pytest.raises(engines.DeltaError):
        engines.merge(ds)
    out = room.apply_batch(ds, 3)
    assert json.loads(out)["patch"]  # concrete operations on the known state
    assert room.to_json() == b'{"a":{"x":1,"z":0},"c":{},"b":{"n":1}}'
    assert canon(engines.apply(state, out)) == canon(room.to_json())


def test_apply_batch_checks_its_seq(engines: ModuleType) -> None:
    room = engines.RoomState(b"{}", 3)
    with pytest.raises(ValueError):
        room.apply_batch([M({"a": 1})], 5)
    with pytest.raises(ValueError):
        room.apply_batch([M({"a": 1})], 3)
    assert room.seq == 3
    assert room.to_json() == b"{}"
    assert room.apply_batch([], 3) == b'{"patch":[]}'
    assert room.apply_batch([b"junk", P(rem("/x"))], 5) == b'{"patch":[]}'
    assert room.seq == 5

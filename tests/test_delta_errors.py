"""Bad input on both engines: always a DeltaError (a ValueError), never a crash or a hang."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

STATE = b'{"a":{"b":[10,20,30]},"s":"x","n":null}'


def patch(*ops: dict[str, object]) -> bytes:
    return json.dumps({"patch": list(ops)}).encode()


def test_delta_error_is_a_value_error(engines: ModuleType) -> None:
    assert issubclass(engines.DeltaError, ValueError)
    assert engines.MAX_DEPTH == 128
    assert engines.IMPLEMENTATION in ("python", "native")


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"{",
        b'{"a":1,}',
        b"[1 2]",
        b"{} {}",
        b"{'a':1}",
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b'"\\ud800"',
        b'"\\x"',
        b'"tab\there"',
        b"\xef\xbb\xbf{}",
        b"01",
        b"+1",
        b".5",
    ],
)
def test_invalid_json_state(engines: ModuleType, bad: bytes) -> None:
    with pytest.raises(engines.DeltaError):
        engines.apply(bad, b'{"patch":[]}')
    with pytest.raises(engines.DeltaError):
        engines.RoomState(bad)
    with pytest.raises(engines.DeltaError):
        engines.compact(bad, [])
    with pytest.raises(engines.DeltaError):
        engines.json_to_msgpack(bad)


@pytest.mark.parametrize("bad", [b'{"a":"\xff"}', b'{"\xc3\x28":1}', b'"\xed\xa0\x80"', b"\x80"])
def test_non_utf8_bytes(engines: ModuleType, bad: bytes) -> None:
    with pytest.raises(engines.DeltaError):
        engines.apply(bad, b'{"patch":[]}')
    with pytest.raises(engines.DeltaError):
        engines.apply(b"{}", b'{"merge":' + bad + b"}")
    with pytest.raises(engines.DeltaError):
        engines.validate(b'{"merge":' + bad + b"}")


def test_str_and_bytes_are_both_accepted(engines: ModuleType) -> None:
    assert engines.apply('{"é":1}', '{"merge":{"ü":"ß"}}') == '{"é":1,"ü":"ß"}'.encode()
    assert engines.apply(b"{}", '{"merge":{"k":"\\u00e9\\n"}}') == '{"k":"é\\n"}'.encode()


@pytest.mark.parametrize(
    "delta",
    [
        b"[]",
        b"null",
        b"{}",
        b'{"seq":1}',
        b'{"patch":[],"merge":{}}',
        b'{"patch":{}}',
        b'{"patch":"add"}',
        b'{"patch":null}',
        b'{"patch":[1]}',
        b'{"patch":[[]]}',
        b'{"patch":[{}]}',
        b'{"patch":[{"op":"add","value":1}]}',
        b'{"patch":[{"op":"add","path":1,"value":1}]}',
        b'{"patch":[{"op":"add","path":"/x"}]}',
        b'{"patch":[{"op":"replace","path":"/x"}]}',
        b'{"patch":[{"op":"test","path":"/x"}]}',
        b'{"patch":[{"op":"move","path":"/x"}]}',
        b'{"patch":[{"op":"copy","path":"/x","from":5}]}',
        b'{"patch":[{"op":"frob","path":"/x"}]}',
        b'{"patch":[{"op":5,"path":"/x"}]}',
        b'{"patch":[{"op":"ADD","path":"/x","value":1}]}',
    ],
)
def test_malformed_deltas(engines: ModuleType, delta: bytes) -> None:
    with pytest.raises(engines.DeltaError):
        engines.validate(delta)
    with pytest.raises(engines.DeltaError):
        engines.apply(STATE, delta)
    with pytest.raises(engines.DeltaError):
        engines.merge([b'{"patch":[]}', delta])
    room = engines.RoomState(STATE)
    with pytest.raises(engines.DeltaError):
        room.check(delta)
    # Malformed deltas are no-ops where failures are (docs/protocol.md): seq still advances.
    assert room.apply(delta, 1) is False
    assert room.seq == 1
    assert room.to_json() == STATE
    assert engines.compact(STATE, [delta]) == STATE


@pytest.mark.parametrize(
    ("op", "fragment"),
    [
        ({"op": "add", "path": "a/b", "value": 1}, "a/b"),
        ({"op": "add", "path": "/~2", "value": 1}, "/~2"),
        ({"op": "add", "path": "/a~", "value": 1}, "/a~"),
        ({"op": "remove", "path": "a"}, "(remove a)"),
        ({"op": "move", "from": "/~2", "path": "/x"}, "(move /x)"),
        ({"op": "copy", "from": "nope", "path": "/x"}, "(copy /x)"),
    ],
)
def test_bad_pointers_are_malformed(
    engines: ModuleType, op: dict[str, object], fragment: str
) -> None:
    with pytest.raises(engines.DeltaError, match="op 0") as err:
        engines.validate(patch(op))
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "op",
    [
        {"op": "remove", "path": "/a/b/3"},  # out of range
        {"op": "remove", "path": "/a/b/99999999999999999999999"},
        {"op": "add", "path": "/a/b/4", "value": 1},  # add allows len (3), not beyond
        {"op": "replace", "path": "/a/b/3", "value": 1},
        {"op": "remove", "path": "/a/b/01"},  # leading zero
        {"op": "add", "path": "/a/b/01", "value": 1},
        {"op": "replace", "path": "/a/b/00", "value": 1},
        {"op": "test", "path": "/a/b/01", "value": 20},
        {"op": "remove", "path": "/a/b/-1"},
        {"op": "remove", "path": "/a/b/+1"},
        {"op": "remove", "path": "/a/b/1e0"},
        {"op": "remove", "path": "/a/b/ 1"},
        {"op": "remove", "path": "/a/b/"},
        {"op": "remove", "path": "/a/b/-"},  # "-" only for add / move / copy targets
        {"op": "replace", "path": "/a/b/-", "value": 1},
        {"op": "test", "path": "/a/b/-", "value": 1},
        {"op": "move", "from": "/a/b/-", "path": "/x"},
        {"op": "copy", "from": "/a/b/-", "path": "/x"},
        {"op": "add", "path": "/a/b/-/x", "value": 1},
        {"op": "add", "path": "/a/x/y", "value": 1},  # missing parent
        {"op": "add", "path": "/s/x", "value": 1},  # parent is a string
        {"op": "add", "path": "/n/x", "value": 1},  # parent is null
        {"op": "remove", "path": "/zz"},
        {"op": "remove", "path": ""},  # the root cannot be removed
        {"op": "replace", "path": "/zz", "value": 1},
        {"op": "move", "from": "/zz", "path": "/x"},
        {"op": "move", "from": "/a", "path": "/a/c"},  # into its own child
        {"op": "move", "from": "", "path": "/x"},
        {"op": "copy", "from": "/zz", "path": "/x"},
        {"op": "test", "path": "/zz", "value": None},
        {"op": "test", "path": "/s", "value": "y"},
        {"op": "test", "path": "/a/b/0", "value": "10"},
    ],
)
def test_ops_that_cannot_apply(engines: ModuleType, op: dict[str, object]) -> None:
    d = patch({"op": "add", "path": "/new", "value": 1}, op)
    assert engines.validate(d)[0] == "patch"  # well-formed: it fails on this state only
    with pytest.raises(engines.DeltaError, match=r"^op 1 \(") as err:
        engines.apply(STATE, d)
    assert f"op 1 ({op['op']} {op['path']})" in str(err.value)
    room = engines.RoomState(STATE)
    with pytest.raises(engines.DeltaError):
        room.check(d)
    assert room.apply(d, 3) is False
    assert room.to_json() == STATE  # the first op is rolled back too


def test_error_message_names_op_index_and_path(engines: ModuleType) -> None:
    d = patch(
        {"op": "add", "path": "/x", "value": 1},
        {"op": "test", "path": "/x", "value": 1},
        {"op": "remove", "path": "/a/b/7"},
    )
    with pytest.raises(engines.DeltaError) as err:
        engines.apply(STATE, d)
    assert str(err.value).startswith("op 2 (remove /a/b/7): ")
    d = patch({"op": "remove", "path": "/a/missing"})
    with pytest.raises(engines.DeltaError, match=r"^op 0 \(remove /a/missing\): path not found$"):
        engines.apply(STATE, d)


def test_dash_is_a_member_name_on_objects(engines: ModuleType) -> None:
    out = engines.apply(b'{"-":1}', patch({"op": "replace", "path": "/-", "value": 2}))
    assert out == b'{"-":2}'
    assert engines.apply(b"{}", patch({"op": "add", "path": "/01", "value": 1})) == b'{"01":1}'


DEEP = 100_000


@pytest.mark.parametrize(
    "doc",
    [
        "[" * DEEP + "]" * DEEP,
        "[" * DEEP,
        '{"a":' * DEEP + "1" + "}" * DEEP,
        "[{" * (DEEP // 2),
    ],
    ids=["arrays", "unclosed", "objects", "mixed-unclosed"],
)
def test_deep_nesting(engines: ModuleType, doc: str) -> None:
    with pytest.raises(engines.DeltaError):
        engines.apply(doc, b'{"patch":[]}')
    with pytest.raises(engines.DeltaError):
        engines.RoomState(doc)
    for d in ('{"merge":' + doc + "}", '{"patch":[{"op":"add","path":"/x","value":' + doc + "}]}"):
        with pytest.raises(engines.DeltaError):
            engines.apply(b"{}", d)
        with pytest.raises(engines.DeltaError):
            engines.validate(d.encode())
        with pytest.raises(engines.DeltaError):
            engines.merge([d])
        assert engines.compact(b"{}", [d]) == b"{}"


def test_depth_limit_is_exact(engines: ModuleType) -> None:
    n = engines.MAX_DEPTH
    ok = "[" * n + "]" * n
    assert engines.apply(ok, b'{"patch":[]}') == ok.encode()
    too_deep = "[" * (n + 1) + "]" * (n + 1)
    with pytest.raises(engines.DeltaError):
        engines.apply(too_deep, b'{"patch":[]}')
    # Brackets inside strings do not count.
    s = json.dumps(["[" * 1000 + "{" * 1000])
    assert engines.apply(s, b'{"patch":[]}') == s.encode()


def test_a_delta_cannot_make_the_state_too_deep(engines: ModuleType) -> None:
    n = engines.MAX_DEPTH
    value = json.loads("[" * 101 + "]" * 101)
    state = json.dumps({"a": json.loads("[" * 27 + "]" * 27)}).encode()  # depth 28
    ok = patch({"op": "add", "path": "/b", "value": value})  # 1 + 101 levels
    assert engines.apply(state, ok)
    deep = patch({"op": "add", "path": "/a" + "/0" * 26 + "/-", "value": value})  # 28 + 101
    with pytest.raises(engines.DeltaError, match="op 0"):
        engines.apply(state, deep)
    # Wrapping /a in one more array per delta stops exactly at the limit.
    wrap = patch(
        {"op": "add", "path": "/t", "value": []},
        {"op": "move", "from": "/a", "path": "/t/0"},
        {"op": "move", "from": "/t", "path": "/a"},
    )
    room = engines.RoomState(b'{"a":[]}')
    applied = [room.apply(wrap, i) for i in range(1, 200)]
    assert applied == [True] * (n - 2) + [False] * (199 - (n - 2))
    assert room.to_json() == b'{"a":' + b"[" * (n - 1) + b"]" * (n - 1) + b"}"


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E+400", "123456789e999", "1" + "0" * 400])
def test_numbers_beyond_double_range(engines: ModuleType, number: str) -> None:
    with pytest.raises(engines.DeltaError):
        engines.apply("[" + number + "]", b'{"patch":[]}')
    with pytest.raises(engines.DeltaError):
        engines.apply(b"{}", '{"merge":{"x":' + number + "}}")


@pytest.mark.parametrize(
    ("number", "written"),
    [
        ("10000000000000000000000000000000", "1e+31"),  # 10**31: beyond u64, a float
        ("18446744073709551615", "18446744073709551615"),  # u64 max stays an integer
        ("18446744073709551616", "1.8446744073709552e+19"),
        ("-9223372036854775808", "-9223372036854775808"),  # i64 min stays an integer
        ("-9223372036854775809", "-9.223372036854776e+18"),
        ("-0", "-0.0"),  # serde_json: -0 is the float -0.0
        ("1E2", "100.0"),
        ("1e-400", "0.0"),
        ("0.1", "0.1"),
        ("1e16", "1e+16"),
        ("0.00001", "1e-05"),
        ("1" * 5000, None),  # beyond the double range: an error
    ],
)
def test_huge_and_odd_numbers(engines: ModuleType, number: str, written: str | None) -> None:
    if written is None:
        with pytest.raises(engines.DeltaError):
            engines.apply("[" + number + "]", b'{"patch":[]}')
        return
    assert engines.apply("[" + number + "]", b'{"patch":[]}') == f"[{written}]".encode()
    assert engines.apply(b"{}", '{"merge":{"x":' + number + "}}") == f'{{"x":{written}}}'.encode()


def test_wrong_argument_types_are_type_errors(engines: ModuleType) -> None:
    with pytest.raises(TypeError):
        engines.apply(123, b'{"patch":[]}')
    with pytest.raises(TypeError):
        engines.msgpack_to_json("not bytes")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used
        b"\x92\x01",  # array of 2, one given
        b"\x81\x01\x02",  # map with an integer key
        b"\xc4\x01x",  # bin: no JSON form
        b"\xd4\x01\x00",  # ext type
        b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
        b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # +inf
        b"\xa1\xff",  # str with invalid UTF-8
        b"\x01\x02",  # trailing data
        b"\x91" * 200 + b"\x01",  # nested deeper than MAX_DEPTH
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
    ],
)
def test_bad_msgpack(engines: ModuleType, data: bytes) -> None:
    with pytest.raises(engines.DeltaError):
        engines.msgpack_to_json(data)


def test_argument_checks_come_before_any_change(engines: ModuleType) -> None:
    ok = b'{"merge":{"a":1}}'
    with pytest.raises(TypeError):
        engines.merge(ok)  # one delta where a sequence of them is expected
    with pytest.raises(TypeError):
        engines.merge([ok, 5])
    with pytest.raises(TypeError):
        engines.compact(b"{}", [ok, None])
    assert engines.merge((ok, ok)) == b'{"merge":{"a":1}}'  # any sequence
    for bad_seq in (-1, True, 1.0, 2**64, "1"):
        with pytest.raises(ValueError):
            engines.RoomState(b"{}", bad_seq)
    room = engines.RoomState(b"{}", 2**64 - 3)
    with pytest.raises(TypeError):
        room.apply(5, 2**64 - 2)
    with pytest.raises(TypeError):
        room.apply_batch([ok, 5], 2**64 - 1)
    assert room.seq == 2**64 - 3
    assert room.to_json() == b"{}"
    assert room.apply(b"not json", 2**64 - 2) is False
    assert room.to_json() == b"{}"
    assert room.apply(ok, 2**64 - 1) is True
    with pytest.raises(ValueError):
        room.apply(ok, 2**64)
    assert room.seq == 2**64 - 1

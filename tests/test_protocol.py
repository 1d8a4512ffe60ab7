"""The Sans-I/O protocol layer: parsing requests, encoding replies and fan-out frames."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from websockets.frames import Frame, Opcode

from kasagi_relay import delta
from kasagi_relay.fanout import frame
from kasagi_relay.protocol import (
    JSON,
    MSGPACK,
    BadRequest,
    Delta,
    DeltaFrame,
    Join,
    Leave,
    encode_ack,
    encode_error,
    encode_joined,
    encode_left,
    parse,
)


def pj(message: Any) -> Any:
    return parse(json.dumps(message), JSON)


def pm(message: Any) -> Any:
    return parse(msgpack.packb(message), MSGPACK)


def bad(data: str | bytes, codec: Any = JSON) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse(data, codec)
    return info.value


@pytest.mark.parametrize("p", [pj, pm])
def test_requests(p: Any) -> None:
    assert p({"t": "join", "room": "a", "id": 7}) == Join("a", None, 7)
    assert p({"t": "join", "room": "a", "since": 5, "x": [1]}) == Join("a", 5, None)
    assert p({"t": "leave", "room": "a.b-c_d", "id": "x"}) == Leave("a.b-c_d", "x")
    d = p({"t": "delta", "room": "r", "patch": [{"op": "add", "path": "/a", "value": 1}]})
    assert d == Delta("r", "patch", b'[{"op":"add","path":"/a","value":1}]')
    assert d.doc == b'{"patch":[{"op":"add","path":"/a","value":1}]}'
    d = p({"t": "delta", "room": "r", "merge": {"a": None}, "key": "k" * 64, "id": 1})
    assert d == Delta("r", "merge", b'{"a":null}', "k" * 64, 1)


def test_binary_json_on_json_and_text_on_msgpack() -> None:
    assert parse(b'{"t":"leave","room":"a"}', JSON) == Leave("a")
    assert parse('{"t":"leave","room":"a"}', MSGPACK) == Leave("a")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("not json", "bad_message"),
        (b"\xff\xfe\x00garbage", "bad_message"),
        ("[1,2]", "bad_message"),
        ('"t"', "bad_message"),
        ("{}", "bad_message"),
        ('{"t":"nope","room":"a"}', "bad_message"),
        ('{"t":null}', "bad_message"),
        ('{"t":"join"}', "bad_message"),
        ('{"t":"join","room":"a","since":"3"}', "bad_message"),
        ('{"t":"join","room":"a","since":-1}', "bad_message"),
        ('{"t":"join","room":"a","since":1.5}', "bad_message"),
        ('{"t":"join","room":"a","since":true}', "bad_message"),
        ('{"t":"join","room":"a","id":[1]}', "bad_message"),
        ('{"t":"join","room":""}', "bad_room"),
        ('{"t":"join","room":"a{b}"}', "bad_room"),
        ('{"t":"join","room":"a:b"}', "bad_room"),
        ('{"t":"join","room":"a b"}', "bad_room"),
        ('{"t":"join","room":"a\\nb"}', "bad_room"),
        ('{"t":"join","room":"_a"}', "bad_room"),
        ('{"t":"join","room":7}', "bad_room"),
        ('{"t":"join","room":"' + "a" * 129 + '"}', "bad_room"),
        ('{"t":"delta","room":"a"}', "bad_message"),
        ('{"t":"delta","room":"a","merge":{},"key":""}', "bad_message"),
        ('{"t":"delta","room":"a","merge":{},"key":"' + "k" * 65 + '"}', "bad_message"),
        ('{"t":"delta","room":"a","patch":{}}', "bad_patch"),
        ('{"t":"delta","room":"a","patch":[{"op":"jump","path":"/a"}]}', "bad_patch"),
        ('{"t":"delta","room":"a","patch":[{"op":"add","path":"a","value":1}]}', "bad_patch"),
        ('{"t":"delta","room":"a","patch":[],"merge":{}}', "bad_patch"),
        ("[" * 100_000 + "]" * 100_000, "bad_message"),
    ],
)
def test_bad_requests(data: str | bytes, code: str) -> None:
    assert bad(data).code == code


def test_deep_delta_is_bad_patch() -> None:
    deep = "[" * 500 + "]" * 500
    err = bad('{"t":"delta","room":"a","merge":{"x":' + deep + "}}")
    assert err.code == "bad_patch"


def test_bad_requests_carry_id_and_room() -> None:
    err = bad('{"t":"join","room":"a","since":"x","id":9}')
    assert (err.code, err.id, err.room) == ("bad_message", 9, "a")
    err = bad('{"t":"join","room":"a:b","id":"q"}')
    assert (err.code, err.id, err.room) == ("bad_room", "q", None)


def test_msgpack_bad_input() -> None:
    assert bad(b"\xc1", MSGPACK).code == "bad_message"
    assert bad(msgpack.packb([1, 2]), MSGPACK).code == "bad_message"
    err = bad(msgpack.packb({"t": "delta", "room": "a", "merge": {"x": b"\x00"}}), MSGPACK)
    assert err.code == "bad_patch"
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    err = bad(msgpack.packb({"t": "delta", "room": "a", "merge": {"x": deep}}), MSGPACK)
    assert err.code == "bad_patch"


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
def test_replies(codec: Any) -> None:
    load = json.loads if codec == JSON else msgpack.unpackb
    assert load(encode_ack(codec, "r", 3, 1)) == {"t": "ack", "id": 1, "room": "r", "seq": 3}
    assert load(encode_left(codec, "r", None)) == {"t": "left", "room": "r"}
    assert load(encode_error(codec, "bad_room", "no", "i")) == {
        "t": "error",
        "id": "i",
        "code": "bad_room",
        "message": "no",
    }
    state = delta.RoomState(b'{"a":[1,{"b":"\xc3\xa9"}]}', 4)
    assert load(encode_joined(codec, "r", 4, 2, state)) == {
        "t": "joined",
        "id": 2,
        "room": "r",
        "seq": 4,
        "state": {"a": [1, {"b": "é"}]},
    }
    assert load(encode_joined(codec, "r", 2, None, None)) == {
        "t": "joined",
        "room": "r",
        "seq": 2,
        "resumed": True,
    }


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
def test_delta_frames(codec: Any) -> None:
    load = json.loads if codec == JSON else msgpack.unpackb
    f = DeltaFrame("room-1", 4, 9, b'{"merge":{"a":{"b":null},"c":[1.5,"x"]}}')
    assert load(f.payload(codec)) == {
        "t": "delta",
        "room": "room-1",
        "from": 4,
        "seq": 9,
        "merge": {"a": {"b": None}, "c": [1.5, "x"]},
    }
    assert f.payload(codec) is f.payload(codec)  # encoded once
    state = delta.RoomState(b'{"k":1}', 12)
    assert load(DeltaFrame.reset("r", state).payload(codec)) == {
        "t": "reset",
        "room": "r",
        "seq": 12,
        "state": {"k": 1},
    }


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_frame_is_what_websockets_would_write(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for opcode, ws_opcode in ((0x1, Opcode.TEXT), (0x2, Opcode.BINARY)):
        expected = Frame(ws_opcode, payload).serialize(mask=False, extensions=[])
        assert frame(opcode, payload) == expected

"""The Sans-I/O protocol layer: parsing requests, encoding replies and fan-out frames."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from kasagi_relay import delta, domain, protocol
from kasagi_relay.fanout import frame
from kasagi_relay.protocol import (
    INLINE_JSON_CHARS,
    JSON,
    MAX_CONTAINERS,
    MAX_MEMBERS,
    MSGPACK,
    PEEK_MAX_BYTES,
    BadRequest,
    Codec,
    Delta,
    DeltaFrame,
    Join,
    Leave,
    encode_ack,
    encode_error,
    encode_joined,
    encode_left,
    parse,
    parse_delta_body,
    peek_id,
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


def test_delta_body_of_the_http_api() -> None:
    """An HTTP API body is a `delta` message without t/room/id, checked the same way (big
    bodies on the engine's path too)."""
    d = parse_delta_body(b'{"merge":{"a":1},"key":"k1","t":"x","id":[1]}', "r")
    assert (d.room, d.kind, d.body, d.key, d.id) == ("r", "merge", b'{"a":1}', "k1", None)
    big = json.dumps({"patch": [{"op": "add", "path": "/s", "value": "x" * INLINE_JSON_CHARS}]})
    assert parse_delta_body(big.encode(), "r").kind == "patch"
    for body, code in [
        (b"", "bad_message"),
        (b"[]", "bad_message"),
        (b"\xff", "bad_message"),
        (b'{"key":"k"}', "bad_message"),
        (b'{"merge":{},"key":""}', "bad_message"),
        (b'{"patch":[],"merge":{}}', "bad_patch"),
        (b'{"patch":[{"op":"nope"}]}', "bad_patch"),
        (('{"merge":{},"pad":"' + "x" * INLINE_JSON_CHARS + '",}').encode(), "bad_message"),
    ]:
        with pytest.raises(BadRequest) as info:
            parse_delta_body(body, "r")
        assert info.value.code == code, body[:40]
    with pytest.raises(BadRequest) as info:
        parse_delta_body(b'{"merge":{}}', "a:b")
    assert info.value.code == "bad_room"


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


# --------------------------------------------------------------------------- hostile input
# Issue #11 items 3 (decoding), 11 and 12; the limits are in docs/protocol.md ("Limits").


def packm(message: Any) -> bytes:
    return bytes(msgpack.packb(message, use_bin_type=True))


@pytest.mark.parametrize(
    "message",
    [
        {"t": "delta", "room": "a", "merge": {1: "a", "1": "b"}},  # was coerced to {"1": "b"}
        {"t": "delta", "room": "a", "merge": {"x": [{"y": {2: None}}]}},
        {"t": "delta", "room": "a", "patch": [{"op": "add", "path": "/a", "value": {3: 1}}]},
        {"t": "delta", "room": "a", "merge": {}, 5: "x"},
        {"t": "delta", "room": "a", "merge": {}, "extra": {(1, 2): 1}},
        {"t": "join", "room": "a", 1.5: 1},
    ],
)
def test_msgpack_non_string_keys_are_bad_message(message: Any) -> None:
    assert bad(packm(message), MSGPACK).code == "bad_message"


def test_msgpack_invalid_utf8_and_trailing_bytes() -> None:
    assert bad(b"\x81\xa1t\xa2\xff\xfe", MSGPACK).code == "bad_message"
    ok = packm({"t": "leave", "room": "a"})
    assert parse(ok, MSGPACK) == Leave("a")
    assert bad(ok + b"\xc0", MSGPACK).code == "bad_message"
    assert bad(ok[:-1], MSGPACK).code == "bad_message"
    bad_str = packm({"t": "delta", "room": "a", "merge": {"x": "é"}}).replace(
        b"\xc3\xa9", b"\xc3\x28"
    )
    assert bad(bad_str, MSGPACK).code == "bad_message"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"])
def test_binary_json_must_be_utf8(encoding: str) -> None:
    text = '{"t":"join","room":"a","id":"\u00e9\u00e8"}'
    assert parse(text.encode(), JSON) == Join("a", None, "\u00e9\u00e8")
    assert bad(text.encode(encoding), JSON).code == "bad_message"


@pytest.mark.parametrize("pad", [0, INLINE_JSON_CHARS])
def test_big_json_is_read_by_the_engine_with_the_same_rules(pad: int) -> None:
    # The same requests and refusals whether CPython's json or the engine reads the message.
    def with_pad(text: str) -> str:
        return text[:-1] + ',"pad":"' + "p" * pad + '"}'

    d = parse(with_pad('{"t":"delta","room":"r","merge":{"a":[1,{"b":null}]},"id":"q"}'), JSON)
    assert d == Delta("r", "merge", b'{"a":[1,{"b":null}]}', None, "q")
    j = parse(with_pad('{"t":"join","room":"r","since":' + str(2**64 - 1) + ',"id":-5}'), JSON)
    assert j == Join("r", 2**64 - 1, -5)
    for text, code in [
        ('{"t":"join","room":"r","since":' + str(2**64) + "}", "bad_message"),
        ('{"t":"join","room":"r","id":' + str(2**70) + "}", "bad_message"),
        ('{"t":"join","room":"r","id":[1]}', "bad_message"),
        ('{"t":"join","room":"a:b"}', "bad_room"),
        ('{"t":"delta","room":"r","patch":{}}', "bad_patch"),
        ('{"t":"delta","room":"r","patch":[],"merge":{}}', "bad_patch"),
        ('{"t":"leave","room":"r","x":NaN}', "bad_message"),
        ('{"t":"leave","room":"r"} trailing', "bad_message"),
    ]:
        assert bad(with_pad(text)).code == code, text
    assert bad("[" + "1," * pad + "1]").message == "message must be an object"


def test_json_constants_are_bad_message() -> None:
    for constant in ("NaN", "Infinity", "-Infinity"):
        assert bad('{"t":"leave","room":"a","x":' + constant + "}").code == "bad_message"


@pytest.mark.parametrize(
    ("rid", "codecs"),
    [
        (2**64, [JSON, MSGPACK]),
        (-(2**63) - 1, [JSON, MSGPACK]),
        (2**70, [JSON, MSGPACK]),
        ("x" * 257, [JSON, MSGPACK]),
        # JSON replies echo a lone surrogate escaped; MessagePack cannot carry it.
        ("\ud800", [MSGPACK]),
        ("a\udfffb", [MSGPACK]),
    ],
)
def test_unechoable_ids_are_bad_message(rid: Any, codecs: list[Any]) -> None:
    # Sent as JSON text (MessagePack cannot even carry them), so that they reach parse on
    # either connection: refused at parse time, before any side effect.
    message = {"t": "delta", "room": "a", "merge": {"x": 1}, "id": rid}
    for codec in codecs:
        err = bad(json.dumps(message), codec)
        assert err.code == "bad_message" and err.id is None
        encode_error(codec, err.code, err.message, err.id, err.room)  # the refusal is encodable
    if codecs == [MSGPACK]:
        req = parse(json.dumps({"t": "join", "room": "a", "id": rid}), JSON)
        assert req.id == rid
        assert json.loads(encode_ack(JSON, "a", 1, req.id))["id"] == rid


@pytest.mark.parametrize("rid", [2**64 - 1, -(2**63), "x" * 256, "\u00e9\U0001f600"])
@pytest.mark.parametrize("p", [pj, pm])
def test_ids_at_the_limits_are_echoed(rid: Any, p: Any) -> None:
    req = p({"t": "delta", "room": "a", "merge": {"x": 1}, "id": rid})
    assert req.id == rid
    assert json.loads(encode_ack(JSON, "a", 1, req.id))["id"] == rid
    assert msgpack.unpackb(encode_ack(MSGPACK, "a", 1, req.id))["id"] == rid


def test_unstorable_key_and_huge_since() -> None:
    assert bad('{"t":"delta","room":"a","merge":{},"key":"\\ud800"}').code == "bad_message"
    assert bad('{"t":"join","room":"a","since":' + str(2**64) + "}").code == "bad_message"
    assert pj({"t": "join", "room": "a", "since": 2**64 - 1}) == Join("a", 2**64 - 1)


def test_error_message_with_a_lone_surrogate_is_encodable() -> None:
    reply = msgpack.unpackb(encode_error(MSGPACK, "bad_patch", "x\ud800y"))
    assert reply["message"] == "x\\ud800y"
    assert json.loads(encode_error(JSON, "bad_patch", "x\ud800y"))["message"] == "x\\ud800y"


def test_key_conflict_is_an_error_code() -> None:
    reply = json.loads(encode_error(JSON, "key_conflict", "key k holds another delta", 1, "r"))
    assert reply["code"] == "key_conflict"


MIB = 1 << 20


def _msgpack_delta_around(value: bytes) -> bytes:
    return (
        b"\x83" + packm("t") + packm("delta") + packm("room") + packm("a") + packm("merge") + value
    )


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
def test_too_many_containers_is_bad_message(codec: Any) -> None:
    n = MAX_CONTAINERS + 1
    if codec == JSON:
        data: str | bytes = '{"t":"delta","room":"a","merge":{"x":[' + ",".join(["[]"] * n) + "]}}"
    else:
        data = _msgpack_delta_around(b"\x81\xa1x\xdd" + n.to_bytes(4, "big") + b"\x90" * n)
    assert "at most" in bad(data, codec).message
    # Brackets inside strings are not containers.
    text = '{"t":"delta","room":"a","merge":{"x":"' + "[" * n + '"}}'
    assert parse(text, codec) == Delta("a", "merge", ('{"x":"' + "[" * n + '"}').encode())


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
def test_the_container_cap_is_per_message_not_per_member(codec: Any) -> None:
    # The message, its merge object and the array `x`, plus k empty arrays: exactly
    # MAX_CONTAINERS passes, one more is bad_message, on both subprotocols alike.
    def message(k: int, extra: int = 0) -> str | bytes:
        if codec == JSON:
            text = f',"pad":[{",".join(["[]"] * extra)}]' if extra else ""
            return (
                '{"t":"delta","room":"a"' + text + ',"merge":{"x":[' + ",".join(["[]"] * k) + "]}}"
            )
        arrays = b"\xdd" + k.to_bytes(4, "big") + b"\x90" * k
        head = b"\x84" if extra else b"\x83"
        pad = packm("pad") + b"\xdd" + extra.to_bytes(4, "big") + b"\x90" * extra if extra else b""
        return (
            head
            + packm("t")
            + packm("delta")
            + packm("room")
            + packm("a")
            + pad
            + packm("merge")
            + b"\x81\xa1x"
            + arrays
        )

    n = MAX_CONTAINERS - 3
    assert isinstance(parse(message(n), codec), Delta)
    assert "at most" in bad(message(n + 1), codec).message
    # Split between two members, each well under the cap: refused all the same.
    half = n // 2
    assert isinstance(parse(message(half, n - half - 1), codec), Delta)
    assert "at most" in bad(message(half, n - half), codec).message


def test_a_megabyte_of_empty_arrays_is_refused_without_decoding_it() -> None:
    # 1 MiB of MessagePack empty arrays: refused (too many containers), and a bare array is
    # refused from its first byte; peek_id does not read a message this big at all.
    n = MIB - 64
    data = _msgpack_delta_around(b"\x81\xa1x\xdd" + n.to_bytes(4, "big") + b"\x90" * n)
    assert bad(data, MSGPACK).code == "bad_message"
    assert bad(b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n, MSGPACK).message == (
        "message must be an object"
    )
    assert peek_id(data, MSGPACK) is None


@pytest.mark.parametrize("member", ["merge", "extra"])
def test_a_megabyte_frame_of_empty_arrays_is_bad_message(member: str) -> None:
    # A frame just under 1 MiB of empty arrays, in the delta or in a member nobody reads: the
    # engine stops at the cap (docs/protocol.md, "Limits"), and the reply echoes the id.
    n = MIB - 64
    arrays = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    head = b"\x85" + packm("id") + packm(7) + packm("t") + packm("delta") + packm("room")
    head += packm("a")
    if member == "merge":
        data = head + packm("merge") + b"\x81\xa1x" + arrays + packm("x") + packm(1)
    else:
        data = head + packm("merge") + packm({}) + packm("extra") + arrays
    assert len(data) < MIB
    err = bad(data, MSGPACK)
    assert err.code == "bad_message"
    assert err.message == f"a message may hold at most {MAX_CONTAINERS} arrays and objects"
    assert err.id == 7
    # The same number of arrays, one less, is accepted.
    ok = MAX_CONTAINERS - 3  # the message, the merge object and the outer array count too
    fine = b"\xdd" + ok.to_bytes(4, "big") + b"\x90" * ok
    assert parse(_msgpack_delta_around(b"\x81\xa1x" + fine), MSGPACK) == Delta(
        "a", "merge", b'{"x":[' + b",".join([b"[]"] * ok) + b"]}"
    )


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
def test_too_many_members_is_bad_message(codec: Any) -> None:
    message: dict[str, Any] = {"t": "leave", "room": "a"}
    message.update({f"x{i}": i for i in range(MAX_MEMBERS - 2)})
    assert (pj if codec == JSON else pm)(message) == Leave("a")
    message["one-more"] = 0
    data = json.dumps(message) if codec == JSON else packm(message)
    assert "members" in bad(data, codec).message
    # A megabyte of one-byte members is refused from the map's header.
    n = 300_000
    pairs = b"".join(packm(f"{i:x}") + b"\x00" for i in range(n))
    huge = b"\xdf" + n.to_bytes(4, "big") + pairs
    assert "members" in bad(huge, MSGPACK).message


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
def test_peek_id(codec: Any) -> None:
    small = {"t": "delta", "room": "a", "merge": {"x": [1, 2]}, "id": 7}
    data = json.dumps(small) if codec == JSON else packm(small)
    assert peek_id(data, codec) == 7
    assert peek_id(json.dumps({"id": "q"}), codec) == "q"
    assert peek_id(json.dumps({"id": 2**70}), codec) is None
    assert peek_id(b"\xc1", codec) is None
    big = dict(small, merge={"x": "y" * PEEK_MAX_BYTES})
    data = json.dumps(big) if codec == JSON else packm(big)
    assert peek_id(data, codec) is None  # past PEEK_MAX_BYTES: not read


# ----- properties (hypothesis)

_any_text = st.text(st.characters(exclude_categories=()), max_size=300)
_ids = st.one_of(
    st.none(),
    st.integers(min_value=-(2**80), max_value=2**80),
    _any_text,
    st.floats(),
    st.booleans(),
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_any_text, inner, max_size=4),
    max_leaves=12,
)
_messages = st.fixed_dictionaries(
    {
        "t": st.sampled_from(["join", "leave", "delta"]),
        "room": st.one_of(st.sampled_from(["a", "r-1.x_y"]), _any_text),
    },
    optional={
        "id": _ids,
        "since": st.one_of(st.integers(-5, 2**70), _json_values),
        "key": _any_text,
        "merge": _json_values,
        "patch": st.lists(
            st.fixed_dictionaries(
                {"op": st.sampled_from(["add", "replace", "remove", "test"]), "path": _any_text},
                optional={"value": _json_values, "from": _any_text},
            ),
            max_size=3,
        ),
        "extra": _json_values,
    },
)


def _wire(message: Any, codec: Any, as_text: bool) -> str | bytes:
    if as_text or codec == JSON:
        text = json.dumps(message)
        return text if as_text else text.encode()
    try:
        return packm(message)
    except (UnicodeEncodeError, OverflowError, TypeError):
        # Lone surrogates and huge integers have no MessagePack form: send what a client
        # would (invalid UTF-8), or fall back to text.
        try:
            return bytes(msgpack.packb(message, use_bin_type=True, unicode_errors="surrogatepass"))
        except (OverflowError, TypeError):
            return json.dumps(message)


def _all_replies(codec: Any, req: Any) -> None:
    state = delta.RoomState(b'{"a":1}', 3)
    payloads = [
        encode_ack(codec, req.room, 2**63, req.id),
        encode_left(codec, req.room, req.id),
        encode_error(codec, "key_conflict", "conflict", req.id, req.room),
        encode_joined(codec, req.room, 3, req.id, state),
        encode_joined(codec, req.room, 3, req.id, None),
    ]
    load = json.loads if codec == JSON else msgpack.unpackb
    for payload in payloads:
        assert load(payload).get("id") == req.id


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=_messages,
    codec=st.sampled_from([JSON, MSGPACK]),
    as_text=st.booleans(),
    big=st.booleans(),
)
def test_property_accepted_requests_can_be_answered(
    message: Any, codec: Any, as_text: bool, big: bool
) -> None:
    if big:  # past INLINE_JSON_CHARS: JSON is read by the engine, not by CPython's json
        message = {**message, "pad": "p" * INLINE_JSON_CHARS}
    try:
        req = parse(_wire(message, codec, as_text), codec)
    except BadRequest as exc:
        encode_error(codec, exc.code, exc.message, exc.id, exc.room)
        return
    # Every reply on the connection's codec; on MessagePack also on JSON (a superset).
    _all_replies(codec, req)
    if codec == MSGPACK:
        _all_replies(JSON, req)
    if isinstance(req, Delta):
        delta.validate(req.doc)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), _any_text), codec=st.sampled_from([JSON, MSGPACK]))
def test_property_arbitrary_input_raises_only_bad_request(data: str | bytes, codec: Any) -> None:
    for attempt in (
        data,
        b"\x83\xa1t\xa5delta\xa4room\xa1a" + data if isinstance(data, bytes) else data,
    ):
        try:
            req = parse(attempt, codec)
        except BadRequest as exc:
            encode_error(codec, exc.code, exc.message, exc.id, exc.room)
        else:
            _all_replies(codec, req)
        peek_id(attempt, codec)


def test_auth_requests_and_replies() -> None:
    from kasagi_relay.protocol import Auth, encode_authed

    token = "eyJ.a.b"
    assert parse(json.dumps({"t": "auth", "token": token, "id": 3}), JSON) == Auth(token, 3)
    packed = msgpack.packb({"t": "auth", "token": token}, use_bin_type=True)
    assert parse(packed, MSGPACK) == Auth(token)
    assert token not in repr(Auth(token))  # never in a log line
    big = "x" * (INLINE_JSON_CHARS + 10)  # read by the engine's path, as a scalar
    assert parse(json.dumps({"t": "auth", "token": big}), JSON) == Auth(big)
    for bad in ({"t": "auth"}, {"t": "auth", "token": 5}, {"t": "auth", "token": ""}):
        with pytest.raises(BadRequest) as info:
            parse(json.dumps({**bad, "id": 1}), JSON)
        assert info.value.code == "bad_message" and info.value.id == 1
    assert json.loads(encode_authed(JSON, "alice", 1800000000.0, 4)) == {
        "t": "authed",
        "id": 4,
        "sub": "alice",
        "exp": 1800000000,
    }
    assert msgpack.unpackb(encode_authed(MSGPACK, "bob", 1.5, None)) == {
        "t": "authed",
        "sub": "bob",
        "exp": 1.5,
    }
    left = json.loads(encode_left(JSON, "r", None, "forbidden"))
    assert left == {"t": "left", "room": "r", "code": "forbidden"}


# ----------------------------------------------------------------- one parse of a delta

_ONE_PARSE = [
    '{"t":"delta","id":7,"room":"r","merge":{"x":1.50}}',
    '{"t":"delta","id":"x","room":"r","key":"k1","patch":[{"op":"add","path":"/a","value":1}]}',
    '{"t":"delta","room":"r","patch":[{"op":"frob","path":"/a"}]}',
    '{"t":"delta","room":"r","patch":[],"merge":{}}',
    '{"t":"delta","room":"r"}',
    '{"t":"delta","room":"bad room!","merge":{}}',
    '{"t":"delta","merge":{}}',
    '{"room":"r","merge":{}}',
    '{"t":"nope","room":"r","merge":{}}',
    '{"t":"delta","room":"r","key":"","merge":{}}',
    '{"t":"delta","room":"r","key":7,"merge":{}}',
    '{"t":"delta","room":"r","key":"' + "k" * 65 + '","merge":{}}',
    '{"t":"delta","id":1.5,"room":"r","merge":{}}',
    '{"t":"delta","id":true,"room":"r","merge":{}}',
    '{"t":"delta","id":-9223372036854775808,"room":"r","merge":{}}',
    '{"t":"delta","id":18446744073709551615,"room":"r","merge":{}}',
    '{"t":"delta","id":18446744073709551616,"room":"r","merge":{}}',
    '{"t":"delta","id":"' + "i" * 200 + '","room":"r","merge":{}}',
    '{"t":"delta","id":1,"room":"r","room":"s","merge":{"a":1},"merge":{"b":2}}',
    '{"t":"join","room":"r","since":3,"merge":{}}',
    '{"t":"leave","room":"r","patch":[]}',
    '{"t":"auth","token":"tok","merge":{}}',
    '{"t":"delta","room":"r","merge":{"a":1e400}}',
    '{"t":"delta","room":"r","merge":' + "[" * 130 + "]" * 130 + "}",
    '{"t":"delta","room":"r","merge":{}' + "".join(f',"m{i}":1' for i in range(62)) + "}",
    '{"t":"delta","room":"r","merge":{}' + "".join(f',"m{i}":1' for i in range(63)) + "}",
    '{"t":"delta","room":"r","merge":' + "[{}]" * 0 + "[" + ",".join(["[]"] * 5000) + "]}",
    ' {"t":"delta","room":"r","merge":null} ',
]


def _long_way(text: str) -> object:
    """The reading of a message without the engine's one-parse path."""
    try:
        return protocol._parse_object(protocol._json_top(text), lambda kind: text, JSON)
    except BadRequest as exc:
        return ("error", exc.code, exc.message, exc.id, exc.room)


def _parsed(data: str | bytes, codec: Codec = JSON) -> object:
    try:
        return parse(data, codec)
    except BadRequest as exc:
        return ("error", exc.code, exc.message, exc.id, exc.room)


@pytest.mark.parametrize("text", _ONE_PARSE)
def test_a_delta_read_in_one_parse_is_what_the_long_way_reads(text: str) -> None:
    want = _long_way(text)
    assert _parsed(text) == want
    assert _parsed(text.encode()) == want  # a binary frame of JSON
    assert _parsed(text, MSGPACK) == want  # text frames are JSON on either subprotocol


@given(
    st.dictionaries(
        st.sampled_from(["t", "id", "room", "key", "merge", "patch", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(2**65), max_value=2**65),
            st.floats(allow_nan=False),
            st.text(max_size=5),
            st.sampled_from(["delta", "r", "join"]),
            st.lists(st.integers(), max_size=2),
            st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
        ),
    )
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_message_reads_the_same_either_way(fields: dict[str, Any]) -> None:
    text = json.dumps(fields)
    assert _parsed(text) == _long_way(text)


def test_the_ack_is_what_json_dumps_writes() -> None:
    for rid in (None, 0, -5, 2**64 - 1, -(2**63), "x", 'é\ud800"\\\n', ""):
        for room in ("r", "a-b_c.d", "ü€"):
            fields: dict[str, object] = {"t": "ack"}
            if rid is not None:
                fields["id"] = rid
            fields["room"] = room
            fields["seq"] = 2**63
            want = json.dumps(fields, separators=(",", ":")).encode()
            assert encode_ack(JSON, room, 2**63, rid) == want


def test_room_names_are_judged_the_same_from_the_cache() -> None:
    """valid_room caches its verdicts (domain._valid_name): a name seen before gets the same
    answer, and names too long to be valid never reach the cache, so a client sending huge
    ones costs no memory there."""
    names = ["a", "a" * 128, "room-1.x_y", "-a", "a b", "a\n", "é"]
    first = [domain.valid_room(n) for n in names]
    assert first == [True, True, True, False, False, False, False]
    assert [domain.valid_room(n) for n in names] == first
    before = domain._valid_name.cache_info().currsize
    for i in range(50):
        assert not domain.valid_room("a" * (129 + i))
    assert domain._valid_name.cache_info().currsize == before
    assert not domain.valid_room("a" * 1_000_000)
    assert domain._valid_name.cache_info().currsize == before


def test_a_delta_near_every_limit_reads_the_same_either_way() -> None:
    """The short way of well-formed deltas (protocol._simple_delta) gives what the generic
    reading gives, request or error, for members on both sides of each limit (room name,
    id type, length and range, key type and length), in every combination."""
    ts = ["delta", "join", 7, None]
    rooms = ["r1", "a" * 128, "a" * 129, "-x", "", 5, None]
    rids = [None, 7, -(2**63), 2**64 - 1, 2**64, True, 1.5, "i" * 256, "i" * 257, "é" * 256, ""]
    keys = [None, "k", "k" * 64, "k" * 65, "", 3, False]
    bodies = {"merge": {"a": 1}, "patch": [{"op": "add", "path": "/a", "value": 1}]}
    for t, room, rid, key, kind in itertools.product(ts, rooms, rids, keys, bodies):
        message: dict[str, object] = {"t": t, "room": room, kind: bodies[kind]}
        if rid is not None:
            message["id"] = rid
        if key is not None:
            message["key"] = key
        text = json.dumps(message)
        assert _parsed(text) == _long_way(text), text

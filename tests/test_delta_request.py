"""delta.validate_request: a request message's delta and its other members in one parse,
on both engines (the relay's parse of small messages relies on it, protocol.parse)."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

READ = [
    '{"t":"delta","id":7,"room":"r","merge":{"x":1.50,"y":[1,{"z":null}]}}',
    '{"t":"delta","id":"a\\u0062","room":"r","key":"k","patch":[{"op":"add","path":"/a",'
    '"value":1,"extra":2}]}',
    '{"merge":{},"t":"delta","room":"s","room":"t"}',
    '{"t":"join","room":"r","merge":{"a":1}}',
    '{"t":"delta","id":18446744073709551615,"ok":true,"no":false,"key":null,"merge":1}',
    '{"t":"delta","id":-9223372036854775808,"patch":[]}',
    ' {"t":"delta","patch":[{"op":"test","path":"/a","value":[1]}]} \n',
    '{"t":"délta","room":"ü€","merge":{"é":"\\u00e9"}}',
]

LEFT = [
    '{"t":"join","room":"r"}',
    '{"t":"delta","patch":[],"merge":{}}',
    '{"t":"delta","id":1.0,"merge":{}}',
    '{"t":"delta","id":-0,"merge":{}}',
    '{"t":"delta","id":18446744073709551616,"merge":{}}',
    '{"t":"delta","id":-9223372036854775809,"merge":{}}',
    '{"t":"delta","id":[1],"merge":{}}',
    '{"t":{"a":1},"merge":{}}',
    '{"t":"delta","patch":{"op":"add"}}',
    '{"t":"delta","patch":[{"op":"frob","path":"/a"}]}',
    '{"t":"delta","patch":[{"op":"add","path":"a","value":1}]}',
    '{"t":"delta","merge":{"a":1e400}}',
    '{"t":"delta","room":"\\ud800","merge":{}}',
    '{"t":"delta","merge":{}} x',
    '[{"merge":{}}]',
    '{"t":"delta","merge":NaN}',
    '{"t":"delta","merge":' + "[" * 128 + "]" * 128 + "}",
    "",
    "{",
]


@pytest.mark.parametrize("text", READ)
def test_a_request_is_read_as_validate_and_json_read_it(engines: ModuleType, text: str) -> None:
    read = engines.validate_request(text)
    assert read is not None
    fields, kind, body = read
    assert (kind, body) == engines.validate(text)
    whole = json.loads(text)
    assert fields == {k: v for k, v in whole.items() if k not in ("patch", "merge")}
    assert list(fields) == [k for k in whole if k not in ("patch", "merge")]
    assert engines.validate_request(text.encode()) == read


@pytest.mark.parametrize("text", LEFT)
def test_anything_else_is_left_to_the_long_way(engines: ModuleType, text: str) -> None:
    assert engines.validate_request(text) is None


def test_a_lone_surrogate_or_invalid_utf8_is_left_too(engines: ModuleType) -> None:
    assert engines.validate_request('{"t":"\ud800","merge":{}}') is None
    assert engines.validate_request(b'{"t":"\xff","merge":{}}') is None
    with pytest.raises(TypeError):
        engines.validate_request(1)


def test_both_engines_agree(pure: ModuleType, native: ModuleType) -> None:
    for text in READ + LEFT:
        assert pure.validate_request(text) == native.validate_request(text), text

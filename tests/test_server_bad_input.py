"""Issue 3's "Bad input" list, one test each, over real sockets.

Each test checks the reply docs/protocol.md promises, that the connection is still usable where
it says so, and that another member of the room was served throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosedError

from kasagi_relay.server import Relay
from testkit.relay import JSON, MSGPACK, Client, connect_client, start_relay


@contextlib.asynccontextmanager
async def setup(codec: str = JSON, **config: Any) -> AsyncIterator[tuple[Relay, Client, Client]]:
    """A relay, a client about to misbehave, and a bystander member of room "r"."""
    async with (
        start_relay(**config) as relay,
        connect_client(relay.url, codec) as bad,
        connect_client(relay.url) as other,
    ):
        await bad.join("r")
        await other.join("r")
        yield relay, bad, other


async def still_served(bad: Client, other: Client, n: int) -> None:
    """`bad` can still send (ack) and receive; `other` saw every delta (seq n)."""
    ack = await bad.delta("r", [{"op": "add", "path": f"/after{n}", "value": n}], id="ok")
    assert ack is not None and ack["seq"] == n
    f = await other.recv_until(lambda m: m["t"] == "delta" and m["seq"] == n)
    assert f[0]["from"] == n


async def expect_error(
    bad: Client, other: Client, data: str | bytes, code: str, id: Any = None
) -> dict[str, Any]:
    await bad.send_raw(data)
    err, _ = await bad.recv_until(lambda m: m["t"] == "error")
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    if id is not None:
        assert err["id"] == id
    await still_served(bad, other, 1)
    return err


async def test_non_json_text() -> None:
    async with setup() as (_, bad, other):
        await expect_error(bad, other, "this is not json {", "bad_message")


async def test_binary_garbage_on_the_json_subprotocol() -> None:
    async with setup() as (_, bad, other):
        await expect_error(bad, other, b"\x00\xff\xfe garbage \x81", "bad_message")


@pytest.mark.parametrize("doc", ["[1,2,3]", '"join"', "42", "null", "true"])
async def test_json_that_is_not_an_object(doc: str) -> None:
    async with setup() as (_, bad, other):
        await expect_error(bad, other, doc, "bad_message")


@pytest.mark.parametrize(
    "message",
    [{"t": "fly", "room": "r", "id": 1}, {"room": "r", "id": 1}, {"t": None, "id": 1}],
)
async def test_unknown_or_missing_t(message: dict[str, Any]) -> None:
    async with setup() as (_, bad, other):
        await expect_error(bad, other, json.dumps(message), "bad_message", id=1)


async def test_ids_that_have_no_utf8_form_are_echoed_escaped() -> None:
    async with setup() as (_, bad, other):
        await expect_error(bad, other, '{"t":"fly","id":"\\ud800"}', "bad_message", id="\ud800")


@pytest.mark.parametrize("t", ["join", "leave", "delta"])
async def test_missing_room(t: str) -> None:
    async with setup() as (_, bad, other):
        msg = {"t": t, "id": 2, "merge": {"a": 1}}
        await expect_error(bad, other, json.dumps(msg), "bad_message", id=2)


@pytest.mark.parametrize(
    "room",
    ["a{b}", "{r}", "a}", "a:b", "a b", "a\nb", "x" * 200, "", " r", "r\n"],
    ids=[
        "braces",
        "hashtag",
        "brace",
        "colon",
        "space",
        "newline",
        "200chars",
        "empty",
        "lead",
        "trail",
    ],
)
@pytest.mark.parametrize("t", ["join", "delta"])
async def test_bad_room_names(room: str, t: str) -> None:
    async with setup() as (relay, bad, other):
        msg = {"t": t, "room": room, "id": 3, "merge": {"a": 1}}
        await expect_error(bad, other, json.dumps(msg), "bad_room", id=3)
        assert set(relay.rooms) == {"r"}  # never reached the backend or the room table


@pytest.mark.parametrize(
    "fields",
    [
        {"patch": {"op": "add"}},
        {"patch": [{"op": "add", "path": "/a"}]},
        {"patch": [{"op": "teleport", "path": "/a", "value": 1}]},
        {"patch": [{"op": "add", "path": "no-slash", "value": 1}]},
        {"patch": [{"op": "move", "path": "/a"}]},
        {"patch": [1, 2]},
        {"patch": [], "merge": {}},
    ],
)
async def test_invalid_delta(fields: dict[str, Any]) -> None:
    async with setup() as (_, bad, other):
        msg = {"t": "delta", "room": "r", "id": 4, **fields}
        await expect_error(bad, other, json.dumps(msg), "bad_patch", id=4)


@pytest.mark.parametrize(
    "patch",
    [
        [{"op": "remove", "path": "/missing"}],
        [{"op": "replace", "path": "/missing", "value": 1}],
        [{"op": "add", "path": "/a/b", "value": 1}],
        [{"op": "test", "path": "/x", "value": 2}],
        [{"op": "add", "path": "/n", "value": 1}, {"op": "remove", "path": "/zz"}],
    ],
)
async def test_patch_that_cannot_apply_to_the_current_state(patch: list[Any]) -> None:
    async with setup() as (relay, bad, other):
        ack = await other.delta("r", merge={"x": 1}, id="setup")
        assert ack is not None and ack["seq"] == 1
        await bad.recv_until(lambda m: m["t"] == "delta")
        await bad.send({"t": "delta", "room": "r", "id": 5, "patch": patch})
        err, _ = await bad.recv_until(lambda m: m["t"] == "error")
        assert (err["code"], err["id"], err["room"]) == ("bad_patch", 5, "r")
        await still_served(bad, other, 2)  # nothing was published for the bad one
        async with connect_client(relay.url) as late:
            state = (await late.join("r"))["state"]
        assert "n" not in state  # the patch is atomic


@pytest.mark.parametrize("since", ["5", 1.5, None, [], -1, True])
async def test_since_not_a_number(since: Any) -> None:
    async with setup() as (_, bad, other):
        msg: dict[str, Any] = {"t": "join", "room": "r", "id": 6, "since": since}
        if since is None:
            msg["since"] = {"n": 1}
        await expect_error(bad, other, json.dumps(msg), "bad_message", id=6)


async def test_oversize_frame_closes_with_1009() -> None:
    async with setup(max_message_bytes=4096) as (_, bad, other):
        big = json.dumps({"t": "delta", "room": "r", "merge": {"a": "x" * 5000}})
        await bad.send_raw(big)
        with pytest.raises(ConnectionClosedError):
            await bad.recv()
        assert bad.ws.close_code == 1009
        # Just under the limit is fine, for everyone else.
        ack = await other.delta("r", merge={"a": "x" * 3000})
        assert ack is not None and ack["seq"] == 1


@pytest.mark.parametrize("depth", [200, 5_000, 100_000])
async def test_deep_nesting(depth: int) -> None:
    async with setup() as (_, bad, other):
        deep = "[" * depth + "]" * depth
        msg = '{"t":"delta","room":"r","id":7,"merge":{"x":' + deep + "}}"
        # Past Python's recursion limit the message is not parseable JSON for the relay;
        # below it, the engine refuses a delta deeper than its limit.
        code = "bad_patch" if depth < 900 else "bad_message"
        await expect_error(bad, other, msg, code)


async def test_deep_nesting_msgpack() -> None:
    async with setup(MSGPACK) as (_, bad, other):
        deep: Any = 0
        for _ in range(300):
            deep = [deep]
        data = msgpack.packb({"t": "delta", "room": "r", "id": 8, "merge": {"x": deep}})
        await expect_error(bad, other, data, "bad_patch", id=8)


async def test_flood_is_rate_limited_and_others_are_not() -> None:
    async with setup(rate_limit=20.0, rate_burst=20) as (relay, bad, other):
        # The burst allowance is nearly spent by the joins; flood 100 messages.
        for i in range(100):
            await bad.send({"t": "delta", "room": "r", "id": i, "merge": {"i": i}})
        replies = [await bad.recv_until(lambda m: m["t"] in ("ack", "error")) for _ in range(100)]
        codes = [r[0].get("code", "ack") for r in replies]
        assert codes.count("rate_limited") >= 70
        assert [r[0]["id"] for r in replies] == list(range(100))  # each reply says which
        acked = codes.count("ack")
        assert acked >= 1
        # The other connection has its own allowance, untouched by the flood.
        for i in range(15):
            ack = await other.delta("r", merge={"o": i})
            assert ack is not None
        # And the flooder recovers once it slows down.
        await asyncio.sleep(0.3)
        ack = await bad.delta("r", merge={"calm": True})
        assert ack is not None and ack["seq"] == acked + 16
        assert b'kasagi_errors_out_total{code="rate_limited"}' in relay.metrics.render()


async def test_joining_too_many_rooms_is_forbidden() -> None:
    async with setup(max_rooms=3) as (relay, bad, other):
        await bad.join("r2")
        await bad.join("r3")  # "r" is the first of the three
        err = await expect_error(
            bad, other, json.dumps({"t": "join", "room": "r4", "id": 4}), "forbidden", id=4
        )
        assert err["room"] == "r4" and "3 rooms" in err["message"]
        assert "r4" not in relay.rooms  # refused before the room was loaded
        # Joining a room again is not a new membership; leaving one makes room for another.
        for message, reply in (
            ({"t": "join", "room": "r3"}, "joined"),
            ({"t": "leave", "room": "r2"}, "left"),
            ({"t": "join", "room": "r4"}, "joined"),
        ):
            await bad.send(message)
            got, _ = await bad.recv_until(lambda m: m["t"] in ("joined", "left", "error"))
            assert (got["t"], got["room"]) == (reply, message["room"]), got


async def test_unknown_subprotocol_only_is_refused() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async with setup() as (relay, bad, other):
        with pytest.raises(InvalidStatus) as info:
            async with connect(relay.url, subprotocols=["kasagi.v2.json"]):  # type: ignore[list-item]
                pass
        assert info.value.response.status_code == 400
        await still_served(bad, other, 1)


async def test_too_large_state() -> None:
    async with setup(max_state_bytes=2000) as (_, bad, _other):
        ack = await bad.delta("r", merge={"a": "x" * 1500})
        assert ack is not None
        await bad.send({"t": "delta", "room": "r", "id": 9, "merge": {"b": "y" * 600}})
        err, _ = await bad.recv_until(lambda m: m["t"] == "error")
        assert (err["code"], err["id"]) == ("too_large", 9)
        ack = await bad.delta("r", merge={"a": None})  # shrinking is fine
        assert ack is not None and ack["seq"] == 2


async def test_deltas_to_ever_new_rooms_stay_within_the_loaded_rooms_limit() -> None:
    """Deltas need no membership, so a client can name ever new rooms. Past
    --max-loaded-rooms the least recently used rooms without members are unloaded (their
    deltas stay in the backend); rooms with members never are. When every loaded room has
    members, a new room gets `unavailable` and the loaded ones are served as before."""
    async with setup(max_loaded_rooms=4) as (relay, bad, other):  # "r" is loaded: 2 members
        for i in range(10):
            ack = await bad.delta(f"spam{i}", merge={"i": i})
            assert ack is not None and ack["seq"] == 1
            assert len(relay.rooms) <= 4 and "r" in relay.rooms
        assert "spam0" not in relay.rooms
        # An unloaded room loads again with everything it had.
        ack = await bad.delta("spam0", merge={"j": 1})
        assert ack is not None and ack["seq"] == 2
        async with connect_client(relay.url) as late:
            joined = await late.join("spam0")
            assert (joined["seq"], joined["state"]) == (2, {"i": 0, "j": 1})
            await late.send({"t": "leave", "room": "spam0"})
            await late.expect("left")
        # Rooms with members take every place.
        for name in ("m1", "m2", "m3"):
            await other.join(name)
        assert sorted(relay.rooms) == ["m1", "m2", "m3", "r"]
        err = await expect_error(
            bad,
            other,
            json.dumps({"t": "delta", "room": "new", "id": 7, "merge": {}}),
            "unavailable",
            id=7,
        )
        assert "4 rooms" in err["message"] and "new" not in relay.rooms
        # A member leaving frees its room's place.
        await other.send({"t": "leave", "room": "m3"})
        await other.recv_until(lambda m: m["t"] == "left")
        ack = await bad.delta("new", merge={"k": 1})
        assert ack is not None and ack["seq"] == 1
        assert sorted(relay.rooms) == ["m1", "m2", "new", "r"]

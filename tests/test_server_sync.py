"""End to end on real sockets: what members see (docs/protocol.md), on the memory backend."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import jsonpatch
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from kasagi_relay.backends.base import BackendUnavailable
from kasagi_relay.backends.memory import MemoryBackend, MemoryLog, RoomTable
from testkit.relay import JSON, MSGPACK, Client, connect_client, start_relay


def add(path: str, value: Any) -> list[dict[str, Any]]:
    return [{"op": "add", "path": path, "value": value}]


def apply_frame(state: Any, frame: dict[str, Any]) -> Any:
    if "patch" in frame:
        return jsonpatch.apply_patch(state, frame["patch"])
    return merge_patch(state, frame["merge"])


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


async def collect(
    client: Client, room: str, upto: int, others: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Delta frames of `room` until one reaches seq `upto`; other messages go to `others`."""
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["seq"] < upto:
        m = await client.recv()
        if m["t"] == "delta" and m["room"] == room:
            frames.append(m)
        elif others is not None:
            others.append(m)
    return frames


def assert_gapless(frames: list[dict[str, Any]], after: int) -> None:
    for f in frames:
        assert f["from"] == after + 1, frames
        assert f["seq"] >= f["from"]
        after = f["seq"]


async def test_members_see_each_others_deltas_in_order() -> None:
    async with (
        start_relay() as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as b,
        connect_client(relay.url, None) as c,  # no subprotocol offered: JSON
    ):
        for m in (a, b, c):
            joined = await m.join("game.1", id="j")
            conn = joined.pop("conn")  # the connection's id (presence)
            assert isinstance(conn, str) and conn
            assert joined == {"t": "joined", "id": "j", "room": "game.1", "seq": 0, "state": {}}
        # a and b interleave; every member sees one order, the sender its own deltas too.
        for i in range(10):
            sender = a if i % 2 == 0 else b
            await sender.delta("game.1", add(f"/k{i}", i), id=i, wait_ack=False)
        acks: list[dict[str, Any]] = []
        for m in (a, b, c):
            frames = await collect(m, "game.1", 10, acks)
            assert_gapless(frames, 0)
            state: Any = {}
            for f in frames:
                state = apply_frame(state, f)
            assert state == {f"k{i}": i for i in range(10)}
        assert sorted(ack["id"] for ack in acks) == list(range(10))
        assert sorted(ack["seq"] for ack in acks) == list(range(1, 11))
        # One sender's deltas get seqs in the order it sent them.
        by_id = {ack["id"]: ack["seq"] for ack in acks}
        assert [by_id[i] for i in range(0, 10, 2)] == sorted(by_id[i] for i in range(0, 10, 2))


async def test_late_joiner_gets_the_current_state() -> None:
    async with start_relay() as relay, connect_client(relay.url) as a:
        await a.delta("r", add("/a", {"b": [1, 2]}))
        await a.delta("r", merge={"c": "é", "a": {"x": True}})
        await a.delta("r", [{"op": "remove", "path": "/a/b/0"}])
        async with connect_client(relay.url) as late:
            joined = await late.join("r")
            assert joined["seq"] == 3
            assert joined["state"] == {"a": {"b": [2], "x": True}, "c": "é"}
            await a.delta("r", add("/d", 1))
            f = await late.expect("delta")
            assert (f["from"], f["seq"], f["patch"]) == (4, 4, add("/d", 1))


async def test_rejoin_with_since_gets_exactly_what_it_missed() -> None:
    async with start_relay() as relay, connect_client(relay.url) as writer:
        async with connect_client(relay.url) as m:
            await m.join("r")
            for i in range(3):
                await writer.delta("r", add(f"/k{i}", i))
            frames = await collect(m, "r", 3)
            last = frames[-1]["seq"]
        for i in range(3, 7):
            await writer.delta("r", add(f"/k{i}", i))
        async with connect_client(relay.url) as m2:
            joined = await m2.join("r", since=last, id=5)
            assert isinstance(joined.pop("conn"), str)
            assert joined == {"t": "joined", "id": 5, "room": "r", "seq": 3, "resumed": True}
            missed = await collect(m2, "r", 7)
            assert [(f["from"], f["seq"]) for f in missed] == [(4, 4), (5, 5), (6, 6), (7, 7)]
            assert [f["patch"] for f in missed] == [add(f"/k{i}", i) for i in range(3, 7)]
            await writer.delta("r", add("/k7", 7))
            f = await m2.expect("delta")
            assert (f["from"], f["seq"]) == (8, 8)
            await m2.nothing(0.2)
        async with connect_client(relay.url) as m3:
            # Up to date: resumed, nothing to replay.
            assert (await m3.join("r", since=8))["resumed"] is True
            await m3.nothing(0.2)
        async with connect_client(relay.url) as m4:
            # A since the relay never reached: the full state.
            joined = await m4.join("r", since=99)
            assert joined["seq"] == 8 and len(joined["state"]) == 8


async def test_since_older_than_history_gets_full_state() -> None:
    async with (
        start_relay(history=3, compaction_interval_s=0) as relay,
        connect_client(relay.url) as w,
    ):
        for i in range(10):
            await w.delta("r", add(f"/k{i}", i))
        await relay.compactor.run_once()  # snapshot at 10, history trimmed to 3
        # The room's own recent-ops cache would still serve it: use a fresh relay view.
        relay.rooms["r"].recent.clear()
        async with connect_client(relay.url) as m:
            joined = await m.join("r", since=2)
            assert "resumed" not in joined
            assert joined["seq"] == 10 and joined["state"] == {f"k{i}": i for i in range(10)}
            # Still in history, but before the snapshot: the relay cannot judge ops 9 and 10
            # at their position (frames carry only effective changes): the full state.
            again = await m.join("r", since=8)
            assert "resumed" not in again and again["seq"] == 10
            await w.delta("r", add("/k10", 10))
            await w.delta("r", add("/k11", 11))
            await collect(m, "r", 12)
        relay.rooms["r"].recent.clear()
        async with connect_client(relay.url) as m:
            # After the snapshot: judged on the state rebuilt from it, then replayed.
            resumed = await m.join("r", since=11)
            assert resumed["resumed"] is True
            frames = await collect(m, "r", 12)
            assert [(f["from"], f["seq"], f["patch"]) for f in frames] == [
                (12, 12, add("/k11", 11))
            ]


async def test_same_idempotency_key_same_seq_one_broadcast() -> None:
    async with (
        start_relay() as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as watcher,
    ):
        await watcher.join("r")
        first = await a.delta("r", [{"op": "remove", "path": "/x"}], key="k1", wait_ack=False)
        assert first is None
        err = await a.expect("error")  # /x does not exist: refused, nothing stored
        assert err["code"] == "bad_patch"
        ack1 = await a.delta("r", add("/x", 1), key="k1", id=1)
        retry = await a.delta("r", add("/x", 1), key="k1", id=2)
        assert ack1 is not None and retry is not None
        assert (ack1["seq"], retry["seq"], retry["id"]) == (1, 1, 2)
        # The same key with another delta is not a retry: key_conflict, nothing stored
        # (docs/protocol.md, idempotency keys).
        await a.send({"t": "delta", "room": "r", "id": 3, "key": "k1", "patch": add("/x", 2)})
        err = await a.expect("error")
        assert (err["code"], err["id"], err["room"]) == ("key_conflict", 3, "r")
        # A remove retried with its key after it applied still gets its first ack.
        ack3 = await a.delta("r", [{"op": "remove", "path": "/x"}], key="k2")
        ack4 = await a.delta("r", [{"op": "remove", "path": "/x"}], key="k2")
        assert ack3 is not None and ack4 is not None and ack3["seq"] == ack4["seq"] == 2
        frames = await collect(watcher, "r", 2)
        assert [(f["from"], f["seq"]) for f in frames] == [(1, 1), (2, 2)]
        assert frames[0]["patch"] == add("/x", 1)
        await watcher.nothing(0.3)


async def test_merged_frames_cover_from_to_seq_and_equal_single_deltas() -> None:
    async with (
        start_relay(tick_ms=300) as relay,
        connect_client(relay.url) as w,
        connect_client(relay.url) as m,
        connect_client(relay.url, MSGPACK) as mp,
    ):
        await m.join("r")
        await mp.join("r")
        deltas: list[dict[str, Any]] = [
            {"patch": add("/list", [])},
            {"patch": add("/list/-", 1)},
            {"patch": add("/list/-", 2)},
            {"merge": {"cfg": {"a": 1, "b": 2}}},
            {"merge": {"cfg": {"a": None}}},
            {"patch": [{"op": "replace", "path": "/list/0", "value": 10}]},
            {"patch": [{"op": "remove", "path": "/nothing"}]},  # refused: bad_patch
            {"patch": add("/n", 1)},
            {"patch": [{"op": "replace", "path": "/n", "value": 2}]},
        ]
        for i, d in enumerate(deltas):
            await w.send({"t": "delta", "room": "r", "id": i, **d})
        replies = [await w.recv() for _ in deltas]
        assert [r["t"] for r in replies].count("ack") == 8
        expected: Any = {}
        for d in deltas[:6] + deltas[7:]:
            expected = apply_frame(expected, d)
        for client in (m, mp):
            frames = await collect(client, "r", 8)
            assert_gapless(frames, 0)
            assert any(f["from"] < f["seq"] for f in frames), frames  # merged
            assert len(frames) < 8
            state: Any = {}
            for f in frames:
                state = apply_frame(state, f)
            assert state == expected
        async with connect_client(relay.url) as late:
            assert (await late.join("r"))["state"] == expected


async def test_msgpack_subprotocol_end_to_end() -> None:
    async with (
        start_relay() as relay,
        connect_client(relay.url, MSGPACK) as mp,
        connect_client(relay.url, JSON) as js,
    ):
        assert mp.ws.subprotocol == MSGPACK and js.ws.subprotocol == JSON
        await mp.join("r")
        await js.join("r")
        ack = await mp.delta("r", merge={"bin": "ok", "n": 1.5, "big": 2**63}, id="m")
        assert ack == {"t": "ack", "id": "m", "room": "r", "seq": 1}
        for client in (mp, js):
            f = await client.expect("delta")
            assert f["merge"] == {"bin": "ok", "n": 1.5, "big": 2**63}
        await mp.send_raw(b"\xc1garbage")
        assert (await mp.expect("error"))["code"] == "bad_message"
        async with connect_client(relay.url, MSGPACK) as late:
            assert (await late.join("r"))["state"] == {"bin": "ok", "n": 1.5, "big": 2**63}


async def test_subprotocol_negotiation() -> None:
    async with start_relay() as relay:
        with pytest.raises(InvalidStatus) as info:
            async with connect(relay.url, subprotocols=["chat"]):  # type: ignore[list-item]
                pass
        assert info.value.response.status_code == 400
        offered = ["chat", MSGPACK, JSON]
        async with connect(relay.url, subprotocols=offered) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == MSGPACK  # the client's first supported choice
        with pytest.raises(InvalidStatus) as info:
            async with connect(relay.url.replace("/ws", "/other")):
                pass
        assert info.value.response.status_code == 404


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


async def test_healthz_and_metrics() -> None:
    async with start_relay() as relay, connect_client(relay.url) as a:
        base = f"http://127.0.0.1:{relay.port}"
        status, ctype, body = await asyncio.to_thread(http_get, base + "/healthz")
        assert status == 200 and ctype == "application/json"
        assert json.loads(body)["ok"] is True and json.loads(body)["backend"] == "memory"
        await a.join("r")
        await a.delta("r", add("/a", 1))
        await a.expect("delta")
        status, ctype, text = await asyncio.to_thread(http_get, base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        for line in (
            "kasagi_connections 1.0",
            "kasagi_rooms 1.0",
            "kasagi_deltas_in_total 1.0",
            "kasagi_frames_out_total",
            "kasagi_bytes_out_total",
            'kasagi_deltas_per_frame_bucket{le="1.0"} 1.0',
            "kasagi_send_queue_bytes",
            "kasagi_dropped_members_total 0.0",
            "kasagi_backend_errors_total 0.0",
            "kasagi_ack_latency_seconds_count 1.0",
        ):
            assert line in text, line


async def test_fanout_counters_count_every_room_and_member() -> None:
    # Rooms flushed in one loop turn are counted once per turn: the totals still hold
    # every broadcast and every frame.
    async with (
        start_relay() as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as b,
        connect_client(relay.url) as p,
    ):
        rooms = ["c1", "c2", "c3"]
        for room in rooms:
            await a.join(room)
            await b.join(room)
        for i, room in enumerate(rooms):  # in flight together: likely flushed in one turn
            await p.delta(room, add("/a", 1), id=i, wait_ack=False)
        for _ in rooms:
            await p.expect("ack")
        for client in (a, b):
            for _ in rooms:
                await client.expect("delta")
        text = relay.metrics.render()
        assert b"kasagi_broadcasts_total 3.0" in text
        assert b"kasagi_frames_out_total 6.0" in text


async def test_two_relays_in_one_process_have_their_own_metrics() -> None:
    async with start_relay() as r1, start_relay() as r2, connect_client(r1.url) as a:
        await a.delta("x", add("/a", 1))
        assert b"kasagi_deltas_in_total 1.0" in r1.metrics.render()
        assert b"kasagi_deltas_in_total 0.0" in r2.metrics.render()


async def test_leave_stops_the_stream() -> None:
    async with (
        start_relay() as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as b,
    ):
        await a.join("r")
        await b.join("r")
        await b.send({"t": "leave", "room": "r", "id": 3})
        assert await b.expect("left") == {"t": "left", "id": 3, "room": "r"}
        await a.delta("r", add("/a", 1))
        await a.expect("delta")
        await b.nothing(0.2)
        # Sending without being joined is fine; the sender just does not get the stream.
        ack = await b.delta("r", add("/b", 2))
        assert ack is not None and ack["seq"] == 2
        f = await a.expect("delta")
        assert f["seq"] == 2
        payload = json.dumps(f)
        assert "kasagi" not in payload


class FlakyLog(MemoryLog):
    """The memory backend's log with an off switch: writes fail as a lost Redis would."""

    def __init__(self, table: RoomTable) -> None:
        super().__init__(table)
        self.down = False

    async def publish(self, room: str, kind: Any, body: bytes, key: str | None = None) -> int:
        if self.down:
            raise BackendUnavailable("backend unreachable")
        return await super().publish(room, kind, body, key)


class FlakyBackend(MemoryBackend):
    """The memory backend whose log and health can be switched off."""

    def __init__(self) -> None:
        super().__init__()
        self.log = self.flaky = FlakyLog(self.table)

    @property
    def down(self) -> bool:
        return self.flaky.down

    @down.setter
    def down(self, down: bool) -> None:
        self.flaky.down = down

    async def health(self) -> dict[str, object]:
        return {"ok": not self.down, "backend": "flaky"}


async def test_backend_down_unavailable_and_healthz_503() -> None:
    backend = FlakyBackend()
    async with (
        start_relay(backend=backend) as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as b,
    ):
        base = f"http://127.0.0.1:{relay.port}"
        await b.join("r")
        await a.delta("r", add("/a", 1), key="k1")
        backend.down = True
        status, _, body = await asyncio.to_thread(http_get, base + "/healthz")
        assert status == 503 and json.loads(body) == {"ok": False, "backend": "flaky"}
        await a.send({"t": "delta", "room": "r", "id": 1, "merge": {"x": 1}, "key": "k2"})
        err = await a.expect("error")
        assert (err["code"], err["id"], err["room"]) == ("unavailable", 1, "r")
        # Joins are served from the cached state meanwhile.
        async with connect_client(relay.url) as c:
            assert (await c.join("r"))["state"] == {"a": 1}
        backend.down = False
        assert (await asyncio.to_thread(http_get, base + "/healthz"))[0] == 200
        ack = await a.delta("r", merge={"x": 1}, key="k2", id=2)  # the retry
        assert ack is not None and ack["seq"] == 2
        frames = await collect(b, "r", 2)
        assert [f["seq"] for f in frames] == [1, 2]
        assert b"kasagi_backend_errors_total 1.0" in relay.metrics.render()


class LossyLog(MemoryLog):
    """Stores every delta but can fail to deliver some, as a broken subscription would."""

    def __init__(self, table: RoomTable) -> None:
        super().__init__(table)
        self.mute = False
        self.table = table

    async def publish(self, room: str, kind: Any, body: bytes, key: str | None = None) -> int:
        listener = self.table.listener
        if self.mute:
            self.table.listener = None
        try:
            return await super().publish(room, kind, body, key)
        finally:
            self.table.listener = listener


class LossyBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.log = self.lossy = LossyLog(self.table)

    @property
    def mute(self) -> bool:
        return self.lossy.mute

    @mute.setter
    def mute(self, mute: bool) -> None:
        self.lossy.mute = mute


async def test_gap_is_backfilled_and_lost_history_is_a_reset() -> None:
    backend = LossyBackend()
    async with (
        start_relay(backend=backend, compaction_interval_s=0) as relay,
        connect_client(relay.url) as w,
        connect_client(relay.url) as m,
    ):
        await m.join("r")
        await w.delta("r", add("/a", 1))
        backend.mute = True
        await w.delta("r", add("/b", 2))
        backend.mute = False
        await w.delta("r", add("/c", 3))  # seq 3 reveals the gap: 2 is read from history
        frames = await collect(m, "r", 3)
        assert_gapless(frames, 0)
        backend.mute = True
        for i in range(5):
            await w.delta("r", add(f"/d{i}", i))
        from kasagi_relay.compaction import compact_room

        await compact_room(backend, "r", history=1)  # history now starts at seq 8
        backend.mute = False
        await w.delta("r", add("/e", 5))  # seq 9: the gap 4..8 cannot be backfilled
        reset = await m.expect("reset")
        assert reset["seq"] == 9
        assert reset["state"] == {
            "a": 1,
            "b": 2,
            "c": 3,
            "d0": 0,
            "d1": 1,
            "d2": 2,
            "d3": 3,
            "d4": 4,
            "e": 5,
        }
        await w.delta("r", add("/f", 6))
        f = await m.expect("delta")
        assert (f["from"], f["seq"]) == (10, 10)


async def test_frames_carry_only_effective_changes() -> None:
    """docs/protocol.md: a delta that failed at its position reaches members as an empty
    patch, and `test` ops (judged by the relay) are left out of every frame: live, merged
    and replayed, from the room's recent ops and from the backend's history alike."""

    def test(path: str, value: Any) -> dict[str, Any]:
        return {"op": "test", "path": path, "value": value}

    rep = {"op": "replace", "path": "/a", "value": 2}
    async with (
        start_relay() as relay,
        connect_client(relay.url) as w,
        connect_client(relay.url) as m,
    ):
        await m.join("r")
        await w.delta("r", add("/a", 1))
        # Stored without the relay's check, as another service (or a relay that judged
        # an older state) can: each fails at its position.
        await relay.backend.publish("r", "patch", b'[{"op":"remove","path":"/zz"}]')
        await w.delta("r", [test("/a", 1), rep])
        await relay.backend.publish(
            "r", "patch", json.dumps([test("/a", 1), *add("/b", 1)]).encode()
        )
        # Two at once, merged or not: the failed one and the test op leave nothing.
        body = json.dumps([test("/a", 2), *add("/c", 3)]).encode()
        await relay.backend.publish("r", "patch", b'[{"op":"remove","path":"/zz"}]')
        await relay.backend.publish("r", "patch", body)
        live = await collect(m, "r", 6)
        state: Any = {}
        for f in live:
            assert all(op["op"] != "test" for op in f.get("patch", []))
            state = apply_frame(state, f)
        assert state == {"a": 2, "c": 3}
        assert [(f["from"], f["seq"], f["patch"]) for f in live[:3]] == [
            (1, 1, add("/a", 1)),
            (2, 2, []),
            (3, 3, [rep]),
        ]
        expected = [(2, 2, []), (3, 3, [rep]), (4, 4, []), (5, 5, []), (6, 6, add("/c", 3))]
        async with connect_client(relay.url) as late:
            assert (await late.join("r", since=1))["resumed"] is True
            replay = await collect(late, "r", 6)
            assert [(f["from"], f["seq"], f["patch"]) for f in replay] == expected
        relay.rooms["r"].recent.clear()  # served from the backend's history now
        async with connect_client(relay.url) as late:
            assert (await late.join("r", since=1))["resumed"] is True
            replay = await collect(late, "r", 6)
            assert [(f["from"], f["seq"], f["patch"]) for f in replay] == expected

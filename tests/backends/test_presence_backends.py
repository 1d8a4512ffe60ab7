"""The presence role (backends/base.py `Presence`) on the memory backend and on a real
redis-server: the same semantics in both (add, remove, refresh, expiry with its leave
events, one read per request), plus what only Redis shows (the keys under the room's hash
tag, their own expiry, events on their own channel and not on the delta channel)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from kasagi_relay.backends.base import Backend
from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.backends.redis import RedisBackend
from testkit.redis import Topology, redis_server  # noqa: F401
from testkit.wait import until


class Events:
    def __init__(self, own_mark: bytes = b"") -> None:
        self.own_mark = own_mark
        self.got: list[tuple[str, str, bytes]] = []
        self.resyncs = 0

    def on_presence(self, room: str, kind: str, entry: bytes) -> None:
        self.got.append((room, kind, entry))

    def on_presence_resync(self) -> None:
        self.resyncs += 1


def redis_url(topo: Topology) -> str:
    return f"redis://127.0.0.1:{topo.servers[0].port}/0"


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        b: Backend = MemoryBackend()
    else:
        topo = request.getfixturevalue("redis_server")
        b = RedisBackend(redis_url(topo), op_timeout_s=3.0)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


E1 = b'{"conn":"c1","sub":"u1","info":{"n":"Ann"},"j":"a"}'
E2 = b'{"conn":"c2","sub":null,"info":{},"j":"b"}'
E2_AGAIN = b'{"conn":"c2","sub":null,"info":{},"j":"c"}'


async def test_add_remove_members_and_their_events(backend: Backend) -> None:
    p = backend.presence
    events = Events()
    p.set_listener(events)
    await p.subscribe("r")
    await p.add("r", "c1", E1, 60)
    await p.add("r", "c2", E2, 60)
    assert sorted(await p.members("r")) == sorted([E1, E2])
    assert await p.members("other") == []
    # The same connection again with a new entry (a new membership) replaces it.
    await p.add("r", "c2", E2_AGAIN, 60)
    assert sorted(await p.members("r")) == sorted([E1, E2_AGAIN])
    await p.remove("r", "c2", E2_AGAIN)
    await p.remove("r", "c1", E1)
    assert await p.members("r") == []
    want = [
        ("r", "join", E1),
        ("r", "join", E2),
        ("r", "join", E2_AGAIN),
        ("r", "leave", E2_AGAIN),
        ("r", "leave", E1),
    ]
    await until(lambda: len(events.got) >= len(want))
    await asyncio.sleep(0.1)
    assert events.got == want
    await p.unsubscribe("r")


async def test_one_batch_applies_its_writes_in_order_across_rooms(backend: Backend) -> None:
    """`write`: one batch (one pipeline on Redis) of adds and removes in several rooms,
    each announced in order (a member added and removed in the same batch: joined, then
    left, and gone); a batch sent again (it is retried whole after a failure) stores the
    same and announces the same again, which the relays drop (test_presence.py)."""
    p = backend.presence
    events = Events()
    p.set_listener(events)
    for room in ("r", "s"):
        await p.subscribe(room)
    batch = [
        ("r", "c1", E1, True),
        ("s", "c2", E2, True),
        ("r", "c1", E1, False),
        ("r", "c2", E2_AGAIN, True),
    ]
    await p.write(batch, 60)
    await p.write(batch, 60)  # the same batch again, as a retry sends it
    assert await p.members("r") == [E2_AGAIN]
    assert await p.members("s") == [E2]
    await until(lambda: len(events.got) >= 8)
    await asyncio.sleep(0.1)
    by_room = {room: [(k, e) for r, k, e in events.got if r == room] for room in ("r", "s")}
    once = [("join", E1), ("leave", E1), ("join", E2_AGAIN)]
    assert by_room["r"] == once + once
    assert by_room["s"] == [("join", E2), ("join", E2)]
    await p.write([], 60)  # nothing to send: no round trip, no error


async def test_a_batch_that_leaves_and_joins_again_keeps_the_new_entry(
    backend: Backend,
) -> None:
    """A connection's writes in one batch apply in order, the last one standing: a leave
    then a join again (a new membership) stores the new entry; a re-write (new info, a
    token refreshed) then a leave stores nothing."""
    p = backend.presence
    events = Events()
    p.set_listener(events)
    await p.subscribe("r")
    await p.write([("r", "c2", E2, True)], 60)
    await p.write([("r", "c2", E2, False), ("r", "c2", E2_AGAIN, True)], 60)
    assert await p.members("r") == [E2_AGAIN]
    await p.write([("r", "c1", E1, True), ("r", "c1", E1, True), ("r", "c1", E1, False)], 60)
    assert await p.members("r") == [E2_AGAIN]
    await until(lambda: len(events.got) >= 6)
    await asyncio.sleep(0.1)
    assert [(k, e) for _, k, e in events.got] == [
        ("join", E2),
        ("leave", E2),
        ("join", E2_AGAIN),
        ("join", E1),
        ("join", E1),
        ("leave", E1),
    ]


async def test_entries_not_refreshed_expire_with_their_leave(backend: Backend) -> None:
    p = backend.presence
    events = Events()
    p.set_listener(events)
    await p.subscribe("r")
    # c1 belongs to a relay that stops refreshing (dead); c2 to one that refreshes.
    # c2's TTL is long so that a stalled machine cannot expire it between refreshes.
    await p.add("r", "c1", E1, 0.3)
    await p.add("r", "c2", E2, 5)
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        await p.refresh("r", {"c2": E2}, 5)
        await asyncio.sleep(0.1)
    # The live relay's refresh took the dead one's entry out and announced its leave.
    assert await p.members("r") == [E2]
    await until(lambda: ("r", "leave", E1) in events.got)
    assert [e for e in events.got if e[1] == "leave"] == [("r", "leave", E1)]
    # A refresh writes back an entry the store lost (a failover), announcing it again.
    await p.remove("r", "c2", E2)
    await p.refresh("r", {"c2": E2}, 60)
    assert await p.members("r") == [E2]
    await until(lambda: events.got.count(("r", "join", E2)) == 2)


async def test_a_read_takes_out_expired_entries_even_without_a_refresh(backend: Backend) -> None:
    p = backend.presence
    await p.add("r", "c1", E1, 0.2)
    await asyncio.sleep(0.3)
    assert await p.members("r") == []


async def test_redis_keys_share_the_rooms_hash_tag_and_expire(
    redis_server: Topology,  # noqa: F811
) -> None:
    b = RedisBackend(redis_url(redis_server), op_timeout_s=3.0)
    await b.start()
    r = aioredis.Redis(port=redis_server.servers[0].port)
    try:
        deltas = r.pubsub()
        await deltas.subscribe("room:{r}:channel")
        await b.presence.add("r", "c1", E1, 30)
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await r.keys("room:{r}:*"))
        assert keys == ["room:{r}:presence", "room:{r}:presence-exp"]
        for key in keys:
            assert 0 < await r.pttl(key) <= 30_000
        assert await r.hget("room:{r}:presence", "c1") == E1
        # Nothing on the delta channel (other subscribers read it as deltas only).
        await b.presence.remove("r", "c1", E1)
        message = await deltas.get_message(ignore_subscribe_messages=True, timeout=0.3)
        assert message is None
        await deltas.aclose()  # type: ignore[no-untyped-call]
    finally:
        await r.aclose()
        await b.close()


async def test_redis_sends_a_calls_events_as_one_message_one_event_per_line(
    redis_server: Topology,  # noqa: F811
) -> None:
    """A batch costs one PUBLISH, not one per event: a relay's writes of one room come back
    as one message, the events in order, one per line; a refresh that re-writes lost
    entries and takes out expired ones announces all of it in one message too."""
    b = RedisBackend(redis_url(redis_server), op_timeout_s=3.0)
    await b.start()
    r = aioredis.Redis(port=redis_server.servers[0].port)
    watcher = r.pubsub()
    try:
        await watcher.subscribe("room:{r}:presence-events")
        assert await watcher.get_message(timeout=1.0) is not None  # the confirmation

        async def messages() -> list[bytes]:
            got = []
            while (m := await watcher.get_message(timeout=0.3)) is not None:
                got.append(m["data"])
            return got

        await b.presence.write(
            [("r", "c1", E1, True), ("r", "c2", E2, True), ("r", "c1", E1, False)], 60
        )
        assert await messages() == [
            b'{"e":"join","m":%s}\n{"e":"join","m":%s}\n{"e":"leave","m":%s}' % (E1, E2, E1)
        ]
        await b.presence.add("r", "c1", E1, 0.5)
        # Nothing new (c2 is stored): nothing published; the keys live 60 s again.
        await b.presence.refresh("r", {"c2": E2}, 60)
        assert await messages() == [b'{"e":"join","m":%s}' % E1]
        await asyncio.sleep(0.5)  # c1 expires
        await r.hdel("room:{r}:presence", "c2")  # c2 lost (a failover)
        await b.presence.refresh("r", {"c2": E2}, 60)
        assert await messages() == [b'{"e":"leave","m":%s}\n{"e":"join","m":%s}' % (E1, E2)]
        # A write announces what it was told, changed or not (a retry): the relays drop
        # the repeats.
        await b.presence.write([("r", "c2", E2, True), ("r", "c1", E1, False)], 60)
        assert await messages() == [b'{"e":"join","m":%s}\n{"e":"leave","m":%s}' % (E2, E1)]
    finally:
        await watcher.aclose()  # type: ignore[no-untyped-call]
        await r.aclose()
        await b.close()


async def test_redis_a_malformed_line_does_not_hide_the_rest_of_its_message(
    redis_server: Topology,  # noqa: F811
) -> None:
    """An event message published by something else than the library (a bad line, a
    version 3 message of one event) is read line by line: what is well-formed arrives."""
    b = RedisBackend(redis_url(redis_server), op_timeout_s=3.0)
    await b.start()
    r = aioredis.Redis(port=redis_server.servers[0].port)
    try:
        events = Events()
        b.presence.set_listener(events)
        await b.presence.subscribe("r")
        channel = "room:{r}:presence-events"
        await r.publish(channel, b'not an event\n{"e":"join","m":%s}\n{"e":"dance"}' % E1)
        await r.publish(channel, b'{"e":"leave","m":%s}' % E1)
        await until(lambda: len(events.got) >= 2)
        await asyncio.sleep(0.1)
        assert events.got == [("r", "join", E1), ("r", "leave", E1)]
    finally:
        await r.aclose()
        await b.close()


async def test_redis_drops_a_message_of_the_listeners_own_entries_only(
    redis_server: Topology,  # noqa: F811
) -> None:
    """A relay's own batch comes back on the channel; it announced those events itself
    (presence.py), so a message whose every entry carries its mark is dropped unread. A
    message mixing its entries with another relay's (a refresh that took out a dead
    relay's entries) is read line by line, all of it (the hub drops its own lines)."""
    mine = b',"j":"aaaa'
    m1 = b'{"conn":"m1","sub":null,"info":{},"j":"aaaa1"}'
    m2 = b'{"conn":"m2","sub":"x","info":{"j":"aaaa"},"j":"aaaa2"}'  # the mark only as `j`
    look_alike = b'{"conn":"o1","sub":"\\",\\"j\\":\\"aaaa","info":{},"j":"bbbb1"}'
    b = RedisBackend(redis_url(redis_server), op_timeout_s=3.0)
    await b.start()
    try:
        events = Events(own_mark=mine)
        b.presence.set_listener(events)
        await b.presence.subscribe("r")
        await b.presence.write([("r", "m1", m1, True), ("r", "m2", m2, True)], 60)
        await b.presence.write([("r", "m1", m1, False), ("r", "o1", look_alike, True)], 60)
        await b.presence.write([("r", "o1", look_alike, False)], 60)
        await until(lambda: len(events.got) >= 3)
        await asyncio.sleep(0.2)
        assert events.got == [
            ("r", "leave", m1),
            ("r", "join", look_alike),
            ("r", "leave", look_alike),
        ]
    finally:
        await b.close()


async def test_redis_refuses_an_entry_holding_a_newline(
    redis_server: Topology,  # noqa: F811
) -> None:
    """Events travel one per line, so an entry with a newline (valid JSON, never written
    by a relay) is not written: a batch writes the others; a refresh, whose events the
    library makes, is refused whole, nothing of it stored."""
    b = RedisBackend(redis_url(redis_server), op_timeout_s=3.0)
    await b.start()
    r = aioredis.Redis(port=redis_server.servers[0].port)
    watcher = r.pubsub()
    bad = b'{"conn":"c3",\n"sub":null,"info":{},"j":"d"}'
    try:
        await watcher.subscribe("room:{r}:presence-events")
        assert await watcher.get_message(timeout=1.0) is not None  # the confirmation
        await b.presence.write([("r", "c1", E1, True), ("r", "c3", bad, True)], 60)
        assert await b.presence.members("r") == [E1]
        message = await watcher.get_message(timeout=1.0)
        assert message is not None and message["data"] == b'{"e":"join","m":%s}' % E1
        await b.presence.write([("r", "c1", E1, False)], 60)
        with pytest.raises(ResponseError, match="newline"):
            await b.presence.refresh("r", {"c1": E1, "c3": bad}, 60)
        assert await b.presence.members("r") == []
    finally:
        await watcher.aclose()  # type: ignore[no-untyped-call]
        await r.aclose()
        await b.close()

"""The presence role on a real Redis Cluster (3 primaries, 3 replicas): each room's entries
on the primary of its slot (the `{R}` hash tag), its events carried by sharded pub/sub, and
two relays on the cluster seeing one list with the same count."""

from __future__ import annotations

import asyncio
import time

import pytest

from kasagi_relay.backends.redis_cluster import ClusterBackend, room_slot
from testkit.redis import ClusterTopology
from testkit.relay import connect_client, relay_process

pytestmark = pytest.mark.timeout(150)


class Events:
    own_mark = b""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, bytes]] = []

    def on_presence(self, room: str, kind: str, entry: bytes) -> None:
        self.got.append((room, kind, entry))

    def on_presence_resync(self) -> None:
        pass


async def test_entries_live_on_their_rooms_shard_and_events_arrive(
    cluster: ClusterTopology,
) -> None:
    b = ClusterBackend([cluster.servers[0].addr], op_timeout_s=5.0)
    events = Events()
    b.presence.set_listener(events)
    await b.start()
    try:
        rooms = [f"room{i}" for i in range(12)]
        for room in rooms:
            await b.presence.subscribe(room)
        for room in rooms:
            entry = b'{"conn":"c-%s","sub":null,"info":{},"j":"1"}' % room.encode()
            await b.presence.add(room, f"c-{room}", entry, 30)
        primaries = set()
        for room in rooms:
            node = cluster.primary_of_slot(room_slot(room))
            primaries.add(node.port)
            client = cluster.client(node)
            try:
                assert client.hlen(f"room:{{{room}}}:presence") == 1
            finally:
                client.close()
            assert len(await b.presence.members(room)) == 1
        assert len(primaries) == 3
        deadline = time.monotonic() + 5
        while len(events.got) < len(rooms) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert sorted(r for r, kind, _ in events.got if kind == "join") == sorted(rooms)
    finally:
        await b.close()


async def test_one_batch_spanning_the_shards_lands_on_each_rooms_shard_in_order(
    cluster: ClusterTopology,
) -> None:
    """`write` of one batch over rooms on the three shards: one pipeline per shard, each
    room's writes in order (added then removed: nothing left, join then leave announced)."""
    b = ClusterBackend([cluster.servers[0].addr], op_timeout_s=5.0)
    events = Events()
    b.presence.set_listener(events)
    await b.start()
    try:
        rooms = [f"batch{i}" for i in range(12)]
        for room in rooms:
            await b.presence.subscribe(room)
        stay = {
            room: b'{"conn":"s-%s","sub":null,"info":{},"j":"1"}' % room.encode() for room in rooms
        }
        go = {
            room: b'{"conn":"g-%s","sub":null,"info":{},"j":"1"}' % room.encode() for room in rooms
        }
        batch = [(room, f"g-{room}", go[room], True) for room in rooms]
        batch += [(room, f"s-{room}", stay[room], True) for room in rooms]
        batch += [(room, f"g-{room}", go[room], False) for room in rooms]
        await b.presence.write(batch, 30)
        primaries = set()
        for room in rooms:
            primaries.add(cluster.primary_of_slot(room_slot(room)).port)
            assert await b.presence.members(room) == [stay[room]]
        assert len(primaries) == 3
        deadline = time.monotonic() + 5
        while len(events.got) < 3 * len(rooms) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for room in rooms:
            got = [(kind, entry) for r, kind, entry in events.got if r == room]
            assert got == [("join", go[room]), ("join", stay[room]), ("leave", go[room])]
    finally:
        await b.close()


async def test_two_relays_on_a_cluster_see_one_list(cluster: ClusterTopology) -> None:
    nodes = ",".join(f"{h}:{p}" for h, p in (n.addr for n in cluster.servers[:3]))
    args = ["--cluster", nodes, "--presence-refresh", "1", "--presence-ttl", "3"]
    async with (
        relay_process(*args) as one,
        relay_process(*args) as two,
        connect_client(one.url) as a,
        connect_client(two.url) as b,
    ):
        mine = (await a.join("lobby", presence=True))["conn"]
        theirs = (await b.join("lobby"))["conn"]
        joined = await a.expect("presence_join")
        assert joined["member"]["conn"] == theirs
        for c in (a, b):
            await c.send({"t": "presence", "room": "lobby"})
            reply, _ = await c.recv_until(lambda m: m["t"] == "presence")
            assert {m["conn"] for m in reply["members"]} == {mine, theirs}
            assert reply["count"] == 2
        await b.send({"t": "leave", "room": "lobby"})
        leave, _ = await a.recv_until(lambda m: m["t"] == "presence_leave")
        assert leave["member"]["conn"] == theirs

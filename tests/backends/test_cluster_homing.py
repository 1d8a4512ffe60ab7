"""A room's subscriptions follow its slot on a real Redis Cluster (3 primaries, 3
replicas): one migration of the slot moves both the feed's and the presence events'
subscription to the new shard (and off the old one), the feed resyncs the room, and what
is published and announced there then arrives. (The presence reconcile after a move is not
checked: every (re)subscription of a presence feed also asks for one, so a count of them
does not tell the move's apart.)"""

from __future__ import annotations

import asyncio

import pytest

from kasagi_relay.backends.base import Op
from kasagi_relay.backends.redis_cluster import ClusterBackend, room_slot
from testkit.redis import ClusterTopology

pytestmark = pytest.mark.timeout(150)


class Rec:
    """The relay's side of both roles: ops, resyncs and presence events."""

    own_mark = b""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.resyncs: list[frozenset[str] | None] = []
        self.presence: list[tuple[str, str]] = []

    def on_op(self, room: str, op: Op) -> None:
        self.seqs.append(op.seq)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        self.resyncs.append(rooms)

    def on_presence(self, room: str, kind: str, entry: bytes) -> None:
        self.presence.append((room, kind))

    def on_presence_resync(self) -> None:
        pass


async def test_feed_and_presence_subscriptions_follow_a_slot_move(
    cluster: ClusterTopology,
) -> None:
    b = ClusterBackend([n.addr for n in cluster.servers], op_timeout_s=10.0)
    rec = Rec()
    b.set_listener(rec)
    b.presence.set_listener(rec)
    await b.start()
    try:
        room = "homing"
        slot = room_slot(room)
        await b.subscribe(room)
        await b.presence.subscribe(room)
        old = b.router.shard_for(room)
        assert old is not None
        target = next(p for p in cluster.primaries() if p is not cluster.primary_of_slot(slot))
        await asyncio.to_thread(cluster.migrate_slot, slot, target)
        async with asyncio.timeout(10):
            while True:
                new = b.router.shard_for(room)
                if (
                    new is not None
                    and new is not old
                    and room in new.feed.rooms
                    and room in new.presence.feed.rooms
                    and frozenset({room}) in rec.resyncs
                ):
                    break
                await asyncio.sleep(0.05)
        assert new.link.addr == target.addr
        assert room not in old.feed.rooms and room not in old.presence.feed.rooms
        assert await b.publish(room, "merge", b'{"a":1}') == 1
        entry = b'{"conn":"c1","sub":null,"info":{},"j":"1"}'
        await b.presence.add(room, "c1", entry, 30)
        async with asyncio.timeout(5):
            while 1 not in rec.seqs or (room, "join") not in rec.presence:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await b.close()

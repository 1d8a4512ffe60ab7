"""The Python client's presence (docs/protocol.md, presence; client behaviour): against real
relays, `Room.presence` read at join and kept current from the events, `fetch_presence`,
and presence read again after a reconnect to another relay."""

from __future__ import annotations

import pytest

from kasagi_relay.client import Client
from kasagi_relay.client.protocol import Format
from testkit.redis import Topology, redis_server  # noqa: F401
from testkit.relay import relay_process, start_relay
from testkit.wait import until

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_room_presence_follows_joins_and_leaves(fmt: Format) -> None:
    async with (
        start_relay() as relay,
        Client(relay.url, format=fmt) as alice,
        Client(relay.url, format=fmt) as bob,
    ):
        a = await alice.join("lobby", presence=True)
        assert a.conn is not None
        assert set(a.presence) == {a.conn}  # read before join returned
        b = await bob.join("lobby")
        assert b.presence == {}  # not asked for
        await until(lambda: b.conn in a.presence)
        assert a.presence[b.conn or ""] == {"conn": b.conn, "sub": None, "info": {}}
        members = await b.fetch_presence()
        assert {m["conn"] for m in members} == {a.conn, b.conn}
        await b.leave()
        await until(lambda: b.conn not in a.presence)
        assert set(a.presence) == {a.conn}


async def test_presence_is_read_again_after_a_reconnect_to_another_relay(
    redis_server: Topology,  # noqa: F811
) -> None:
    args = ["--redis", f"redis://127.0.0.1:{redis_server.servers[0].port}/0"]
    async with (
        relay_process(*args) as one,
        relay_process(*args) as two,
        Client([one.url, two.url], min_delay=0.05, max_delay=0.1) as moving,
        Client([two.url], min_delay=0.05, max_delay=0.1) as staying,
    ):
        m = await moving.join("lobby", presence=True)
        s = await staying.join("lobby", presence=True)
        await until(lambda: s.conn in m.presence and m.conn in s.presence)
        old = m.conn
        assert await one.terminate() == 0
        # On relay two now, with a new conn: the list was read again there.
        await until(lambda: m.conn != old and set(m.presence) == {m.conn, s.conn}, 15)
        await until(lambda: set(s.presence) == {m.conn, s.conn})

"""Presence end to end (docs/protocol.md, presence): real relays, real WebSocket clients.

In process on the memory backend: the messages, the events and who gets them, a member
dropped with 1013. As subprocesses on one real redis-server and on a Sentinel topology
(the real CLI and signals), with short presence periods (`--presence-refresh 1
--presence-ttl 3`) so that the expiry of a dead relay's entries fits in a test: members on
both relays see one list, leave / close / 1013 / SIGTERM / SIGKILL give presence_leave, presence
recovers after a master failover, and 1,000 members joining and leaving in a burst end
with lists that agree with who is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

from kasagi_relay.domain import ANONYMOUS, Identity
from kasagi_relay.presence import _entry
from kasagi_relay.server import Relay
from kit.topology import call
from testkit.redis import Topology, redis_server, sentinel_topology  # noqa: F401
from testkit.relay import (
    MSGPACK,
    Client,
    connect_client,
    raw_member,
    read_frames,
    relay_process,
    start_relay,
)

FAST = ("--presence-refresh", "1", "--presence-ttl", "3")


# Messages a helper read past while waiting for something else, per client, in order.
_seen: dict[int, list[dict[str, Any]]] = {}


async def presence(client: Client, room: str, rid: int | str = 1) -> dict[str, Any]:
    await client.send({"t": "presence", "room": room, "id": rid})
    reply, before = await client.recv_until(lambda m: m["t"] in ("presence", "error"))
    _seen.setdefault(id(client), []).extend(before)
    assert reply["t"] == "presence", reply
    return reply


def sample(relay: Relay, name: str) -> float:
    """A metric as /metrics shows it (read through the registry: the tallies are added)."""
    value = relay.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def conns(reply: dict[str, Any]) -> set[str]:
    return {m["conn"] for m in reply["members"]}


async def event(client: Client, t: str, conn: str, within: float = 5.0) -> list[dict[str, Any]]:
    """Wait for `t` about `conn` (or find it among what was read past); the messages
    before it. Those stay held for later calls: events are ordered per member only (two
    members' joins on two relays may come either way round)."""

    def match(m: dict[str, Any]) -> bool:
        return bool(m["t"] == t and m["member"]["conn"] == conn)

    seen = _seen.setdefault(id(client), [])
    for i, m in enumerate(seen):
        if match(m):
            before = seen[:i]
            del seen[i]
            return before
    _, skipped = await client.recv_until(match, within)
    seen.extend(skipped)
    return list(seen)


async def agree(clients: list[Client], room: str, want: set[str], within: float) -> None:
    """Until every client's `presence` lists exactly `want` (eventual across relays)."""
    deadline = time.monotonic() + within
    while True:
        replies = [await presence(c, room) for c in clients]
        if all(conns(r) == want and r["count"] == len(want) for r in replies):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"want {sorted(want)}, got {[sorted(conns(r)) for r in replies]}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def clients(*urls: str) -> AsyncIterator[list[Client]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect_client(u)) for u in urls]


# --------------------------------------------------------------------------- in process


async def test_members_events_and_conn_in_joined() -> None:
    async with (
        start_relay() as relay,
        connect_client(relay.url) as watcher,
        connect_client(relay.url, MSGPACK) as other,
    ):
        mine = await watcher.join("r", presence=True)
        assert isinstance(mine["conn"], str) and mine["conn"]
        theirs = await other.join("r")
        assert theirs["conn"] != mine["conn"]
        # The watcher hears of the other, never of itself.
        joined = await watcher.expect("presence_join")
        assert joined == {
            "t": "presence_join",
            "room": "r",
            "member": {"conn": theirs["conn"], "sub": None, "info": {}},
        }
        reply = await presence(other, "r", rid="p")
        assert reply["id"] == "p" and reply["count"] == 2 and reply["users"] == 0
        assert conns(reply) == {mine["conn"], theirs["conn"]}
        assert sample(relay, "kasagi_presence_entries") == 2
        # Leave, join again (a new member: its join is sent again), then close.
        await other.send({"t": "leave", "room": "r"})
        await other.expect("left")
        assert (await watcher.expect("presence_leave"))["member"]["conn"] == theirs["conn"]
        await other.join("r")
        assert (await watcher.expect("presence_join"))["member"]["conn"] == theirs["conn"]
        # A second join of a member is not a new member: no event.
        await other.join("r")
        await other.ws.close()
        leave = await watcher.expect("presence_leave")
        assert leave["member"]["conn"] == theirs["conn"]
        await watcher.nothing()
        assert conns(await presence(watcher, "r")) == {mine["conn"]}
        assert sample(relay, "kasagi_presence_events_total") == 4
        assert sample(relay, "kasagi_presence_entries") == 1


async def test_a_burst_of_events_reaches_the_listeners_there_were_in_order() -> None:
    """Events the backend hands over together (a batch of writes comes back as a burst)
    go out at the end of the loop turn, one write per listener: each listener gets each
    event once and in order, except those about itself; one that stops listening in the
    turn gets none of them (it asked to go before they were sent), one that starts gets
    only those after. JSON events cut from an entry's bytes read like the encoded ones
    (MessagePack and non-ASCII entries are encoded)."""
    async with (
        start_relay() as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as b,
        connect_client(relay.url, MSGPACK) as c,
    ):
        ca = (await a.join("r", presence=True))["conn"]
        cb = (await b.join("r", presence=True))["conn"]
        cc = (await c.join("r", presence=True))["conn"]
        await event(a, "presence_join", cc)
        await event(b, "presence_join", cc)
        hub = relay.presence
        member_b = next(m for m, own in hub.watches["r"].listeners.items() if own == cb)
        x: dict[str, Any] = {"conn": "x", "sub": "ux", "info": {"name": "X", "n": [1, None]}}
        y: dict[str, Any] = {"conn": "y", "sub": "\u00fc", "info": {"name": "Zo\u00eb"}}
        a2: dict[str, Any] = {"conn": ca, "sub": None, "info": {}}  # a's connection, again
        ex, ey, ea2 = (_entry(m["conn"], Identity(m["sub"], m["info"])) for m in (x, y, a2))
        sent = sample(relay, "kasagi_presence_events_total")
        # One turn: three events, b stops listening, one more event.
        hub.on_presence("r", "join", ex)
        hub.on_presence("r", "join", ea2)
        hub.on_presence("r", "join", ey)
        assert sample(relay, "kasagi_presence_events_total") == sent  # held to the turn's end
        hub.leave("r", member_b)
        hub.on_presence("r", "leave", ex)

        def got(messages: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
            return [(m["t"], m["member"]) for m in messages]

        want_a = [("presence_join", x), ("presence_join", y), ("presence_leave", x)]
        assert got([await a.recv() for _ in range(3)]) == want_a
        want_c = [("presence_join", x), ("presence_join", a2), ("presence_join", y)]
        want_c.append(("presence_leave", x))
        assert got([await c.recv() for _ in range(4)]) == want_c
        await b.nothing()  # none of the turn's events, nor b's own leave
        await event(a, "presence_leave", cb)
        await event(c, "presence_leave", cb)

        # One turn: an event, b listens again, another event: b gets only the second.
        z: dict[str, Any] = {"conn": "z", "sub": None, "info": {}}
        ez = _entry("z", ANONYMOUS)
        hub.on_presence("r", "join", ez)
        hub.join("r", member_b, cb, ANONYMOUS, True)
        hub.listen("r", member_b)
        hub.on_presence("r", "leave", ez)
        assert got([await b.recv()]) == [("presence_leave", z)]
        await b.nothing()
        for other in (a, c):
            before = await event(other, "presence_leave", "z")
            assert ("presence_join", z) in got(before)
            await event(other, "presence_join", cb)


async def test_events_go_out_at_most_once_per_event_delay_the_first_at_once() -> None:
    """--presence-event-delay: after a quiet period an event goes out at once; the events
    that follow within the period are held until it has passed, then come together."""
    delay = 1.0  # long, so that a slow machine cannot blur the two cases
    async with (
        start_relay(presence_event_delay_s=delay) as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as b,
        connect_client(relay.url) as c,
        connect_client(relay.url) as d,
    ):
        await a.join("r", presence=True)
        await asyncio.sleep(delay + 0.2)  # quiet: a's own join's turn is past the period
        t0 = time.monotonic()
        cb = (await b.join("r"))["conn"]
        assert (await a.expect("presence_join"))["member"]["conn"] == cb
        first = time.monotonic()
        assert first - t0 < delay - 0.1  # not held
        cc = (await c.join("r"))["conn"]
        cd = (await d.join("r"))["conn"]
        got = await a.expect("presence_join", within=delay + 5)
        second = time.monotonic()
        assert got["member"]["conn"] == cc
        # Held for the period that started when b's event went out (before `first`).
        assert second - t0 >= delay - 0.05
        assert (await a.expect("presence_join", within=0.2))["member"]["conn"] == cd
        await a.nothing()


async def test_odd_entries_from_the_store_in_a_burst() -> None:
    """What another relay or a hand-edited store may hold, in one turn's events: a
    malformed entry is ignored; an entry with other fields or another `j` is sent as its
    member (conn, sub, info) only; an entry one subprotocol cannot encode is sent to
    nobody, and the events around it still go out, in order."""
    async with (
        start_relay() as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url, MSGPACK) as c,
    ):
        await a.join("r", presence=True)
        cc = (await c.join("r", presence=True))["conn"]
        await event(a, "presence_join", cc)
        hub = relay.presence
        hub.on_presence("r", "join", b'{"conn":"v","j":')
        hub.on_presence("r", "join", b'{"conn":"w","sub":null,"info":{},"x":1,"j":"1"}')
        hub.on_presence("r", "join", b'{"conn":"big","sub":null,"info":{"n":%d},"j":"2"}' % 2**70)
        hub.on_presence("r", "join", b'{"conn":"q","sub":"s","info":{"k":"v"},"j":"a-b"}')
        hub.on_presence("r", "leave", b'{"conn":"w","sub":null,"info":{},"x":1,"j":"1"}')
        w: dict[str, Any] = {"conn": "w", "sub": None, "info": {}}
        q: dict[str, Any] = {"conn": "q", "sub": "s", "info": {"k": "v"}}
        want = [("presence_join", w), ("presence_join", q), ("presence_leave", w)]
        for client in (a, c):
            got = [await client.recv() for _ in range(3)]
            assert [(m["t"], m["member"]) for m in got] == want
            await client.nothing()


async def test_bad_presence_requests_get_their_error_codes() -> None:
    async with start_relay() as relay, connect_client(relay.url) as c:
        await c.send({"t": "presence", "room": "no room", "id": 1})
        assert (await c.expect("error"))["code"] == "bad_room"
        await c.send({"t": "presence", "id": 2})
        assert (await c.expect("error"))["code"] == "bad_message"
        await c.send({"t": "join", "room": "r", "presence": "yes", "id": 3})
        err = await c.expect("error")
        assert (err["code"], err["id"]) == ("bad_message", 3)
        # Presence needs no membership; an empty room has nobody.
        reply = await presence(c, "empty")
        assert (reply["members"], reply["count"], reply["users"]) == ([], 0, 0)


async def test_a_reply_past_max_presence_members_is_truncated_with_exact_counts() -> None:
    async with (
        start_relay(max_presence_members=2) as relay,
        clients(*[relay.url] * 4) as members,
    ):
        for c in members:
            await c.join("r")
        reply = await presence(members[0], "r")
        assert (len(reply["members"]), reply["count"], reply["truncated"]) == (2, 4, True)


async def test_a_member_dropped_with_1013_gives_presence_leave() -> None:
    async with (
        start_relay(send_queue_bytes=64 * 1024, close_timeout_s=10) as relay,
        connect_client(relay.url) as writer,
        connect_client(relay.url) as watcher,
    ):
        await watcher.join("r", presence=True)
        stalled = await raw_member(relay.port, "r")
        conn = (await watcher.expect("presence_join"))["member"]["conn"]
        blob = "x" * 32000
        n = 0
        async with asyncio.timeout(30):
            while not relay.metrics.dropped_members._value.get():
                n += 1
                await writer.delta("r", merge={"blob": blob, "n": n})
        # The watcher reads on: the stalled member's leave is among what follows.
        await event(watcher, "presence_leave", conn, within=10)
        assert conn not in conns(await presence(writer, "r"))
        frames = await read_frames(stalled)
        stalled.close()
        assert frames[-1][0] == 0x8


# --------------------------------------------------------------------------- on Redis


def redis_args(topo: Topology) -> list[str]:
    return ["--redis", f"redis://127.0.0.1:{topo.servers[0].port}/0", *FAST]


def sentinel_args(topo: Topology) -> list[str]:
    sentinels = ",".join(f"{h}:{p}" for h, p in topo.sentinel_addrs)
    return ["--sentinels", sentinels, "--master", topo.master_name, *FAST]


async def flood(client: Client, room: str, stop: asyncio.Event) -> None:
    """32 KB deltas to `room`, each acknowledged before the next, until `stop`."""
    blob = "x" * 32000
    n = 0
    while not stop.is_set():
        n += 1
        await client.delta(room, merge={"blob": blob, "n": n})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["redis", "sentinel"])
async def test_two_relays_leave_close_1013_sigterm_sigkill(
    shape: str, request: pytest.FixtureRequest
) -> None:
    """On one Redis and on Sentinel (the default `--ack replica`)."""
    if shape == "redis":
        args = redis_args(request.getfixturevalue("redis_server"))
    else:
        args = sentinel_args(request.getfixturevalue("sentinel_topology"))
    # The 1013 below needs a writer that is not rate limited and a small send queue.
    args += ["--rate-limit", "0", "--rate-bytes", "0", "--send-queue-bytes", "65536"]
    async with (
        relay_process(*args) as one,
        relay_process(*args) as two,
        relay_process(*args) as doomed,
        clients(one.url, two.url, one.url, two.url, doomed.url) as (a, b, c, d, e),
    ):
        ids = {}
        for name, cl in zip("ab", (a, b), strict=True):
            ids[name] = (await cl.join("room", presence=True))["conn"]
        for name, cl in zip("cde", (c, d, e), strict=True):
            ids[name] = (await cl.join("room"))["conn"]
        everyone = set(ids.values())
        # One list and one count on both relays.
        await agree([a, b], "room", everyone, within=5)
        # a (relay one) hears of b, c, d and e; b (relay two) of c, d, e.
        for name in "bcde":
            await event(a, "presence_join", ids[name])
        # A leave, then a close, on relay two and on relay one.
        await d.send({"t": "leave", "room": "room"})
        await event(a, "presence_leave", ids["d"])
        await event(b, "presence_leave", ids["d"])
        await c.ws.close()
        await event(a, "presence_leave", ids["c"])
        await event(b, "presence_leave", ids["c"])
        # A member of relay two that stops reading is dropped with 1013 as deltas pile up
        # for it: relay one's member hears its leave.
        stalled = await raw_member(two.port, "room")
        joined, skipped = await a.recv_until(
            lambda m: m["t"] == "presence_join" and m["member"]["conn"] not in ids.values(),
            within=5,
        )
        _seen.setdefault(id(a), []).extend(skipped)
        dropped = joined["member"]["conn"]
        stop = asyncio.Event()
        writer = asyncio.create_task(flood(d, "room", stop))
        try:
            await event(a, "presence_leave", dropped, within=30)
        finally:
            stop.set()
            await writer
        frames = await read_frames(stalled)
        stalled.close()
        assert frames[-1][0] == 0x8 and frames[-1][1][:2] == (1013).to_bytes(2, "big")
        # A relay SIGKILLed with a member: its entry expires (TTL 3 s), a live relay
        # takes it out and both relays' members hear the leave.
        assert doomed.proc.returncode is None
        doomed.proc.kill()
        await doomed.proc.wait()
        t0 = time.monotonic()
        await event(a, "presence_leave", ids["e"], within=10)
        await event(b, "presence_leave", ids["e"], within=10)
        assert time.monotonic() - t0 < 3 + 1 + 2  # TTL + one refresh + slack
        await agree([a, b], "room", {ids["a"], ids["b"]}, within=2)
        # A relay stopped with SIGTERM: its members' leaves go out as it closes them.
        assert await two.terminate(signal.SIGTERM) == 0
        t0 = time.monotonic()
        await event(a, "presence_leave", ids["b"], within=5)
        assert time.monotonic() - t0 < 3  # not by expiry
        assert conns(await presence(a, "room")) == {ids["a"]}


@pytest.mark.timeout(60)
async def test_a_member_gone_before_its_entry_was_sent_is_never_announced(
    redis_server: Topology,  # noqa: F811
) -> None:
    """A join and leave queued behind a presence write under way cancel each other: the
    other relay's watcher hears nothing of that member (at most once: neither event),
    Redis never holds it, and the members around it are announced as usual."""
    port = redis_server.servers[0].port
    args = redis_args(redis_server)
    async with (
        relay_process(*args) as one,
        relay_process(*args) as two,
        clients(two.url, one.url, one.url, one.url) as (w, x, y, z),
    ):
        iw = (await w.join("room", presence=True))["conn"]
        # Writes wait on the server (well under the link's 2 s socket timeout): x's add
        # is in flight meanwhile, and what one queues after it waits behind it.
        call(port, "CLIENT", "PAUSE", "800", "WRITE")
        ix = (await x.join("room"))["conn"]
        await asyncio.sleep(0.2)
        iy = (await y.join("room"))["conn"]
        await y.send({"t": "leave", "room": "room"})
        await y.recv_until(lambda m: m["t"] == "left")
        iz = (await z.join("room"))["conn"]
        before = await event(w, "presence_join", ix)
        before += await event(w, "presence_join", iz)
        assert conns(await presence(w, "room")) == {iw, ix, iz}
        # Nothing about y was delivered, now or a while later.
        await asyncio.sleep(0.5)
        assert conns(await presence(w, "room")) == {iw, ix, iz}
        seen = before + _seen.get(id(w), [])
        about_y = [m for m in seen if m.get("member", {}).get("conn") == iy]
        assert about_y == []


@pytest.mark.timeout(60)
async def test_a_relays_own_members_are_announced_once_and_stay_while_connected(
    redis_server: Topology,  # noqa: F811
) -> None:
    """A relay tells its own listeners of its own members' joins and leaves itself, as it
    sends them to Redis: once each (Redis's copy of them, which the other relays read, is
    not delivered a second time). And what another relay says of them does not undo it: a
    relay stalled past the time to live (SIGSTOP) has its entries taken out by a live
    relay, whose members hear their leaves; the stalled relay's own listener, sharing the
    room with them all along, does not, and their entries come back with its next refresh."""
    port = redis_server.servers[0].port
    args = redis_args(redis_server)
    async with (
        relay_process(*args) as one,
        relay_process(*args) as two,
        clients(one.url, one.url, two.url) as (a, c, b),
    ):
        ia = (await a.join("room", presence=True))["conn"]
        ib = (await b.join("room", presence=True))["conn"]
        # What Redis publishes to every relay, read here as another relay would.
        sub = redis.asyncio.Redis(port=port)
        pubsub = sub.pubsub()
        await pubsub.subscribe("room:{room}:presence-events")
        try:
            ic = (await c.join("room"))["conn"]
            await event(a, "presence_join", ic)
            await event(b, "presence_join", ic)
            lines: list[bytes] = []
            async with asyncio.timeout(5):
                while not any(ic.encode() in line for line in lines):
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        lines += message["data"].split(b"\n")
            assert any(line.startswith(b'{"e":"join"') and ic.encode() in line for line in lines)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await sub.aclose()
        await asyncio.sleep(0.5)  # Redis's copy of c's join has come back to relay one
        assert [m for m in _seen.get(id(a), []) if m.get("member", {}).get("conn") == ic] == []
        await a.nothing(0.5)
        # Relay one stalls past the TTL (3 s): relay two takes its entries for dead.
        one.proc.send_signal(signal.SIGSTOP)
        try:
            await event(b, "presence_leave", ic, within=10)
            await event(b, "presence_leave", ia, within=10)
        finally:
            one.proc.send_signal(signal.SIGCONT)
        # Relay one's next refresh (1 s) writes them back; a heard nothing of c leaving.
        await agree([a, b], "room", {ia, ib, ic}, within=5)
        seen = _seen.get(id(a), [])
        assert [m for m in seen if m["t"] == "presence_leave"] == []
        await a.nothing(0.5)


@pytest.mark.timeout(120)
async def test_a_burst_of_1000_members_on_two_relays_ends_with_lists_that_agree(
    redis_server: Topology,  # noqa: F811
) -> None:
    args = [*redis_args(redis_server), "--max-connections-per-address", "0"]
    async with relay_process(*args) as one, relay_process(*args) as two:
        urls = [one.url, two.url]
        async with contextlib.AsyncExitStack() as stack:

            async def member(i: int) -> tuple[Client, str]:
                cl = await stack.enter_async_context(connect_client(urls[i % 2]))
                return cl, (await cl.join("crowd"))["conn"]

            watchers = [await stack.enter_async_context(connect_client(u)) for u in urls]
            for w in watchers:
                await w.join("crowd", presence=True)
            made = await asyncio.gather(*(member(i) for i in range(1000)))
            # Half of them go, at once: a third leave, the rest close their connections.
            going = made[::2]

            async def go(i: int, cl: Client) -> None:
                if i % 3:
                    await cl.ws.close()
                else:
                    await cl.send({"t": "leave", "room": "crowd"})

            await asyncio.gather(*(go(i, cl) for i, (cl, _) in enumerate(going)))
            want = {conn for _, conn in made[1::2]}
            watcher_ids: set[str] = set()
            for w in watchers:
                reply = await presence(w, "crowd")
                watcher_ids |= conns(reply) - {conn for _, conn in made}
            assert len(watcher_ids) == 2
            await agree(watchers, "crowd", want | watcher_ids, within=20)


# --------------------------------------------------------------------------- Sentinel


@pytest.mark.timeout(120)
async def test_presence_recovers_after_a_master_failover(
    sentinel_topology: Topology,  # noqa: F811
) -> None:
    topo = sentinel_topology
    args = [*sentinel_args(topo), "--ack", "leader"]
    async with (
        relay_process(*args) as one,
        relay_process(*args) as two,
        clients(one.url, two.url, one.url, two.url) as (a, b, c, d),
    ):
        ids: dict[Client, str] = {}
        for cl in (a, b, c, d):
            ids[cl] = (await cl.join("room", presence=cl in (a, b)))["conn"]
        everyone = set(ids.values())
        await agree([a, b], "room", everyone, within=5)
        old = topo.master_addr()
        # SIGKILL: whatever the master had not replicated is lost with it.
        topo.signal(topo.master(), signal.SIGKILL)
        await asyncio.to_thread(topo.wait_master_change, old, 30)
        # Both relays on the new master, lists whole (the replicas had the entries).
        await agree([a, b], "room", everyone, within=20)
        # A master that lacks the entries (lost in a failover): their relays write them
        # again within one refresh (1 s here).
        new = topo.master_addr()
        assert call(new[1], "DEL", "room:{room}:presence", "room:{room}:presence-exp") == 2
        assert (await presence(a, "room"))["count"] < len(everyone)
        await agree([a, b], "room", everyone, within=1 + 1)
        # Still live after the failover: a leave on relay two reaches relay one's member.
        await d.send({"t": "leave", "room": "room"})
        await event(a, "presence_leave", ids[d], within=10)
        await agree([a, b], "room", everyone - {ids[d]}, within=5)


async def test_presence_off_writes_nothing_and_answers_unavailable() -> None:
    async with start_relay(presence=False) as relay, clients(relay.url, relay.url) as (a, b):
        assert (await a.join("r", presence=True))["conn"]
        await b.join("r")
        await a.nothing()  # no events
        await a.send({"t": "presence", "room": "r", "id": 1})
        assert (await a.expect("error"))["code"] == "unavailable"
        assert sample(relay, "kasagi_presence_entries") == 0


async def test_the_http_api_lists_the_same_members() -> None:
    from tests.test_api import KEY, call

    async with start_relay(api_keys=(KEY,)) as relay, clients(relay.url, relay.url) as (a, b):
        ids = {(await c.join("r"))["conn"] for c in (a, b)}
        reply = await call(relay.port, "GET", "/api/rooms/r/presence")
        assert reply.status == 200
        body = reply.json()
        assert (body["room"], body["count"], body["users"]) == ("r", 2, 0)
        assert {m["conn"] for m in body["members"]} == ids
        assert (await call(relay.port, "GET", "/api/rooms/r/presence", key=None)).status == 401


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_token_refresh_shows_its_new_info_without_an_event(
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    from tests.test_server_auth import SECRET, authed, token

    over: dict[str, Any] = {"jwt_secret": SECRET}
    if store == "redis":
        topo = request.getfixturevalue("redis_server")
        over["redis"] = f"redis://127.0.0.1:{topo.servers[0].port}/0"
    async with start_relay(**over) as relay, clients(relay.url, relay.url) as (a, b):
        await authed(a, token(sub="alice", info={"name": "Alice"}))
        await authed(b, token(sub="bob"))
        mine = (await a.join("r", presence=True))["conn"]
        mine2 = (await a.join("r2"))["conn"]
        theirs = (await b.join("r", presence=True))["conn"]
        await event(a, "presence_join", theirs)
        before = {m["conn"]: m["info"] for m in (await presence(b, "r"))["members"]}
        assert before[mine] == {"name": "Alice"}
        await authed(a, token(sub="alice", info={"name": "Alice 2"}), rid=2)
        # The entries already written show the new info; still one member, no event.
        for room in ("r", "r2"):
            reply = await presence(b, room)
            assert {m["conn"]: m["info"] for m in reply["members"]}[mine] == {"name": "Alice 2"}
            assert reply["count"] == (2 if room == "r" else 1)
        assert mine2 == mine
        await b.nothing()
        # Its leave still takes the (re-written) entry out, with one presence_leave.
        await a.send({"t": "leave", "room": "r"})
        await a.expect("left")
        leave = await b.expect("presence_leave")
        assert leave["member"]["conn"] == mine
        assert conns(await presence(b, "r")) == {theirs}
        await b.nothing()

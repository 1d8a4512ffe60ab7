"""What only the `redis` backend does, against a real redis-server: the Function library
and the key schema of docs/protocol.md (idempotency keys with their digest, as any other
publisher sees them), ack levels (WAIT), subscriptions and their recovery when the server
goes away. The storage contract is tests/test_storage_contract.py."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from kasagi_relay.backends.base import BackendUnavailable, KeyConflict, Op, Snapshot
from kasagi_relay.backends.redis import FUNCTION_VERSION, RedisBackend
from kasagi_relay.backends.redis_link import MAX_BATCH, command
from kasagi_relay.domain import delta_digest
from testkit.redis import Topology, poll, redis_server, running_topology  # noqa: F401
from testkit.wait import until

pytestmark = pytest.mark.timeout(60)

PATCH = b'[{"op":"add","path":"/a","value":1}]'


class Recorder:
    def __init__(self) -> None:
        self.ops: dict[str, list[Op]] = {}
        self.resyncs: list[frozenset[str] | None] = []

    def on_op(self, room: str, op: Op) -> None:
        self.ops.setdefault(room, []).append(op)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        self.resyncs.append(rooms)


def url(topo: Topology) -> str:
    return f"redis://127.0.0.1:{topo.servers[0].port}/0"


@pytest.fixture
async def backend(redis_server: Topology) -> AsyncIterator[RedisBackend]:  # noqa: F811
    b = RedisBackend(url(redis_server), op_timeout_s=3.0)
    b.set_listener(Recorder())
    await b.start()
    try:
        yield b
    finally:
        await b.close()


async def raw(topo: Topology) -> aioredis.Redis:
    return aioredis.Redis(port=topo.servers[0].port, password=topo.password)


async def test_publish_key_schema(backend: RedisBackend, redis_server: Topology) -> None:  # noqa: F811
    r = await raw(redis_server)
    sub = r.pubsub()
    await sub.subscribe("room:{lobby}:channel")
    assert (await sub.get_message(timeout=1))["type"] == "subscribe"
    assert await backend.publish("lobby", "patch", PATCH) == 1
    assert await backend.publish("lobby", "merge", b'{"b":2}') == 2
    assert await r.get("room:{lobby}:seq") == b"2"
    entries = await r.xrange("room:{lobby}:ops")
    assert entries == [
        (b"1-0", {b"k": b"patch", b"d": PATCH}),
        (b"2-0", {b"k": b"merge", b"d": b'{"b":2}'}),
    ]
    msgs: list[object] = []
    while len(msgs) < 2:
        m = await sub.get_message(timeout=1)
        if m and m["type"] == "message":
            msgs.append(json.loads(m["data"]))
    assert msgs == [{"seq": 1, "patch": json.loads(PATCH)}, {"seq": 2, "merge": {"b": 2}}]
    assert (await r.fcall_ro("kasagi_version", 0)).decode() == FUNCTION_VERSION == "5"
    await sub.aclose()  # type: ignore[no-untyped-call]
    await r.aclose()


async def test_idempotency_keys_stored_with_their_digest(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """room:{R}:keys values are "<seq>:<expiry-ms>:<digest>", the digest being sha1 hex of
    "<kind>:<delta-json>" computed by the function; the hash lives 5 minutes."""
    assert await backend.publish("r", "merge", b'{"a":1}', key="k1") == 1
    r = await raw(redis_server)
    value = await r.hget("room:{r}:keys", "k1")
    assert isinstance(value, bytes)
    seq, expiry, digest = value.decode().split(":")
    assert (seq, digest) == ("1", delta_digest("merge", b'{"a":1}'))
    now_ms = int((await r.time())[0]) * 1000
    assert now_ms < int(expiry) <= now_ms + 301_000
    assert 0 < await r.pttl("room:{r}:keys") <= 300_000  # docs/protocol.md: 5 minutes
    await r.aclose()


async def test_key_conflict_for_any_publisher(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """`FCALL kasagi_publish 4 ...` stays what other services call; a key reused with
    another delta is the error KEYCONFLICT <seq>, nothing stored or published."""
    r = await raw(redis_server)
    keys = ["room:{x}:seq", "room:{x}:ops", "room:{x}:channel", "room:{x}:keys"]
    assert await r.fcall("kasagi_publish", 4, *keys, "merge", '{"a":1}', "k") == 1
    assert await r.fcall("kasagi_publish", 4, *keys, "merge", '{"a":1}', "k") == 1
    with pytest.raises(ResponseError, match=r"^KEYCONFLICT 1 "):
        await r.fcall("kasagi_publish", 4, *keys, "merge", '{"a":2}', "k")
    with pytest.raises(KeyConflict):  # the relay's view of the same
        await backend.publish("x", "merge", b'{"a":2}', key="k")
    assert await r.get("room:{x}:seq") == b"1"
    assert await r.xlen("room:{x}:ops") == 1
    # kasagi_seen with the digest conflicts too; without one it answers any delta.
    with pytest.raises(ResponseError, match="KEYCONFLICT"):
        await r.fcall("kasagi_seen", 1, "room:{x}:keys", "k", delta_digest("merge", b"{}"))
    assert await r.fcall("kasagi_seen", 1, "room:{x}:keys", "k") == 1
    await r.aclose()


async def test_keys_stored_without_a_digest_answer_any_retry(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """Entries written by library v2 ("<seq>:<expiry-ms>", no digest) keep their earlier
    meaning until they expire (5 minutes after the upgrade): a retry gets their seq."""
    r = await raw(redis_server)
    await backend.publish("old", "merge", b'{"a":1}')
    expiry = int((await r.time())[0]) * 1000 + 60_000
    await r.hset("room:{old}:keys", "legacy", f"1:{expiry}")
    assert await backend.publish("old", "merge", b'{"other":1}', key="legacy") == 1
    assert await backend.log.seen_key("old", "legacy", "merge", b'{"x":1}') == 1
    assert await backend.last_seq("old") == 1
    # An expired entry is unknown (expiry is the second field).
    await r.hset("room:{old}:keys", "gone", f"1:1:{delta_digest('merge', b'{}')}")
    assert await backend.log.seen_key("old", "gone", "merge", b"{}") is None
    await r.aclose()


async def test_read_ops_ahead_of_the_store_is_a_reset(backend: RedisBackend) -> None:
    """A reader past the stored seq holds deltas this master never had (a failover lost
    them): it must start over (the memory backend cannot lose deltas)."""
    for i in range(3):
        await backend.publish("h", "merge", f'{{"i":{i}}}'.encode())
    assert await backend.read_ops("h", 3) == []
    assert await backend.read_ops("h", 4) is None


async def test_trim_keeps_its_earlier_arguments(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """`kasagi_trim 3 ... keep-from max-len` (no max-bytes) still works: no byte limit."""
    for _ in range(6):
        await backend.publish("t", "merge", b'{"v":"%s"}' % (b"x" * 1000))
    assert await backend.write_snapshot("t", Snapshot(6, b"{}"))
    r = await raw(redis_server)
    keys = ["room:{t}:seq", "room:{t}:ops", "room:{t}:snapshot"]
    assert await r.fcall("kasagi_trim", 3, *keys, 0, 4) == 2
    assert await r.fcall("kasagi_trim", 3, *keys, 0, 4, 2500) == 2
    assert [op.seq for op in await backend.read_ops("t", 4) or []] == [5, 6]
    await r.aclose()


async def test_history_sizes_are_running_totals(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """room:{R}:sizes (kasagi.lua) holds the running byte totals the trim by bytes reads
    instead of the history; a publisher passing the earlier 4 keys keeps it too, and a
    room published before it existed (library v2) still trims."""
    r = await raw(redis_server)
    bodies = [b'{"a":1}', b'{"bb":22}', b'{"ccc":333}']
    for body in bodies[:2]:
        await backend.publish("s", "merge", body)
    keys4 = ["room:{s}:seq", "room:{s}:ops", "room:{s}:channel", "room:{s}:keys"]
    assert await r.fcall("kasagi_publish", 4, *keys4, "merge", bodies[2].decode()) == 3
    totals = [0, 7, 16, 27]
    assert [int(v) for v in await r.lrange("room:{s}:sizes", 0, -1)] == totals
    assert await backend.write_snapshot("s", Snapshot(3, b"{}"))
    await backend.trim("s", 0, 100, len(bodies[2]))
    assert [op.seq for op in await backend.read_ops("s", 2) or []] == [3]
    assert [int(v) for v in await r.lrange("room:{s}:sizes", 0, -1)] == [16, 27]
    await backend.publish("s", "merge", b"{}")
    assert [int(v) for v in await r.lrange("room:{s}:sizes", 0, -1)] == [16, 27, 29]
    # Written before the sizes existed: trims by count still work, by bytes keeps all.
    for _ in range(4):
        await backend.publish("v2", "merge", b'{"x":1}')
    await r.delete("room:{v2}:sizes")
    assert await backend.write_snapshot("v2", Snapshot(4, b"{}"))
    await backend.trim("v2", 0, 100, 1)
    assert len(await backend.read_ops("v2", 0) or []) == 4
    await backend.trim("v2", 0, 2, 1)
    assert [op.seq for op in await backend.read_ops("v2", 2) or []] == [3, 4]
    await r.aclose()


async def test_subscription_churn_leaves_nothing(backend: RedisBackend) -> None:
    """Joins and leaves of many rooms: the feed holds only the rooms subscribed now."""
    feed = backend.channel_feed
    for i in range(100):
        await backend.feed.subscribe(f"c{i}")
        await backend.log.publish(f"c{i}", "merge", b'{"a":1}')
        await backend.feed.unsubscribe(f"c{i}")
    await backend.feed.subscribe("kept")
    await backend.log.publish("kept", "merge", b'{"a":1}')
    await until(lambda: backend.channel_feed.listener is not None and "kept" in feed._recent)
    assert feed.rooms == {"kept"}
    assert set(feed._recent) == {"kept"}
    assert (await backend.health())["rooms"] == 1


async def test_a_connection_closed_under_a_command_is_retried(backend: RedisBackend) -> None:
    """uvloop raises RuntimeError ("the handler is closed") for a write on a transport
    closed under it, as when the link's pool is disconnected at a master change while a
    command connects (a failover test met it: the relay answered a `presence` request
    `internal`). The link retries it as the lost connection it is; any other RuntimeError
    is a bug and goes up at once. The fault is raised by the test's command: its timing
    (inside redis-py's connect) cannot be brought about on purpose."""
    calls = 0

    async def flaky(client: aioredis.Redis) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(
                "unable to perform operation on <TCPTransport closed=True reading=False "
                "0x5574e70077e0>; the handler is closed"
            )
        return await command(client, "PING")

    assert await backend.link.retrying("ping", flaky) is True
    assert calls == 2

    async def buggy(client: aioredis.Redis) -> object:
        nonlocal calls
        calls += 1
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        await backend.link.retrying("bug", buggy)
    assert calls == 3


async def test_function_reloaded_when_missing(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    r = await raw(redis_server)
    await r.execute_command("FUNCTION", "FLUSH")  # type: ignore[no-untyped-call]
    assert await backend.publish("f", "patch", PATCH) == 1
    assert await backend.write_snapshot("f", Snapshot(1, b"{}"))
    await r.aclose()


async def test_ack_replica_wait_and_idempotent_retry(tmp_path: Path) -> None:
    """WAIT 1 with no replica fails (the first attempt commits anyway); the retry with the
    same key returns the same seq, and once a replica exists its WAIT covers the first
    attempt even on a fresh connection (the function writes on a duplicate)."""
    with running_topology(tmp_path / "r", sentinels=False) as topo:
        b = RedisBackend(url(topo), ack="replica", wait_timeout_ms=1000, op_timeout_s=3.0)
        await b.start()
        try:
            with pytest.raises(BackendUnavailable, match="0 of 1"):
                await b.publish("w", "merge", b'{"x":1}', key="once")
            with pytest.raises(BackendUnavailable):
                await b.publish("w", "merge", b'{"x":1}', key="once")
            replica = topo.add_server("replica", topo.servers[0].addr)
            poll(lambda: topo.replicas_online(topo.servers[0]) == 1, 10, "replica online")
            assert await b.publish("w", "merge", b'{"x":1}', key="once") == 1
            assert await b.publish("w", "merge", b'{"x":2}', key="twice") == 2
            r = aioredis.Redis(port=replica.port)
            assert len(await r.xrange("room:{w}:ops") or []) == 2
            await r.aclose()
            b.ack = "all"
            assert await b.publish("w", "merge", b'{"x":3}') == 3
        finally:
            await b.close()


async def test_password(tmp_path: Path) -> None:
    with running_topology(tmp_path / "p", sentinels=False, password="s3cret") as topo:
        ok = RedisBackend(url(topo), password="s3cret")
        await ok.start()
        assert await ok.publish("p", "patch", PATCH) == 1
        assert (await ok.health())["ok"]
        await ok.close()
        bad = RedisBackend(url(topo), password="wrong")
        with pytest.raises(Exception, match=r"(?i)password|auth"):
            await bad.start()
        await bad.close()


async def test_restart_resubscribes_and_resyncs(tmp_path: Path) -> None:
    with running_topology(tmp_path / "k", sentinels=False) as topo:
        rec = Recorder()
        b = RedisBackend(url(topo), op_timeout_s=5.0, probe_interval_s=0.2, probe_timeout_s=0.5)
        b.set_listener(rec)
        await b.start()
        try:
            await b.subscribe("x")
            assert await b.publish("x", "merge", b'{"a":1}') == 1
            await until(lambda: len(rec.ops.get("x", [])) == 1)
            assert (await b.health())["ok"]
            node = topo.servers[0]
            topo.signal(node, signal.SIGKILL)
            assert not (await b.health())["ok"]
            topo.restart(node)
            await until(lambda: rec.resyncs, 10, "a resync")
            await until(lambda: b.channel_feed.ready.is_set())
            assert (await b.health())["ok"]
            # A fresh (empty) server: the function is loaded again, the room starts over.
            assert await b.publish("x", "merge", b'{"a":2}') == 1
            await until(lambda: len(rec.ops["x"]) == 2)
        finally:
            await b.close()


async def test_frozen_server_detected(tmp_path: Path) -> None:
    """SIGSTOP: no error, no EOF; the probe notices and health turns false."""
    with running_topology(tmp_path / "z", sentinels=False) as topo:
        rec = Recorder()
        b = RedisBackend(url(topo), op_timeout_s=2.0, probe_interval_s=0.2, probe_timeout_s=0.5)
        b.set_listener(rec)
        await b.start()
        node = topo.servers[0]
        try:
            await b.subscribe("x")
            topo.signal(node, signal.SIGSTOP)
            await until(lambda: not b.channel_feed.ready.is_set(), 3, "the probe to fire")
            assert not (await b.health())["ok"]
            with pytest.raises(BackendUnavailable):
                await b.publish("x", "merge", b'{"a":1}')
            topo.signal(node, signal.SIGCONT)
            await until(lambda: b.channel_feed.ready.is_set(), 5)
            assert rec.resyncs
            assert await b.publish("x", "merge", b'{"a":1}', key="k") >= 1
        finally:
            await b.close()


@pytest.mark.parametrize("pad", [0, 3000])
async def test_lost_delta_detected_after_resubscribe(tmp_path: Path, pad: int) -> None:
    """A delta delivered on the channel but not stored (a master that died between PUBLISH
    and replication), whose seq the store then reuses: after the next re-subscription,
    read_ops makes the relay reset instead of keeping the phantom. (The feed remembers
    small deltas as they are and large ones, `pad`, by a digest.)"""
    with running_topology(tmp_path / "d", sentinels=False) as topo:
        rec = Recorder()
        b = RedisBackend(url(topo), probe_interval_s=0.2, probe_timeout_s=0.5)
        b.set_listener(rec)
        await b.start()
        r = await raw(topo)
        try:
            await b.subscribe("x")
            fill = b"x" * pad
            assert await b.publish("x", "merge", b'{"a":"%b"}' % fill) == 1
            await r.publish("room:{x}:channel", b'{"seq":2,"merge":{"phantom":"%b"}}' % fill)
            assert await b.publish("x", "merge", b'{"b":"%b"}' % fill) == 2  # seq 2 reused
            await until(lambda: len(rec.ops.get("x", [])) == 3)
            assert await b.read_ops("x", 2) == []  # nothing to see before the resync
            await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
            await until(lambda: rec.resyncs, 5, "a resync")
            assert await b.read_ops("x", 2) is None  # the holder of the phantom resets
            assert [op.seq for op in await b.read_ops("x", 1) or []] == [2]  # once
            assert [op.seq for op in await b.read_ops("x", 0) or []] == [1, 2]
        finally:
            await r.aclose()
            await b.close()


async def test_relays_share_rooms_through_one_redis(redis_server: Topology) -> None:  # noqa: F811
    """`--redis URL` end to end: the factory builds the backend; two relays, a writer on
    one, a member on the other, a late joiner served from Redis."""
    from kasagi_relay.config import Config
    from testkit.relay import connect_client, start_relay

    config = Config(redis=url(redis_server), compaction_interval_s=0.2)
    async with start_relay(config) as a, start_relay(config) as b:
        assert a.backend.name == "redis" and a.config.ack_level == "leader"
        async with connect_client(b.url) as member, connect_client(a.url) as writer:
            assert (await member.join("shared"))["seq"] == 0
            for i in range(5):
                ack = await writer.delta("shared", merge={f"k{i}": i}, key=f"key{i}")
                assert ack is not None and ack["seq"] == i + 1
            again = await writer.delta("shared", merge={"k0": 0}, key="key0")
            assert again is not None and again["seq"] == 1
            got: dict[str, int] = {}
            seq = 0
            while seq < 5:
                frame = await member.expect("delta")
                assert frame["from"] == seq + 1
                seq = frame["seq"]
                got.update(frame["merge"])
            assert got == {f"k{i}": i for i in range(5)}
        async with connect_client(b.url) as late:
            joined = await late.join("shared")
            assert (joined["seq"], joined["state"]) == (5, got)
        # A keyed delta stored through one relay whose ack was lost, retried through the
        # other: it no longer applies there (k0 is gone), and the retry gets the first seq
        # instead of bad_patch, publishing nothing.
        async with connect_client(a.url) as first, connect_client(b.url) as retry:
            remove = [{"op": "remove", "path": "/k0"}]
            ack = await first.delta("shared", remove, key="rm-k0")
            assert ack is not None and ack["seq"] == 6
            if (await retry.join("shared"))["seq"] < 6:
                await retry.expect("delta")  # relay b's view has the removal: k0 is gone
            again = await retry.delta("shared", remove, key="rm-k0")
            assert again is not None and again["seq"] == 6
            await retry.send({"t": "delta", "room": "shared", "patch": remove, "key": "fresh"})
            err, _ = await retry.recv_until(lambda m: m["t"] in ("ack", "error"))
            assert err["code"] == "bad_patch"
            assert await b.backend.last_seq("shared") == 6
        health = await a.backend.health()
        assert health["ok"] and health["backend"] == "redis"


async def test_expired_keys_are_pruned(backend: RedisBackend, redis_server: Topology) -> None:  # noqa: F811
    """A key older than 5 minutes counts as new; expired keys are collected as new ones
    come in, so the keys hash stays near its live size."""
    r = await raw(redis_server)
    await r.hset("room:{e}:keys", mapping={f"old{i}": f"{i}:1" for i in range(20)})
    assert await backend.publish("e", "merge", b'{"a":1}', key="old3") == 1
    for i in range(10):
        await backend.publish("e", "merge", b'{"a":1}', key=f"new{i}")
    fields = {f.decode() if isinstance(f, bytes) else f for f in await r.hkeys("room:{e}:keys")}
    assert not any(f.startswith("old") and f != "old3" for f in fields), fields
    assert {f"new{i}" for i in range(10)} <= fields
    await r.aclose()


async def test_publish_refuses_a_stream_ahead_of_the_seq(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    r = await raw(redis_server)
    await r.xadd("room:{bad}:ops", {"k": "merge", "d": "{}"}, id="5-0")
    with pytest.raises(Exception, match="equal or smaller"):
        await backend.publish("bad", "merge", b'{"a":1}')
    assert await r.get("room:{bad}:seq") is None  # nothing burnt
    await r.aclose()


async def test_compaction_waits_out_a_lock_left_by_a_dead_compaction(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """The CI failure of test_sigkill_master, made on purpose: a compaction lock whose holder
    died (here set by hand, with a short TTL) and a room that gets no new ops after it. The
    room's snapshot must still catch up once the lock expires."""
    from kasagi_relay.compaction import Compactor
    from kasagi_relay.metrics import Metrics

    seq = 0
    for i in range(3):
        seq = await backend.publish("r", "merge", b'{"a":%d}' % i)
    r = await raw(redis_server)
    assert await r.set("room:{r}:lock", "token-of-a-dead-relay", px=1000)
    compactor = Compactor(
        backend, lambda: [("r", seq)], Metrics(), interval_s=0, history=1000, history_age_s=60
    )
    assert await compactor.run_once() == 0  # locked: nothing written, and not given up on
    assert await backend.read_snapshot("r") is None
    await asyncio.sleep(1.2)
    assert await compactor.run_once() == 1
    snap = await backend.read_snapshot("r")
    assert snap is not None and snap.seq == 3 and json.loads(snap.data) == {"a": 2}
    await r.aclose()


async def test_a_room_is_not_unloaded_while_a_join_reads_its_history(
    redis_server: Topology,  # noqa: F811
) -> None:
    """--max-loaded-rooms must not take a room whose join is still reading history (it has
    no member yet). The join waits on a frozen Redis (SIGSTOP) while a delta to another room
    needs the relay's only place: that delta gets `unavailable`; once Redis runs again the
    joiner is served and gets the room's next delta."""
    from kasagi_relay.config import Config
    from testkit.relay import connect_client, start_relay

    config = Config(redis=url(redis_server), max_loaded_rooms=1, compaction_interval_s=0)
    node = redis_server.servers[0]
    async with (
        start_relay(config) as relay,
        connect_client(relay.url) as writer,
        connect_client(relay.url) as joiner,
    ):
        # More deltas than the room keeps in memory: a join since 1 reads Redis.
        for i in range(300):
            await writer.delta("a", merge={"n": i})
        redis_server.signal(node, signal.SIGSTOP)
        try:
            await joiner.send({"t": "join", "room": "a", "since": 1})
            await asyncio.sleep(0.3)
            await writer.send({"t": "delta", "room": "b", "id": "b", "merge": {}})
            reply, _ = await writer.recv_until(lambda m: m.get("id") == "b")
            assert (reply["t"], reply.get("code")) == ("error", "unavailable"), reply
        finally:
            redis_server.signal(node, signal.SIGCONT)
        ack = await writer.delta("a", merge={"n": 300})
        assert ack is not None and ack["seq"] == 301
        # joined (resumed from 1, or the full state after a resync), then up to seq 301.
        got, _ = await joiner.recv_until(
            lambda m: m["t"] in ("delta", "reset", "joined") and m["seq"] >= 301, within=15
        )
        assert got["seq"] == 301


async def test_a_server_turned_replica_is_retried_until_it_takes_writes_again(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """The server the backend writes to becomes a replica for a while (as a demoted master
    does): its READONLY replies are retried, not raised, and the publish lands once it takes
    writes again."""
    other = redis_server.add_server("other")
    redis_server.wait_answers(other, 10)
    r = await raw(redis_server)
    try:
        await r.replicaof("127.0.0.1", other.port)
        publish = asyncio.create_task(backend.publish("ro", "merge", b'{"a":1}'))
        await asyncio.sleep(0.5)
        assert not publish.done(), publish
        await r.replicaof("NO", "ONE")
        assert await asyncio.wait_for(publish, 10) == 1
    finally:
        await r.aclose()


async def test_concurrent_publishes_go_out_together_and_fail_alone(tmp_path: Path) -> None:
    """Publishes issued in one loop turn share one pipeline and one WAIT (redis_link's
    batches): each still gets its own seq, in its own room's order, durable on the replica
    when acknowledged; a key conflict among them fails that publish only."""
    with running_topology(tmp_path / "r", sentinels=False) as topo:
        replica = topo.add_server("replica", topo.servers[0].addr)
        poll(lambda: topo.replicas_online(topo.servers[0]) == 1, 10, "replica online")
        b = RedisBackend(url(topo), ack="replica", wait_timeout_ms=1000, op_timeout_s=3.0)
        await b.start()
        try:
            assert await b.publish("c0", "merge", b'{"k":1}', key="used") == 1
            rooms = [f"c{i % 20}" for i in range(100)]
            calls = [
                b.publish(room, "merge", json.dumps({"n": n}).encode())
                for n, room in enumerate(rooms)
            ]
            calls.append(b.publish("c0", "merge", b'{"k":2}', key="used"))
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(results[-1], KeyConflict)
            assert not [r for r in results[:-1] if isinstance(r, BaseException)]
            r = aioredis.Redis(port=replica.port)
            for i in range(20):
                room = f"c{i}"
                seqs = [s for s, name in zip(results[:-1], rooms, strict=True) if name == room]
                first = 2 if i == 0 else 1
                assert seqs == list(range(first, first + 5))  # gathered in order, room by room
                entries = await r.xrange(f"room:{{{room}}}:ops") or []
                # On the replica once acknowledged, in the order of their seqs.
                assert [json.loads((e[1] or {})[b"d"])["n"] for e in entries[first - 1 :]] == [
                    n for n, name in enumerate(rooms) if name == room
                ]
            await r.aclose()
        finally:
            await b.close()


async def test_a_burst_reaches_the_feed_whole_and_in_order(backend: RedisBackend) -> None:
    """More publishes than one pipeline carries (redis_link.MAX_BATCH), in rooms whose
    names and deltas hold bytes that RESP frames by length (CRLF, `$`, `*`, non-ASCII):
    each is stored as sent, and the feed (which takes every message one socket read
    brings at once) hands the listener all of them, room by room in seq order, exactly
    as stored."""
    recorder = Recorder()
    backend.set_listener(recorder)
    rooms = ["plain", "caf\u00e9 \u65e5\u672c", "a$3*1:{x}"]
    for room in rooms:
        await backend.subscribe(room)
    sent: dict[str, list[bytes]] = {room: [] for room in rooms}
    calls = []
    for n in range(600):
        room = rooms[n % 3]
        body = json.dumps({"n": n, "s": "x\r\n$5\r\n*2\r\n\u00e9" * (n % 7)}).encode()
        sent[room].append(body)
        calls.append(backend.publish(room, "merge", body))
    await asyncio.gather(*calls)
    await until(lambda: sum(len(v) for v in recorder.ops.values()) >= 600, what="600 deltas")
    for room in rooms:
        got = recorder.ops[room]
        assert [op.seq for op in got] == list(range(1, 201))
        stored = await backend.read_ops(room, 0) or []
        # The channel's message is the stored entry with its seq in front.
        assert [(op.seq, json.loads(op.delta)) for op in stored] == [
            (op.seq, {k: v for k, v in json.loads(op.delta).items() if k != "seq"}) for op in got
        ]
        # Concurrent publishes have no order among themselves: each is stored once, as sent.
        assert sorted(json.loads(op.delta)["merge"]["n"] for op in got) == sorted(
            json.loads(b)["n"] for b in sent[room]
        )
        assert {json.dumps(json.loads(op.delta)["merge"]).encode() for op in got} == set(sent[room])


class Answers:
    """What `RedisLog.publish_soon` answered, per delta, in the order deltas were handed over."""

    def __init__(self) -> None:
        self.got: dict[int, tuple[int | None, BaseException | None]] = {}
        self.calls = 0

    def done(self, n: int) -> Callable[[int | None, BaseException | None], None]:
        def answered(seq: int | None, exc: BaseException | None) -> None:
            assert n not in self.got, f"delta {n} answered twice"
            self.calls += 1
            self.got[n] = (seq, exc)

        return answered


async def test_deltas_handed_over_inline_get_seqs_in_that_order(tmp_path: Path) -> None:
    """`publish_soon` joins the link's batch at once (no task), or, while the link must first
    ask something (here `--ack all`: how many replicas are connected, asked again every
    second), waits on the slow path; the deltas after it wait too, so one room's deltas
    handed over one after another, some in the same loop turn, get seqs in that order
    across both paths, each answered once and durable on the replica."""
    with running_topology(tmp_path / "r", sentinels=False) as topo:
        replica = topo.add_server("replica", topo.servers[0].addr)
        poll(lambda: topo.replicas_online(topo.servers[0]) == 1, 10, "replica online")
        b = RedisBackend(url(topo), ack="all", wait_timeout_ms=1000, op_timeout_s=3.0)
        await b.start()
        try:
            log = b.store_log
            answers = Answers()
            n = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5  # past one expiry of the replica count
            while loop.time() < end:
                for _ in range(1 + n % 3):
                    log.publish_soon("o", "merge", b'{"n":%d}' % n, None, answers.done(n))
                    n += 1
                await asyncio.sleep(0.002 if n % 7 else 0)
            await until(lambda: answers.calls == n, what=f"{n} answers")
            assert all(exc is None for _, exc in answers.got.values()), answers.got
            assert [answers.got[i][0] for i in range(n)] == list(range(1, n + 1))
            r = aioredis.Redis(port=replica.port)
            entries = await r.xrange("room:{o}:ops") or []
            assert [json.loads((e[1] or {})[b"d"])["n"] for e in entries] == list(range(n))
            await r.aclose()
            # White-box, the race above made certain: the replica count becomes known
            # between two deltas (as when another publish's INFO is answered in that turn);
            # the second must not overtake the first, which is still on the slow path.
            b.link._replicas_cache = (0.0, 0)  # expired
            log.publish_soon("o", "merge", b'{"n":%d}' % n, None, answers.done(n))
            b.link._replicas_cache = (loop.time(), 1)
            log.publish_soon("o", "merge", b'{"n":%d}' % (n + 1), None, answers.done(n + 1))
            await until(lambda: answers.calls == n + 2, what="2 more answers")
            assert [answers.got[n], answers.got[n + 1]] == [(n + 1, None), (n + 2, None)]
        finally:
            await b.close()


async def test_batches_in_flight_together_keep_their_order(backend: RedisBackend) -> None:
    """Batches of one room's deltas written while earlier ones still wait for their replies
    run in the order they were written: a large batch (Redis reads 16 KiB of a connection
    at a time) and small ones after it, each in a loop turn of its own. Written on
    connections of their own, a small batch ran between two parts of the large one."""
    log = backend.store_log
    answers = Answers()
    pad = "x" * 2000
    n = 0
    for turn in range(20):
        for _ in range(100 if turn % 5 == 0 else 1):
            log.publish_soon(
                "in-order", "merge", b'{"n":%d,"p":"%s"}' % (n, pad.encode()), None, answers.done(n)
            )
            n += 1
        await asyncio.sleep(0)
    await until(lambda: answers.calls == n, what=f"{n} answers")
    assert all(exc is None for _, exc in answers.got.values()), answers.got
    assert [answers.got[i][0] for i in range(n)] == list(range(1, n + 1))
    stored = await backend.read_ops("in-order", 0) or []
    assert [json.loads(op.delta)["merge"]["n"] for op in stored] == list(range(n))


async def test_deltas_behind_a_wait_that_times_out_share_the_next_one(tmp_path: Path) -> None:
    """`--ack replica` with no replica: every WAIT runs to its timeout. The link's batches
    share one connection, where Redis holds what follows a WAIT until it returns, so the
    deltas handed over meanwhile (here 8x a batch's size) go out together behind one WAIT,
    rather than as capped batches each waiting its own timeout in turn (their answers
    would come one timeout apart). Each is answered once, not acknowledged."""
    with running_topology(tmp_path / "r", sentinels=False) as topo:
        b = RedisBackend(url(topo), ack="replica", wait_timeout_ms=300, op_timeout_s=3.0)
        await b.start()
        r = await raw(topo)
        try:
            log = b.store_log
            answers = Answers()
            log.publish_soon("w", "merge", b'{"n":0}', None, answers.done(0))
            await asyncio.sleep(0.05)  # its WAIT is under way
            n = 1
            while n <= 8 * MAX_BATCH:
                for _ in range(100):
                    log.publish_soon("w", "merge", b'{"n":%d}' % n, None, answers.done(n))
                    n += 1
                await asyncio.sleep(0)
            await until(lambda: answers.calls == n, 10, f"{n} answers")
            for seq, exc in answers.got.values():
                assert seq is None and isinstance(exc, BackendUnavailable), (seq, exc)
                assert "0 of 1 replica" in str(exc)
            waits = (await r.info("commandstats"))["cmdstat_wait"]["calls"]
            assert waits == 2, waits
        finally:
            await r.aclose()
            await b.close()


async def test_deltas_handed_over_inline_are_retried_or_refused_alone(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """A batch of `publish_soon` deltas that the server refused (its function library was
    flushed) is retried on the slow path: each is stored once and answered once. A key
    reused with another delta is refused alone (KeyConflict), and later deltas take the
    inline path again, in order."""
    r = await raw(redis_server)
    log = backend.store_log
    answers = Answers()
    await r.execute_command("FUNCTION", "FLUSH")  # type: ignore[no-untyped-call]
    for n in range(20):
        key = f"k{n}" if n % 2 else None
        log.publish_soon("f", "merge", b'{"n":%d}' % n, key, answers.done(n))
    await until(lambda: answers.calls == 20, what="20 answers")
    assert all(exc is None for _, exc in answers.got.values()), answers.got
    assert sorted(seq or 0 for seq, _ in answers.got.values()) == list(range(1, 21))
    stored = await backend.read_ops("f", 0) or []
    by_seq = {op.seq: json.loads(op.delta)["merge"]["n"] for op in stored}
    assert by_seq == {seq: n for n, (seq, _) in answers.got.items()}
    log.publish_soon("f", "merge", b'{"n":0}', "k1", answers.done(20))  # k1 holds {"n":1}
    log.publish_soon("f", "merge", b'{"n":1}', "k1", answers.done(21))  # a retry of k1
    for n in range(22, 30):
        log.publish_soon("f", "merge", b'{"n":%d}' % n, None, answers.done(n))
    await until(lambda: answers.calls == 30, what="30 answers")
    seq, exc = answers.got[20]
    assert seq is None and isinstance(exc, KeyConflict) and exc.seq == answers.got[1][0]
    assert answers.got[21] == (answers.got[1][0], None)
    assert [answers.got[n] for n in range(22, 30)] == [(s, None) for s in range(21, 29)]
    await r.aclose()


async def test_deltas_handed_over_while_earlier_ones_wait_to_retry_get_seqs_after_them(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """The server refuses two batches of `publish_soon` deltas (its function library was
    flushed): they wait to retry, in order, and the deltas handed over meanwhile (during
    the library's reload and the backoff nap) wait behind them rather than overtake. A
    room's deltas handed over one after another get seqs in that order, however many
    tries it took (a delta may depend on the one before it)."""
    r = await raw(redis_server)
    log = backend.store_log
    answers = Answers()
    await r.execute_command("FUNCTION", "FLUSH")  # type: ignore[no-untyped-call]
    n = 0
    for turn in range(12):
        for _ in range(10 if turn < 2 else 3):
            key = f"k{n}" if n % 2 else None
            log.publish_soon("retry-order", "merge", b'{"n":%d}' % n, key, answers.done(n))
            n += 1
        await asyncio.sleep(0 if turn < 2 else 0.005)
    await until(lambda: answers.calls == n, what=f"{n} answers")
    assert all(exc is None for _, exc in answers.got.values()), answers.got
    assert [answers.got[i][0] for i in range(n)] == list(range(1, n + 1))
    stored = await backend.read_ops("retry-order", 0) or []
    assert [json.loads(op.delta)["merge"]["n"] for op in stored] == list(range(n))
    await r.aclose()


async def test_deltas_handed_over_while_the_master_is_down_wait_in_order_or_time_out(
    tmp_path: Path,
) -> None:
    """The master is killed: the deltas handed over meanwhile, keyed or not, are never sent,
    so they wait on the slow path in hand-over order. When a master is back within
    op_timeout_s (here the same one restarted, empty: it has no persistence and needs the
    function library again) they are stored in that order; when none comes back they are
    answered BackendUnavailable once op_timeout_s has run out (keyed ones: an unkeyed one
    already written is answered at once, as it may be stored), each once."""
    with running_topology(tmp_path / "r", sentinels=False) as topo:
        b = RedisBackend(url(topo), op_timeout_s=3.0)
        await b.start()
        node = topo.servers[0]
        try:
            log = b.store_log
            answers = Answers()
            topo.signal(node, signal.SIGKILL)
            n = 0
            for _ in range(10):
                for _ in range(3):
                    key = f"k{n}" if n % 2 else None
                    log.publish_soon("down", "merge", b'{"n":%d}' % n, key, answers.done(n))
                    n += 1
                await asyncio.sleep(0.05)
            assert answers.calls == 0
            await asyncio.to_thread(topo.restart, node)
            await until(lambda: answers.calls == n, 5, f"{n} answers")
            assert [answers.got[i] for i in range(n)] == [(i + 1, None) for i in range(n)]
            stored = await b.read_ops("down", 0) or []
            assert [json.loads(op.delta)["merge"]["n"] for op in stored] == list(range(n))

            topo.signal(node, signal.SIGKILL)
            loop = asyncio.get_running_loop()
            handed = loop.time()
            # Keyed: a delta written to the dead connection before its EOF was read is
            # retried too (unkeyed, it would be answered at once: maybe stored).
            log.publish_soon("down", "merge", b'{"n":-1}', "late-1", answers.done(n))
            log.publish_soon("down", "merge", b'{"n":-2}', "late-2", answers.done(n + 1))
            await until(lambda: answers.calls == n + 2, 8, "2 more answers")
            waited = loop.time() - handed
            for i in (n, n + 1):
                seq, exc = answers.got[i]
                assert seq is None and isinstance(exc, BackendUnavailable), (seq, exc)
                assert "no writable master" in str(exc)
            # Retried until the op timeout (less one backoff step, at most 0.25 s), not less.
            assert waited >= 2.5, waited
        finally:
            await b.close()


async def test_a_connection_lost_under_inline_deltas_fails_unkeyed_ones_only(
    backend: RedisBackend,
    redis_server: Topology,  # noqa: F811
) -> None:
    """The link's connection dies with a batch of `publish_soon` deltas sent and held by the
    server (CLIENT PAUSE ... WRITE): whether they ran is unknown, so a delta without an
    idempotency key is answered `BackendUnavailable` (resend with a key), and a keyed one
    is retried and stored once."""
    r = await raw(redis_server)
    log = backend.store_log
    answers = Answers()
    await r.execute_command("CLIENT", "PAUSE", 2000, "WRITE")  # type: ignore[no-untyped-call]
    try:
        for n in range(10):
            key = f"k{n}" if n % 2 else None
            log.publish_soon("lost", "merge", b'{"n":%d}' % n, key, answers.done(n))
        await asyncio.sleep(0.3)  # sent, held by the pause
        assert answers.calls == 0
        killed = await r.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
        )
        assert killed >= 1
    finally:
        await r.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
    await until(lambda: answers.calls == 10, what="10 answers")
    for n in range(0, 10, 2):
        seq, exc = answers.got[n]
        assert seq is None and isinstance(exc, BackendUnavailable), (n, answers.got[n])
        assert "resend with an idempotency key" in str(exc)
    keyed = sorted(answers.got[n][0] or 0 for n in range(1, 10, 2))
    assert keyed == list(range(1, 6))
    entries = await r.xrange("room:{lost}:ops") or []
    assert sorted(json.loads((e[1] or {})[b"d"])["n"] for e in entries) == [1, 3, 5, 7, 9]
    await r.aclose()

"""The room service without any transport (service.py): publish, idempotency keys, join and
leave on a real MemoryBackend; and idempotency keys across two relays on one real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.config import Config
from kasagi_relay.domain import ANONYMOUS, Identity
from kasagi_relay.metrics import Metrics
from kasagi_relay.protocol import BadRequest
from kasagi_relay.registry import RoomRegistry
from kasagi_relay.service import KEY_CONFLICT, RoomService
from testkit.redis import Topology, redis_server  # noqa: F401
from testkit.relay import connect_client, start_relay

ADD_X = b'[{"op":"add","path":"/x","value":1}]'
ADD_Y = b'[{"op":"add","path":"/y","value":2}]'
REMOVE_X = b'[{"op":"remove","path":"/x"}]'


@contextlib.asynccontextmanager
async def service(max_state_bytes: int = 1 << 20) -> AsyncIterator[RoomService]:
    backend = MemoryBackend()
    metrics = Metrics()
    registry = RoomRegistry(
        backend, metrics, max_loaded=10, idle_s=60, tick_s=0, max_state_bytes=max_state_bytes
    )
    backend.set_listener(registry)
    await backend.start()
    try:
        yield RoomService(registry, backend, metrics)
    finally:
        await registry.close()
        await backend.close()


async def test_publish_sequences_deltas() -> None:
    async with service() as svc:
        assert await svc.publish("r", "patch", ADD_X, None) == 1
        assert await svc.publish("r", "merge", b'{"z":3}', None) == 2
        assert await svc.publish("other", "merge", b"{}", None) == 1


async def test_a_key_retried_with_its_delta_gets_the_first_seq() -> None:
    async with service() as svc:
        assert await svc.publish("r", "patch", ADD_X, "k1") == 1
        assert await svc.publish("r", "patch", ADD_X, "k1") == 1
        # A remove that applied no longer applies: its retry still gets its seq.
        assert await svc.publish("r", "patch", REMOVE_X, "k2") == 2
        assert await svc.publish("r", "patch", REMOVE_X, "k2") == 2
        assert svc.registry.rooms["r"].last_seq == 2  # nothing stored twice


async def test_a_key_used_with_another_delta_is_key_conflict_and_nothing_is_stored() -> None:
    """Issue 11, item 10: it was acknowledged with the other delta's seq and lost."""
    async with service() as svc:
        assert await svc.publish("r", "patch", ADD_X, "k1") == 1
        with pytest.raises(BadRequest) as info:
            await svc.publish("r", "patch", ADD_Y, "k1")
        assert info.value.code == KEY_CONFLICT
        with pytest.raises(BadRequest) as info:
            await svc.publish("r", "merge", b'{"x":1}', "k1")  # same JSON, other kind
        assert info.value.code == KEY_CONFLICT
        # Keys are per room; the key is not spent by the refusal.
        assert await svc.publish("r2", "patch", ADD_Y, "k1") == 1
        assert await svc.publish("r", "patch", ADD_X, "k1") == 1
        assert svc.registry.rooms["r"].last_seq == 1


async def test_errors_are_the_protocol_errors() -> None:
    async with service(max_state_bytes=100) as svc:
        with pytest.raises(BadRequest) as info:
            await svc.publish("r", "patch", REMOVE_X, None)
        assert info.value.code == "bad_patch"
        with pytest.raises(BadRequest) as info:
            await svc.publish("r", "merge", b'{"a":"' + b"x" * 200 + b'"}', None)
        assert info.value.code == "too_large"
        assert await svc.drain(1.0) == 0
        with pytest.raises(BadRequest) as info:
            await svc.publish("r", "merge", b"{}", None)
        assert info.value.code == "unavailable"


def test_service_module_needs_no_websockets() -> None:
    import ast
    from pathlib import Path

    import kasagi_relay.service as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "websockets" not in imported


# --------------------------------------------------------------------------- two relays


@pytest.mark.timeout(60)
async def test_key_conflict_across_two_relays(redis_server: Topology) -> None:  # noqa: F811
    """Two relays share one Redis: a key used on relay A with one delta and on relay B with
    another is key_conflict on B (B's own key cache has never seen it), not a silent ack."""
    url = f"redis://127.0.0.1:{redis_server.servers[0].port}/0"
    config = Config(redis=url)
    async with (
        start_relay(config) as a,
        start_relay(config) as b,
        connect_client(a.url) as on_a,
        connect_client(b.url) as on_b,
    ):
        ack = await on_a.delta("r", merge={"from": "a"}, key="k1", id=1)
        assert ack is not None and ack["seq"] == 1
        # B has never seen k1: only the backend knows it was stored with another delta.
        await on_b.send({"t": "delta", "room": "r", "id": 2, "key": "k1", "merge": {"b": 1}})
        reply, _ = await on_b.recv_until(lambda m: m["t"] in ("ack", "error"))
        assert (reply["t"], reply.get("code"), reply["id"]) == ("error", "key_conflict", 2)
        # The same delta retried through B is a retry: its first seq.
        retry = await on_b.delta("r", merge={"from": "a"}, key="k1", id=3)
        assert retry is not None and retry["seq"] == 1
        state = (await on_b.join("r"))["state"]
        assert state == {"from": "a"}


@pytest.mark.timeout(60)
async def test_key_conflict_across_two_relays_when_the_delta_no_longer_applies(
    redis_server: Topology,  # noqa: F811
) -> None:
    """A keyed delta that no longer applies is answered from the backend's record of its key
    (its first attempt may have been stored, its ack lost): with another delta under that
    key it is key_conflict, not the other delta's seq."""
    url = f"redis://127.0.0.1:{redis_server.servers[0].port}/0"
    config = Config(redis=url)
    async with (
        start_relay(config) as a,
        start_relay(config) as b,
        connect_client(a.url) as on_a,
        connect_client(b.url) as on_b,
    ):
        ack = await on_a.delta("r", [{"op": "add", "path": "/x", "value": 1}], key="k1")
        assert ack is not None and ack["seq"] == 1
        remove = [{"op": "remove", "path": "/nothing"}]
        await on_b.send({"t": "delta", "room": "r", "id": 2, "key": "k1", "patch": remove})
        reply, _ = await on_b.recv_until(lambda m: m["t"] in ("ack", "error"))
        assert (reply["t"], reply.get("code"), reply["id"]) == ("error", "key_conflict", 2)


# ---------------------------------------------------------------------- identity


def test_identity_rights_add_up_over_patterns() -> None:
    who = Identity(sub="ann", rooms={"match-42.*": "r", "match-42.chat": "w", "lobby": "rw"})
    assert who.can("r", "match-42.chat") and who.can("w", "match-42.chat")
    assert who.can("r", "match-42.board") and not who.can("w", "match-42.board")
    assert who.can("w", "lobby") and not who.can("r", "lobby2")
    assert not who.can("r", "match-4")  # a prefix pattern matches only its prefix
    assert Identity(rooms={"*": "r"}).can("r", "anything")
    assert ANONYMOUS.can("w", "anything")  # no grants: a relay without keys allows all

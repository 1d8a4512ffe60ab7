"""The room service: what a client may do to a room, whatever transport carried the request.

The WebSocket session (session.py) and the HTTP API (api.py) call it. Nothing here
knows about sockets: requests come in as arguments, failures go out as `BadRequest` with
the error code of docs/protocol.md.

Where a delta goes (docs/design.md):
- parsed and validated by protocol.parse (session.py calls it; api.py calls
  protocol.parse_delta_body, the same checks), then here:
- authorized in `authorize` against the caller's `Identity` (its token's grants; every
  right on an anonymous relay),
- checked against the room's state and the size limit (`publish`, room.check),
- ordered by the backend (`backend.publish` gives it its seq), merged into the room's
  state when it comes back from the backend (room.py), and sent to the members by
  fanout.broadcast.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Literal, cast

from kasagi_relay import delta
from kasagi_relay.backends.base import Backend
from kasagi_relay.domain import (
    ANONYMOUS,
    IDEMPOTENCY_TTL_S,
    BackendUnavailable,
    DeltaKind,
    Identity,
    KeyConflict,
    Right,
    delta_digest,
)
from kasagi_relay.fanout import Member, Payload
from kasagi_relay.loops import running_loop
from kasagi_relay.metrics import Metrics
from kasagi_relay.presence import PresenceHub, PresenceView
from kasagi_relay.protocol import BadRequest, ErrorCode, RequestId, delta_doc
from kasagi_relay.registry import RoomRegistry
from kasagi_relay.room import Room

__all__ = ["KEY_CONFLICT", "KEY_SCOPE_SEPARATOR", "RoomService", "scoped_key"]

# docs/protocol.md (v1.1): the same idempotency key with another delta. protocol.ErrorCode
# gains the literal in the same wave; until both land this names it in one place (cast
# from a `str`, so that the cast stays valid, and not redundant, once ErrorCode has it).
_KEY_CONFLICT_NAME: str = "key_conflict"
KEY_CONFLICT: Final = cast(ErrorCode, _KEY_CONFLICT_NAME)
# Keys this relay acknowledged, so that a retried delta whose patch no longer applies (it
# already did) still gets its first ack rather than bad_patch, and so that another delta
# under a key is refused before it reaches the backend.
KEY_CACHE_SIZE: Final = 100_000

Action = Literal["join", "publish", "read", "presence"]
# docs/protocol.md, "Idempotency keys": with identity a key is stored as `<sub>\x1f<key>`,
# so two users' keys never meet; anonymous keys are stored as sent. (A client key holds no
# \x1f in practice, and if it did it would only collide with itself under the same sub.)
KEY_SCOPE_SEPARATOR: Final = "\x1f"


def scoped_key(key: str | None, who: Identity) -> str | None:
    """The idempotency key as stored (the key cache, the backend): scoped by `sub`."""
    if key is None or who.sub is None:
        return key
    return who.sub + KEY_SCOPE_SEPARATOR + key


class RoomService:
    """Join, leave and publish on the rooms of a registry, within the relay's limits."""

    def __init__(
        self,
        registry: RoomRegistry,
        backend: Backend,
        metrics: Metrics,
        presence: PresenceHub | None = None,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.metrics = metrics
        # Who is in each room (docs/protocol.md, presence); None: presence not served.
        self.presence_hub = presence
        self.closing = False
        self.inflight = 0
        self._inflight_done = asyncio.Event()
        # (room, key) -> (seq, digest of the delta, expiry on the monotonic clock)
        self._keys: OrderedDict[tuple[str, str], tuple[int, str, float]] = OrderedDict()
        # The backend log's inline entry points (looked up once per log, see `_hand_over`).
        self._log: object = None
        self._publish_now: Callable[..., int | None] | None = None
        self._publish_soon: Callable[..., None] | None = None

    # ------------------------------------------------------------------ requests

    def authorize(self, action: Action, room: str, who: Identity) -> None:
        """Refuse, with BadRequest("forbidden"), what `who`'s grants do not allow: one
        check for every transport (the WebSocket session and the HTTP API)."""
        right: Right = "w" if action == "publish" else "r"
        if not who.can(right, room):
            self.metrics.forbidden.labels(action).inc()
            raise BadRequest("forbidden", f"no {right!r} right on room {room!r}")

    async def publish(
        self,
        room: str,
        kind: DeltaKind,
        body: bytes,
        key: str | None,
        who: Identity = ANONYMOUS,
    ) -> int:
        """Sequence one delta (already validated by protocol.parse) in `room`; its seq.

        A retry under the same key gets the first seq; another delta under a key already
        used is `key_conflict`, as are the errors of docs/protocol.md (bad_patch,
        too_large, unavailable)."""
        started = await self.start_publish(room, kind, body, key, who)
        return started if isinstance(started, int) else await started

    async def start_publish(
        self,
        room: str,
        kind: DeltaKind,
        body: bytes,
        key: str | None,
        who: Identity = ANONYMOUS,
        on_done: Callable[[asyncio.Future[int]], None] | None = None,
    ) -> int | asyncio.Future[int]:
        """`publish` in two steps, so that one connection can have several deltas in
        flight (session.py): this coroutine does everything up to handing the delta to the
        backend (authorization, the key cache, the room's check) and raises what those
        refuse; it returns the seq when it is known already (a known key, the memory
        backend), else a future that holds the seq or the BadRequest of the backend's
        answer. Calls made one after another hand their deltas to the backend in that
        order, so they get seqs in that order. `on_done(future)` runs when the future is
        done, before the publish stops counting in `inflight` (a graceful shutdown sends
        the ack before it closes the connection)."""
        started = self.start_publish_now(room, kind, body, key, who, on_done)
        if started is not None:
            return started
        digest = delta_digest(kind, body) if key is not None else ""
        try:
            return await self._start(room, kind, body, scoped_key(key, who), key, digest, on_done)
        except (BackendUnavailable, KeyConflict) as exc:
            raise self._refused(exc, key) from None

    def start_publish_now(
        self,
        room: str,
        kind: DeltaKind,
        body: bytes,
        key: str | None,
        who: Identity = ANONYMOUS,
        on_done: Callable[[asyncio.Future[int]], None] | None = None,
    ) -> int | asyncio.Future[int] | None:
        """`start_publish` without a coroutine, when nothing has to wait (the room is
        loaded, its check is small and passes or fails for good): the session serves most
        deltas this way straight from the socket's callback. None: nothing was done, await
        `start_publish`. Raises BadRequest as it does."""
        self._check_open()
        self.authorize("publish", room, who)
        digest = delta_digest(kind, body) if key is not None else ""
        client_key = key
        key = scoped_key(key, who)
        if key is not None:
            known = self._known_key(room, key, digest)
            if known is not None:
                return known
        r = self.registry.get(room)
        if r is None or r.state is None:
            return None  # loaded by `_start`
        r.last_active = time.monotonic()
        doc = delta_doc(kind, body)
        try:
            if not r.check_now(doc):
                return None  # checked by `_start`, off the loop or after a wait
        except delta.DeltaError as exc:
            if key is not None:
                return None  # a retry's first answer is looked up by `_start`
            raise self._bad_delta(exc) from None
        try:
            return self._hand_over(r, kind, body, key, client_key, digest, on_done, doc)
        except (BackendUnavailable, KeyConflict) as exc:
            raise self._refused(exc, client_key) from None

    async def _start(
        self,
        name: str,
        kind: DeltaKind,
        body: bytes,
        key: str | None,
        client_key: str | None,
        digest: str,
        on_done: Callable[[asyncio.Future[int]], None] | None,
    ) -> int | asyncio.Future[int]:
        room = self.registry.get(name) or await self.registry.load(name)
        room.last_active = time.monotonic()  # before any await: not idle, not evicted
        if room.state is None:
            await room.ensure_loaded()
        doc = delta_doc(kind, body)
        try:
            # Checked on the loop when small and free (most deltas), else off it.
            if not room.check_now(doc):
                await room.check(doc)
        except delta.DeltaError as exc:
            # A retry of a delta that was stored although its ack was lost (a dropped
            # connection, a failover, another relay) no longer applies: answer what the
            # first attempt got, as publish would, rather than bad_patch.
            seq = None
            if key is not None:
                # Raises KeyConflict for a key stored with another delta (caught in
                # start_publish): the digest is compared, not only the key.
                seq = await self.backend.log.seen_key(name, key, kind, body)
            if seq is None:
                raise self._bad_delta(exc) from None
            return seq
        return self._hand_over(room, kind, body, key, client_key, digest, on_done, doc)

    def _bad_delta(self, exc: delta.DeltaError) -> BadRequest:
        """What the client is told of a delta that does not apply to the room's state."""
        if isinstance(exc, delta.TooLarge):
            # The rooms hold the limit (the engine enforces it exactly).
            reason = f"the room's state would pass {self.registry.max_state_bytes} bytes"
            if "memory" in str(exc):  # --max-state-memory (the engine's estimate)
                reason = (
                    f"the room's state would pass {self.registry.max_state_memory} bytes of memory"
                )
            return BadRequest("too_large", reason)
        return BadRequest("bad_patch", str(exc))

    def _hand_over(
        self,
        room: Room,
        kind: DeltaKind,
        body: bytes,
        key: str | None,
        client_key: str | None,
        digest: str,
        on_done: Callable[[asyncio.Future[int]], None] | None,
        doc: bytes,
    ) -> int | asyncio.Future[int]:
        """Give the checked delta (`doc`: its delta document) to the backend, without
        awaiting anything."""
        log = self.backend.log
        if log is not self._log:
            self._log = log
            self._publish_now = getattr(log, "publish_now", None)
            self._publish_soon = getattr(log, "publish_soon", None)
        # A backend whose publish never waits (the memory one) sequences a delta inline,
        # without a task (backends/memory.py, MemoryLog.publish_now).
        publish_now = self._publish_now
        if publish_now is not None:
            now: int | None = publish_now(room.name, kind, body, key, doc)  # KeyConflict: caller
            if now is not None:
                self._published(room, key, now, digest)
                return now
        # Deltas handed over one after the other join the backend's queue (the Redis
        # link's batch) in that order: at once when the backend takes a delta without a
        # coroutine (RedisLog.publish_soon, which answers through `_settle`), else in a
        # task created now (tasks start in the order they were created).
        self.inflight += 1
        ticket = room.begin_publish()
        loop = running_loop()
        publish_soon = self._publish_soon
        if publish_soon is not None:
            fut: asyncio.Future[int] = loop.create_future()
            settle = functools.partial(
                self._settle, fut, room, ticket, key, client_key, digest, on_done
            )
            publish_soon(room.name, kind, body, key, settle)
            return fut
        task = loop.create_task(self._send(room, kind, body, key, client_key, digest, ticket))
        if on_done is not None:
            task.add_done_callback(on_done)
        task.add_done_callback(self._sent)  # after on_done: callbacks run in this order
        return task

    async def _send(
        self,
        room: Room,
        kind: DeltaKind,
        body: bytes,
        key: str | None,
        client_key: str | None,
        digest: str,
        ticket: int,
    ) -> int:
        seq: int | None = None
        try:
            seq = await self.backend.log.publish(room.name, kind, body, key)
        except (BackendUnavailable, KeyConflict) as exc:
            raise self._refused(exc, client_key) from None
        finally:
            room.end_publish(ticket, seq)
        self._published(room, key, seq, digest)
        return seq

    def _settle(
        self,
        fut: asyncio.Future[int],
        room: Room,
        ticket: int,
        key: str | None,
        client_key: str | None,
        digest: str,
        on_done: Callable[[asyncio.Future[int]], None] | None,
        seq: int | None,
        exc: BaseException | None,
    ) -> None:
        """The backend's answer to a delta handed over by `publish_soon`: what `_send` and
        the task's done callbacks do, called at once rather than one loop turn later."""
        room.end_publish(ticket, seq)
        try:
            if exc is None:
                assert seq is not None
                self._published(room, key, seq, digest)
                if not fut.done():  # else cancelled by its awaiter (`publish`'s task was)
                    fut.set_result(seq)
            elif fut.done():
                pass  # cancelled by its awaiter
            elif isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            elif isinstance(exc, (BackendUnavailable, KeyConflict)):
                fut.set_exception(self._refused(exc, client_key))
            else:
                fut.set_exception(exc)
            if on_done is not None:
                on_done(fut)
        finally:
            self._sent(fut)

    def _refused(self, exc: BackendUnavailable | KeyConflict, client_key: str | None) -> BadRequest:
        """What the client is told of a publish the backend refused (docs/protocol.md)."""
        if isinstance(exc, KeyConflict):
            return BadRequest(
                KEY_CONFLICT, f"key {client_key!r} was used for another delta (seq {exc.seq})"
            )
        self.metrics.backend_errors.inc()
        return BadRequest("unavailable", str(exc) or "backend unavailable")

    def _published(self, room: Room, key: str | None, seq: int, digest: str) -> None:
        room.note_acked(seq)
        self.metrics.deltas_in.inc()
        if key is not None:
            self._remember_key(room.name, key, seq, digest)

    def _sent(self, task: asyncio.Future[int]) -> None:
        self.inflight -= 1
        if not self.inflight:
            self._inflight_done.set()

    async def join(
        self,
        member: Member,
        room: str,
        since: int | None,
        rid: RequestId | None,
        who: Identity = ANONYMOUS,
        *,
        conn: str | None = None,
        presence: bool = False,
    ) -> bool:
        """Send `member` the room's `joined` (full state, or resumed and the deltas after
        `since`) and add it to the room's stream; a second join restarts the stream.
        False when the member went away meanwhile (it is not a member then).

        With `conn` (the connection's id, given in `joined`) the member is present in the
        room (its entry written meanwhile; this relay's `presence` reads wait for it);
        `presence` also sends it the room's presence_join / presence_leave events from its
        `joined` on."""
        self._check_open()
        self.authorize("join", room, who)
        hub = self.presence_hub if conn is not None else None
        held = hub is not None and hub.holds(room, member)
        try:
            if hub is not None and presence:
                # Before the room is loaded: nothing may await between the load and the
                # room's join (a loaded room without a member or a join can be unloaded).
                subscribing = hub.watch(room)
                if subscribing is not None:
                    await subscribing
            r = await self.registry.load(room)
            if member in r.members:
                r.leave(member)
                self.metrics.members.dec()
            if hub is not None and conn is not None:
                hub.join(room, member, conn, who, presence)
            await r.join(member, since, rid, conn)
        except BackendUnavailable as exc:
            if hub is not None and not held:
                hub.leave(room, member)
            self.metrics.backend_errors.inc()
            raise BadRequest("unavailable", str(exc) or "backend unavailable") from None
        except BaseException:
            if hub is not None and not held:
                hub.leave(room, member)
            raise
        if not member.is_open():
            r.leave(member)
            if hub is not None:
                hub.leave(room, member)
            return False
        if hub is not None:
            hub.listen(room, member)
        self.metrics.members.inc()
        return True

    async def read(self, room: str, who: Identity = ANONYMOUS) -> tuple[int, Payload]:
        """The room's state as JSON and its seq (the HTTP API's GET): the room is loaded
        as for a join, and the state's cached encoding is shared with joiners."""
        self._check_open()
        self.authorize("read", room, who)
        try:
            r = await self.registry.load(room)
            return await r.read()
        except BackendUnavailable as exc:
            self.metrics.backend_errors.inc()
            raise BadRequest("unavailable", str(exc) or "backend unavailable") from None

    def leave(self, member: Member, room: str) -> None:
        """Take `member` off the room's stream (nothing if it is not a member) and out of
        the room's presence (its presence_leave goes to the others)."""
        r = self.registry.get(room)
        if r is not None and member in r.members:
            r.leave(member)
            self.metrics.members.dec()
        if self.presence_hub is not None:
            self.presence_hub.leave(room, member)

    async def presence_view(self, room: str, who: Identity = ANONYMOUS) -> PresenceView:
        """Every member of `room` on every relay (needs `r`): one backend read."""
        self._check_open()
        self.authorize("presence", room, who)
        if self.presence_hub is None:
            raise BadRequest("unavailable", "presence is off on this relay (--presence off)")
        try:
            return await self.presence_hub.view(room)
        except BackendUnavailable as exc:
            self.metrics.backend_errors.inc()
            raise BadRequest("unavailable", str(exc) or "backend unavailable") from None

    async def presence(self, room: str, who: Identity = ANONYMOUS) -> dict[str, object]:
        """`presence_view` as a JSON-able object: {"room", "members", "count", "users"}
        (and "truncated": true past --max-presence-members), for the HTTP API."""
        view = await self.presence_view(room, who)
        return {"room": room, **view.to_json()}

    def _check_open(self) -> None:
        if self.closing:
            raise BadRequest("unavailable", "relay shutting down")

    # ------------------------------------------------------------------ shutdown

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests and wait up to `timeout_s` for the publishes under way;
        the number still under way when it gives up."""
        self.closing = True
        if self.inflight:
            self._inflight_done.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._inflight_done.wait()
            except TimeoutError:
                pass
        return self.inflight

    # ------------------------------------------------------------------ idempotency keys

    def _remember_key(self, room: str, key: str, seq: int, digest: str) -> None:
        keys = self._keys
        keys[(room, key)] = (seq, digest, time.monotonic() + IDEMPOTENCY_TTL_S)
        keys.move_to_end((room, key))
        while len(keys) > KEY_CACHE_SIZE:
            keys.popitem(last=False)

    def _known_key(self, room: str, key: str, digest: str) -> int | None:
        """The seq acknowledged for this key and delta; raises key_conflict when the key
        was acknowledged for another delta."""
        hit = self._keys.get((room, key))
        if hit is None or hit[2] < time.monotonic():
            return None
        seq, stored, _ = hit
        if stored != digest:
            shown = key.rpartition(KEY_SCOPE_SEPARATOR)[2]
            raise BadRequest(KEY_CONFLICT, f"key {shown!r} was used for another delta (seq {seq})")
        return seq

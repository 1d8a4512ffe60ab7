"""One room on this relay: its cached state, its members, ordering and batching of deltas.

Invariants:
- `state.seq` is the last seq broadcast to members; `queue` holds the in-order ops
  state.seq+1 .. last_seq not broadcast yet; `held` holds ops that arrived out of order.
- A member added at `state.seq` receives every later frame: the next one starts at
  state.seq + 1. Joins are served from the state, so they never wait for the stream.
- Ops come from the backend in publish order, but duplicates and gaps are possible: seq <=
  last_seq is dropped; a gap starts a backfill from the backend's history; history that no
  longer reaches back starts a reset from snapshot + ops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from kasagi_relay import delta
from kasagi_relay.backends.base import Backend, Op
from kasagi_relay.fanout import Member, broadcast
from kasagi_relay.metrics import Metrics
from kasagi_relay.protocol import DeltaFrame, delta_doc, encode_joined, split_delta_doc

__all__ = ["Room", "load_state"]

logger = logging.getLogger("kasagi_relay.room")

# Recent ops kept in memory per room so most resumes need no backend read.
RECENT_OPS = 256
_EMPTY_PATCH = b'{"patch":[]}'


async def load_state(backend: Backend, room: str) -> delta.RoomState:
    """The room's state from its snapshot and the ops after it (the engine works in a
    worker thread: natively it releases the GIL)."""
    for _ in range(5):
        snap = await backend.read_snapshot(room)
        base_seq, data = (snap.seq, snap.data) if snap is not None else (0, b"{}")
        ops = await backend.read_ops(room, base_seq)
        if ops is not None:
            break
        # History was trimmed past our snapshot meanwhile: a newer snapshot exists.
    else:
        raise RuntimeError(f"room {room}: history keeps moving past the snapshot")
    if ops:
        data = await asyncio.to_thread(delta.compact, data, [op.delta for op in ops])
        base_seq = ops[-1].seq
    return await asyncio.to_thread(delta.RoomState, data, base_seq)


class Room:
    def __init__(
        self,
        name: str,
        backend: Backend,
        metrics: Metrics,
        *,
        tick_s: float = 0.0,
    ) -> None:
        self.name = name
        self.backend = backend
        self.metrics = metrics
        self.tick_s = tick_s
        self.state: delta.RoomState | None = None
        self.last_seq = 0
        self.queue: list[Op] = []
        self.held: dict[int, Op] = {}
        self.recent: deque[Op] = deque(maxlen=RECENT_OPS)
        self.members: dict[Member, None] = {}
        self.last_active = time.monotonic()
        self._loading: asyncio.Task[None] | None = None
        self._backfill: asyncio.Task[None] | None = None
        # Joins under way: such a room has no member yet but must not be unloaded.
        self._joining = 0
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = 0.0
        self._closed = False
        # The state with the queued ops applied too, built only when a check needs it.
        self._head: delta.RoomState | None = None
        self._head_used = False
        self._approx_size: int | None = None
        # Highest seq this relay acknowledged in this room, and checks waiting to see it.
        self.acked_seq = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def __repr__(self) -> str:
        seq = None if self.state is None else self.state.seq
        return f"<Room {self.name} seq={seq} last={self.last_seq} members={len(self.members)}>"

    # ------------------------------------------------------------------ loading

    @property
    def loaded(self) -> bool:
        return self.state is not None

    async def ensure_loaded(self) -> delta.RoomState:
        """The cached state, loaded on first use; raises when the backend fails."""
        if self.state is not None:
            return self.state
        if self._loading is None or self._loading.done():
            self._loading = asyncio.create_task(self._load())
        await asyncio.shield(self._loading)
        if self.state is None:
            raise RuntimeError(f"room {self.name} was closed while loading")
        return self.state

    async def _load(self) -> None:
        # Subscribe first: whatever is published while we read is held, not lost.
        await self.backend.subscribe(self.name)
        state = await load_state(self.backend, self.name)
        if self._closed:
            return
        self.queue = []
        self._head = None
        self._approx_size = None
        self.recent.clear()
        self.state = state
        self.last_seq = state.seq
        if self.members:
            # A reload under members (after a failure): they may have missed anything.
            self.metrics.resets.inc()
            self._fanout(DeltaFrame.reset(self.name, state), 0)
        self._drain_held()
        self._wake()

    # ------------------------------------------------------------------ ordering

    def on_op(self, op: Op) -> None:
        """An op from the backend (listener callback; never raises)."""
        self.metrics.ops_in.inc()
        if op.seq <= self.last_seq:
            return
        if self.state is None or self._backfill is not None:
            self.held[op.seq] = op
            return
        if op.seq == self.last_seq + 1:
            self._enqueue(op)
        else:
            self.held[op.seq] = op
            self.start_backfill()

    def _enqueue(self, op: Op) -> None:
        self.queue.append(op)
        self.last_seq = op.seq
        if self._approx_size is not None:
            self._approx_size += len(op.delta)
        self._schedule_flush()
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Release the checks waiting for a seq this room has now reached."""
        still = []
        for target, fut in self._waiters:
            if target <= self.last_seq:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiters = still

    # ------------------------------------------------------------------ checks

    def head(self) -> delta.RoomState:
        """The state after every op received so far, broadcast or still queued."""
        state = self.state
        assert state is not None
        if not self.queue:
            return state
        self._head_used = True
        head = self._head
        if head is None or head.seq < state.seq:
            # A second copy of the state, made only when checks need the queued ops, then
            # kept up to date op by op while they keep needing it (see flush).
            head = self._head = delta.RoomState(state.to_json(), state.seq)
        for op in self.queue:
            if op.seq > head.seq:
                head.apply(op.delta, op.seq)
        return head

    def _advance_head(self, ops: list[Op]) -> None:
        head = self._head
        if head is None:
            return
        if not self._head_used:
            self._head = None  # nobody needed it during the last batch: free it
            return
        self._head_used = False
        try:
            for op in ops:
                if op.seq > head.seq:
                    head.apply(op.delta, op.seq)
        except Exception:
            self._head = None

    def state_too_large(self, extra: int, limit: int) -> bool:
        """Would the state pass `limit` bytes of JSON with `extra` more? Estimated from the
        last exact size plus the size of every op since; exact only near the limit, so a
        delta does not cost a serialization of the whole state."""
        if self._approx_size is None:
            self._approx_size = self.head().json_size()
        if self._approx_size + extra <= limit:
            return False
        self._approx_size = self.head().json_size()
        return self._approx_size + extra > limit

    async def check(self, doc: bytes, wait_s: float = 1.0) -> None:
        """DeltaError when `doc` cannot apply to the room's latest state. A delta that
        depends on one this relay just acknowledged waits (briefly) for it to arrive."""
        await self.ensure_loaded()
        try:
            self.head().check(doc)
            return
        except delta.DeltaError:
            if self.last_seq >= self.acked_seq:
                raise
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self.acked_seq, fut))
        try:
            async with asyncio.timeout(wait_s):
                await fut
        except TimeoutError:
            pass
        finally:
            self._waiters = [(t, f) for t, f in self._waiters if f is not fut]
        self.head().check(doc)

    def note_acked(self, seq: int) -> None:
        self.acked_seq = max(self.acked_seq, seq)

    def _drain_held(self) -> bool:
        """Move held ops that now follow last_seq into the queue; True when none is left."""
        held = self.held
        for seq in [s for s in held if s <= self.last_seq]:
            del held[seq]
        while held:
            op = held.pop(self.last_seq + 1, None)
            if op is None:
                return False
            self._enqueue(op)
        return True

    def start_backfill(self) -> None:
        """Catch up from the backend's history (a gap, or the backend asked for a resync)."""
        if self._closed or self.state is None:
            return
        if self._backfill is None:
            self._backfill = asyncio.create_task(self._run_backfill())

    async def _run_backfill(self) -> None:
        delay = 0.05
        passes = 0
        try:
            while not self._closed:
                try:
                    ops = await self.backend.read_ops(self.name, self.last_seq)
                    if ops is None:
                        await self._reset()
                    else:
                        for op in ops:
                            if op.seq == self.last_seq + 1:
                                self._enqueue(op)
                except Exception as exc:
                    self.metrics.backend_errors.inc()
                    logger.warning("room %s: backfill failed: %s", self.name, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if self._drain_held():
                    return
                # Held ops beyond what history had: published after our read; read again,
                # backing off in case the history never catches up with them.
                passes += 1
                await asyncio.sleep(min(0.005 * passes, 1.0))
        finally:
            self._backfill = None

    async def _reset(self) -> None:
        """History no longer reaches our last seq: reload and send members a `reset`."""
        state = await load_state(self.backend, self.name)
        if self._closed:
            return
        self._cancel_flush()
        self.queue = []
        self._head = None
        self._approx_size = None
        self.recent.clear()
        self.state = state
        self.last_seq = state.seq
        self.metrics.resets.inc()
        self._fanout(DeltaFrame.reset(self.name, state), 0)
        self._wake()

    # ------------------------------------------------------------------ fan-out

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        if self.tick_s > 0:
            # At most one frame per tick: the first delta after a quiet tick goes at once.
            at = max(loop.time(), self._last_flush + self.tick_s)
            self._flush_handle = loop.call_at(at, self.flush)
        else:
            # Everything that arrives before the loop comes back here is merged.
            self._flush_handle = loop.call_soon(self.flush)

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def flush(self) -> None:
        """Apply the queued ops to the state and broadcast them as one frame."""
        self._flush_handle = None
        ops, self.queue = self.queue, []
        state = self.state
        if not ops or state is None:
            return
        self._advance_head(ops)
        self._last_flush = asyncio.get_running_loop().time()
        try:
            frame = self._apply(state, ops)
        except Exception:
            # Never lose the ordering: reload the state and reset the members instead.
            logger.exception("room %s: cannot apply seq %d..%d", self.name, ops[0].seq, ops[-1].seq)
            self.state = None
            self._loading = asyncio.get_running_loop().create_task(self._load())
            self._loading.add_done_callback(self._loaded)
            return
        self.recent.extend(ops)
        self.metrics.deltas_per_frame.observe(len(ops))
        self._fanout(frame, len(ops))

    def _loaded(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.metrics.backend_errors.inc()
            logger.error("room %s: reload failed: %s", self.name, task.exception())

    def _apply(self, state: delta.RoomState, ops: list[Op]) -> DeltaFrame:
        first, last = ops[0].seq, ops[-1].seq
        if len(ops) == 1:
            op = ops[0]
            try:
                kind, body = split_delta_doc(op.delta)
                doc = delta_doc(kind, body)
            except delta.DeltaError:
                doc = _EMPTY_PATCH  # a malformed op in history is a no-op for everyone
            state.apply(doc, last)
        else:
            doc = state.apply_batch([op.delta for op in ops], last)
        return DeltaFrame(self.name, first, last, doc)

    def _fanout(self, frame: DeltaFrame, n_ops: int) -> None:
        if not self.members:
            return
        try:
            count, total = broadcast(list(self.members), frame)
        except Exception:
            # Members may have missed this frame: a reset puts them back on the stream.
            logger.exception(
                "room %s: broadcast of %d..%d failed", self.name, frame.first, frame.seq
            )
            if n_ops == 0 or self.state is None:
                return
            count, total = broadcast(list(self.members), DeltaFrame.reset(self.name, self.state))
            self.metrics.resets.inc()
        m = self.metrics
        m.broadcasts.inc()
        m.frames_out.inc(count)
        m.bytes_out.inc(total)

    # ------------------------------------------------------------------ members

    async def join(self, member: Member, since: int | None, rid: int | str | None) -> None:
        """Send `joined` (full state, or resumed + the missed deltas) and add the member."""
        self.last_active = time.monotonic()  # before any await: not idle, not evicted
        self._joining += 1
        try:
            await self._join(member, since, rid)
        finally:
            self._joining -= 1

    async def _join(self, member: Member, since: int | None, rid: int | str | None) -> None:
        state = await self.ensure_loaded()
        missed: list[Op] | None = None
        if since is not None and since <= state.seq:
            missed = await self._missed(since)
        if self.state is None:  # lost while we waited (a failed apply): serve after reload
            missed = None
        state = await self.ensure_loaded()
        # From here to the end nothing awaits: the member sees exactly the stream after.
        if missed is not None and (missed[-1].seq if missed else since) == state.seq:
            assert since is not None
            member.send(encode_joined(member.codec, self.name, since, rid, None))
            for op in missed:
                try:
                    kind, body = split_delta_doc(op.delta)
                    doc = delta_doc(kind, body)
                except delta.DeltaError:
                    doc = _EMPTY_PATCH
                payload = DeltaFrame(self.name, op.seq, op.seq, doc).payload(member.codec)
                member.send(payload)
        else:
            payload = encode_joined(member.codec, self.name, state.seq, rid, state)
            member.send(payload)
        self.members[member] = None

    async def _missed(self, since: int) -> list[Op] | None:
        """The ops since+1 .. state.seq, or None when history cannot serve them. The last op
        returned is the state's seq at the moment this returns (no await after)."""
        out: list[Op] = []
        after = since
        for _ in range(10):
            state = self.state
            if state is None:
                return None
            target = state.seq
            recent = self.recent
            if after >= target:
                return out
            if recent and recent[0].seq <= after + 1:
                out.extend(op for op in recent if after < op.seq <= target)
                return out
            ops = await self.backend.read_ops(self.name, after, target - after)
            if ops is None:
                return None
            for op in ops:
                if op.seq != after + 1:
                    return None
                out.append(op)
                after = op.seq
            if not ops:
                return None
        return None

    def leave(self, member: Member) -> None:
        self.members.pop(member, None)
        self.last_active = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def idle(self, now: float, idle_s: float) -> bool:
        return (
            not self.members
            and not self._joining
            and not self.queue
            and self._backfill is None
            and (self._loading is None or self._loading.done())
            and now - self.last_active >= idle_s
        )

    async def close(self) -> None:
        self._closed = True
        self._cancel_flush()
        for task in (self._backfill, self._loading):
            if task is not None and not task.done():
                task.cancel()
        try:
            await self.backend.unsubscribe(self.name)
        except Exception as exc:
            logger.debug("room %s: unsubscribe failed: %s", self.name, exc)

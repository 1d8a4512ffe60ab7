"""One room on this relay: its cached state, its members, ordering and batching of deltas.

Invariants:
- `seq` (the state's seq) is the last seq broadcast to members; `queue` holds the in-order
  ops seq+1 .. last_seq not broadcast yet; `held` holds ops that arrived out of order.
- A member added at `seq` receives every later frame: the next one starts at seq + 1.
  Joins are served from the state, so they never wait for the stream.
- Ops come from the backend in publish order, but duplicates and gaps are possible: seq <=
  last_seq is dropped; a gap starts a backfill from the backend's history; history that no
  longer reaches back starts a reset from snapshot + ops.

Nothing state-sized runs on the event loop (docs/design.md): applying, checking and
encoding the state run in a worker thread (`asyncio.to_thread`), except work that is
provably small (`_small`): deltas within the engine's inline bound on a small state. A
RoomState is used by one thread at a time: every use of `state` and `_head` holds
`_engine` (or runs synchronously on the loop while nobody holds it), so one room's engine
work is serialized while other rooms proceed. Whatever changes `seq` or the members holds
`_engine` across it, so a joiner is added exactly at the seq its `joined` carries.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import msgpack

from kasagi_relay import delta
from kasagi_relay.backends.base import Backend, Op
from kasagi_relay.domain import MERGE_DOC_HEAD, op_digest
from kasagi_relay.fanout import Member, Payload, broadcast, frame
from kasagi_relay.loops import running_loop
from kasagi_relay.metrics import Metrics
from kasagi_relay.protocol import (
    JSON,
    Codec,
    DeltaFrame,
    RequestId,
    delta_doc,
    encode_joined,
    split_delta_doc,
)

__all__ = ["Replay", "Room", "load_state"]

logger = logging.getLogger("kasagi_relay.room")

T = TypeVar("T")

# Recent ops kept in memory per room so most resumes need no backend read: by count, and
# by bytes (400 ops of 900 KB held 230 MB per room when only the count bounded them).
RECENT_OPS = 256
RECENT_BYTES = 4 * 1024 * 1024
_EMPTY_PATCH = b'{"patch":[]}'
# The last ops a live snapshot names for the store to check (Room.live_snapshot): by count
# (at most domain.LIVE_DIGESTS) and by bytes, which Redis hashes while it checks them.
LIVE_OPS = 8
LIVE_OPS_BYTES = 64 * 1024
# RoomState.apply's inline bound (kasagi_relay/_native.pyi): deltas up to this size may
# run on the loop thread.
SMALL_DELTA = 4 * 1024
# A state up to this size (JSON bytes) bounds any work on it without copies to well under
# a millisecond: deltas within SMALL_DELTA run inline on it.
SMALL_STATE = 64 * 1024
# The most JSON bytes one delta byte can become in the state: a number is written back in
# the engine's form (`1e15` is `1000000000000000.0`).
GROWTH = 8
# A merge patch applies to any document (RFC 7396): only the size it would give the state
# can refuse it. What a delta of n bytes can add to the state's memory estimate: its JSON
# (GROWTH * n) and its structure (every node of it takes a byte of it at least, a member
# more, so NODE_BYTES per byte bounds what its nodes and members weigh).
MEMORY_GROWTH = GROWTH + delta.NODE_BYTES
# Deltas are searched with `bytes.find`, not `in`: `bytes.__contains__` first tries its
# operand as an integer and makes (and drops) a formatted TypeError each time, twice the
# cost of `find` (3 % of the relay's CPU at memory ingest went to making them, perf).


async def load_state(
    backend: Backend, room: str, max_bytes: int = 0, max_memory: int = 0
) -> delta.RoomState:
    """The room's state from its snapshot and the ops after it (see `load_judged`)."""
    return (await load_judged(backend, room, max_bytes, max_memory))[0]


async def load_judged(
    backend: Backend, room: str, max_bytes: int = 0, max_memory: int = 0
) -> tuple[delta.RoomState, list[Op]]:
    """The room's state from its snapshot and the ops after it (the engine works in a
    worker thread: natively it releases the GIL), and the last RECENT_OPS of those ops as
    judged at their position (`_judge`), to serve resumes. `max_bytes` is
    --max-state-bytes and `max_memory` --max-state-memory: a delta that would take the
    state past either is a no-op, here as on every relay."""
    for _ in range(5):
        snap = await backend.snapshots.read_snapshot(room)
        base_seq, data = (snap.seq, snap.data) if snap is not None else (0, b"{}")
        ops = await backend.log.read_ops(room, base_seq)
        if ops is not None:
            break
        # History was trimmed past our snapshot meanwhile: a newer snapshot exists.
    else:
        raise RuntimeError(f"room {room}: history keeps moving past the snapshot")
    older, recent = ops[:-RECENT_OPS], ops[-RECENT_OPS:]

    def work() -> tuple[delta.RoomState, list[Op]]:
        deltas = [op.delta for op in older]
        base = delta.compact(data, deltas, max_bytes, max_memory) if older else data
        seq = older[-1].seq if older else base_seq
        state = delta.RoomState(base, seq, max_bytes, max_memory)
        return state, _judge(state, recent)

    return await asyncio.to_thread(work)


def _judge(state: delta.RoomState, ops: list[Op]) -> list[Op]:
    """Apply `ops` to `state`; each op as members must get it: one that failed at its
    position as an empty patch (docs/protocol.md, frames carry only effective changes)."""
    return [op if state.apply(op.delta, op.seq) else Op(op.seq, _EMPTY_PATCH) for op in ops]


def _effective(doc: bytes) -> bytes:
    """The frame of a delta that applied: without its `test` ops, which the relay has
    judged and no client should judge again (docs/protocol.md). `merge` of one delta
    drops them (and writes a later op of it overwrites): bounded by the delta's size. The
    engine writes documents compactly, so an op `test` always reads `"test"`."""
    if doc.find(b'"test"') < 0:
        return doc
    return delta.merge([doc])


def _small(docs: list[bytes], size: int | None) -> bool:
    """May `docs` be applied to (or checked against) a state of at most `size` bytes on the
    loop thread? Only when the work is bounded by small numbers: deltas within the engine's
    inline bound, no `copy` (which can double the state per op), a small state."""
    if size is None:
        return False
    total = 0
    for doc in docs:
        total += len(doc)
        if total > SMALL_DELTA or doc.find(b'"copy"') >= 0:
            return False
    return size + GROWTH * total <= SMALL_STATE


def _merge_fits(
    state: delta.RoomState, size: int, total: int, max_bytes: int, max_memory: int
) -> bool:
    """Can no merge patch of `total` bytes (with the queued ops it is counted with, none of
    them a `copy`) take `state`, of `size` JSON bytes, past `max_bytes` or `max_memory`
    (the state's limits; 0: none)? Then its check would pass, whatever the state holds: no
    check is needed."""
    if max_bytes and size + GROWTH * total > max_bytes:
        return False
    return not max_memory or state.memory_size() + MEMORY_GROWTH * total <= max_memory


def _op_doc(op: Op) -> bytes:
    """The delta document of a stored op (a malformed op in history is a no-op for all)."""
    try:
        kind, body = split_delta_doc(op.delta)
        return delta_doc(kind, body)
    except delta.DeltaError:
        return _EMPTY_PATCH


def _apply(state: delta.RoomState, ops: list[Op]) -> bytes:
    """Apply `ops` to `state`; the one delta document that takes members along. Ops that
    failed at their position are replaced in `ops` by empty patches, as resumes replay
    them."""
    if len(ops) == 1:
        op = ops[0]
        doc = _op_doc(op)
        if state.apply(doc, op.seq):
            return _effective(doc)
        ops[0] = Op(op.seq, _EMPTY_PATCH)
        return _EMPTY_PATCH
    doc = state.apply_batch([op.delta for op in ops], ops[-1].seq)
    failed = state.failed()
    if failed:
        first = ops[0].seq
        for seq in failed:
            ops[seq - first] = Op(seq, _EMPTY_PATCH)
    return doc


def _advance(head: delta.RoomState | None, ops: list[Op]) -> delta.RoomState | None:
    """`head` with `ops` applied too (those it has not seen); None when that fails."""
    if head is None:
        return None
    try:
        for op in ops:
            if op.seq > head.seq:
                head.apply(op.delta, op.seq)
    except Exception:
        return None
    return head


def _check_job(
    state: delta.RoomState,
    head: delta.RoomState | None,
    ops: list[Op],
    doc: bytes,
) -> tuple[delta.RoomState | None, delta.DeltaError | None]:
    """Check `doc` against `state` with `ops` applied (on `head`, a copy kept up to date
    while checks need it); returns (head, the check's error: TooLarge when the state would
    pass its max_bytes)."""
    target = state
    if ops:
        valid = head is not None and head.seq >= state.seq
        head = _advance(head, ops) if valid else None
        if head is None:
            # A second copy of the state, made only when checks need the queued ops, then
            # kept up to date while they keep needing it (see Room._applied).
            # A clone, not a parse of to_json(): the parser's peak was 2.4x the state.
            head = _advance(state.copy(), ops)
            if head is None:
                raise RuntimeError("the queued ops do not apply to a copy of the state")
        target = head
    try:
        target.check(doc)
    except delta.DeltaError as exc:
        return head, exc
    return head, None


def _message_parts(codec: Codec, fields: dict[str, object]) -> tuple[bytes, bytes]:
    """The bytes before and after the state of a message whose last field is `state`:
    the state itself goes between them as the engine encoded it (no parse, no copy)."""
    fields = {**fields, "state": None}
    if codec == JSON:
        # ASCII-only, as protocol.py encodes every message (an id may hold a lone surrogate).
        text = json.dumps(fields, separators=(",", ":")).encode()
        return text[: -len(b"null}")], b"}"
    packed = bytes(msgpack.packb(fields, use_bin_type=True))
    return packed[:-1], b""  # a map ends with its last value: nil (0xc0)


class Replay:
    """The ops a resuming member missed, framed one at a time as it reads (a
    `fanout.Stream`): a big op is encoded in a worker thread, and nothing more is encoded
    once the member is gone."""

    __slots__ = ("_bytes", "_codec", "_opcode", "_ops", "_room")

    def __init__(self, room: str, ops: list[Op], codec: Codec, opcode: int) -> None:
        self._room = room
        self._ops = deque(ops)
        self._codec: Codec = codec
        self._opcode = opcode
        self._bytes = sum(len(op.delta) for op in ops)

    def remaining(self) -> int:
        return self._bytes

    async def next_frame(self) -> bytes | None:
        if not self._ops:
            return None
        op = self._ops.popleft()
        self._bytes -= len(op.delta)
        if len(op.delta) <= SMALL_DELTA:
            return self._encode(op)
        return await asyncio.to_thread(self._encode, op)

    def _encode(self, op: Op) -> bytes:
        # `op` was judged (Room.recent, Room._missed): a failed one is an empty patch.
        message = DeltaFrame(self._room, op.seq, op.seq, _effective(_op_doc(op)))
        return frame(self._opcode, message.payload(self._codec))

    def close(self) -> None:
        self._ops.clear()
        self._bytes = 0


class _Waits:
    """Tasks waiting for a number (a seq, a ticket) to be reached."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def wait(self, target: int) -> None:
        """Until `release` of `target` or more (cancelled: no longer waiting)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((target, fut))
        try:
            await fut
        finally:
            self._waiting = [(t, f) for t, f in self._waiting if f is not fut]

    def release(self, reached: int) -> None:
        """Wake those waiting for `reached` or less."""
        still = []
        for target, fut in self._waiting:
            if target <= reached:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiting = still


class _Flushes:
    """The rooms due for a flush at the end of this loop turn, flushed by one callback: with
    many small rooms a handle per room per turn was part of the per-room overhead
    (docs/benchmarks.md "Publish path"). The fan-out counters of the rooms flushed in one
    run are added up and written once per run (`tally`): three locked counter updates per
    room were about 2 % of the relay's time with 1,000 rooms of 10 members (py-spy)."""

    __slots__ = ("handle", "loop", "rooms", "tally")

    def __init__(self) -> None:
        self.rooms: list[Room] = []
        self.handle: asyncio.Handle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # While `run` runs: per Metrics, [broadcasts, frames, bytes] not yet counted.
        self.tally: dict[Metrics, list[int]] | None = None

    def add(self, room: Room) -> None:
        loop = running_loop()
        if self.handle is None or self.loop is not loop:
            # A handle of another (closed) loop never runs: its rooms are dropped here.
            self.rooms = []
            self.loop = loop
            self.handle = loop.call_soon(self.run)
        self.rooms.append(room)

    def run(self) -> None:
        rooms, self.rooms = self.rooms, []
        self.handle = None
        tally: dict[Metrics, list[int]] = {}
        self.tally = tally
        try:
            for room in rooms:
                if room._flush_due:
                    try:
                        room.flush()
                    except Exception:
                        # One room's bug must not hold up the others' frames.
                        logger.exception("room %s: flush failed", room.name)
        finally:
            self.tally = None
            for metrics, (broadcasts, frames, sent) in tally.items():
                metrics.broadcasts.inc(broadcasts)
                metrics.frames_out.inc(frames)
                metrics.bytes_out.inc(sent)


_flushes = _Flushes()


class Room:
    """One room: `ensure_loaded`, `check` before a publish, `on_op` for what the backend
    delivers, `join` / `leave` for members, `read` for the HTTP API, `idle` / `close` for
    the registry. `seq` is the seq members have been sent up to, `last_seq` the last op known.
    `recent_bytes` bounds the recent ops kept for resumes (with RECENT_OPS); `max_bytes`
    (--max-state-bytes) and `max_memory` (--max-state-memory) bound the state: the engine
    keeps its exact size and memory estimate and refuses (check) or skips (apply) a delta
    that would pass either."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        metrics: Metrics,
        *,
        tick_s: float = 0.0,
        recent_bytes: int = RECENT_BYTES,
        max_bytes: int = 0,
        max_memory: int = 0,
    ) -> None:
        self.name = name
        self.backend = backend
        self.metrics = metrics
        self.tick_s = tick_s
        self.max_bytes = max_bytes
        self.max_memory = max_memory
        self.state: delta.RoomState | None = None
        self.seq = 0  # state's seq, readable without touching the state
        self.last_seq = 0
        self.queue: list[Op] = []
        self.held: dict[int, Op] = {}
        self.recent: deque[Op] = deque()
        self.recent_bytes = recent_bytes
        self._recent_size = 0
        self.members: dict[Member, None] = {}
        self.last_active = time.monotonic()
        self._loading: asyncio.Task[None] | None = None
        self._backfill: asyncio.Task[None] | None = None
        # Joins under way: such a room has no member yet but must not be unloaded.
        self._joining = 0
        self._flush_handle: asyncio.Handle | None = None
        self._flush_due = False  # in `_flushes`, to be flushed at the end of this turn
        self._flushing: asyncio.Task[None] | None = None
        self._last_flush = 0.0
        self._closed = False
        # Held by whatever uses the state off the loop or changes seq or the members
        # across an await (see the module docstring).
        self._engine = asyncio.Lock()
        # The state with the queued ops applied too, built only when a check needs it.
        self._head: delta.RoomState | None = None
        self._head_used = False
        # The state's JSON size (the engine keeps it exactly; None: not loaded), to choose
        # inline work.
        self._size: int | None = None
        # The state's encodings at `_encoded_seq`, shared by every joiner of that version.
        self._encoded: dict[Codec, Payload] = {}
        self._encoded_seq = -1
        # Highest seq this relay acknowledged in this room, and checks waiting to see it.
        self.acked_seq = 0
        self._waiters = _Waits()
        # Publishes this relay handed to the backend and has no answer for yet, by ticket
        # (in the order handed over: a connection pipelines its deltas, service.py), and
        # checks waiting for every publish up to a ticket to be answered.
        self._tickets = 0
        self._publishing: dict[int, None] = {}
        self._ticket_waiters = _Waits()
        # Reads (the HTTP API) waiting for the state to reach a seq this relay acknowledged.
        self._readers = _Waits()

    def __repr__(self) -> str:
        return f"<Room {self.name} seq={self.seq} last={self.last_seq} members={len(self.members)}>"

    async def _run(self, work: Callable[[], T], inline: bool) -> T:
        """Run engine work (the caller holds `_engine`): inline, or in a worker thread."""
        if inline:
            return work()
        return await asyncio.to_thread(work)

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
        await self.backend.feed.subscribe(self.name)
        state, judged = await load_judged(self.backend, self.name, self.max_bytes, self.max_memory)
        if self._closed:
            return
        async with self._engine:
            if self._closed:
                return
            self._install(state, judged)
            if self.members:
                # A reload under members (after a failure): they may have missed anything.
                await self._send_reset(state)
            self._drain_held()
            self._waiters.release(self.last_seq)

    def _install(self, state: delta.RoomState, judged: list[Op]) -> None:
        """Take `state` as the room's, and `judged` (its last ops, as `_judge` gave them)
        for resumes (the caller holds `_engine`)."""
        self._cancel_flush()
        self.queue = []
        self._head = None
        self._size = state.json_size()  # O(1): the engine keeps it
        self._encoded = {}
        self.recent.clear()
        self._recent_size = 0
        self.state = state
        self.seq = self.last_seq = state.seq
        self._remember(judged)
        self._readers.release(self.seq)

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
        self._schedule_flush()
        if self._waiters:
            self._waiters.release(self.last_seq)

    # ------------------------------------------------------------------ checks

    async def check(self, doc: bytes, wait_s: float = 1.0) -> None:
        """DeltaError when `doc` cannot apply to the room's latest state. A delta that
        depends on one this relay just acknowledged, or on one it has handed to the backend
        and not heard back about (an earlier delta of a connection that pipelines them),
        waits (briefly) for those to arrive, then is checked again."""
        await self.ensure_loaded()
        try:
            await self._check(doc)
            return
        except delta.DeltaError:
            if self._settled():
                raise
        try:
            async with asyncio.timeout(wait_s):
                if self._publishing:
                    # Every publish handed over before this check: answered (acked_seq then
                    # counts the ones stored), not necessarily arrived.
                    await self._ticket_waiters.wait(self._tickets)
                if self.last_seq < self.acked_seq:
                    await self._waiters.wait(self.acked_seq)
        except TimeoutError:
            pass
        await self._check(doc)

    def _settled(self) -> bool:
        """No delta this relay acknowledged or handed to the backend is still to arrive: a
        failed check is final."""
        return self.last_seq >= self.acked_seq and not self._publishing

    def begin_publish(self) -> int:
        """A delta to this room is handed to the backend now; its ticket for `end_publish`."""
        self._tickets += 1
        self._publishing[self._tickets] = None
        return self._tickets

    def end_publish(self, ticket: int, seq: int | None) -> None:
        """The backend answered the publish of `ticket`: stored at `seq`, or not (None)."""
        if seq is not None:
            self.note_acked(seq)
        self._publishing.pop(ticket, None)
        if self._ticket_waiters:
            # Those waiting for every ticket up to one before the oldest still out.
            oldest = next(iter(self._publishing), None)
            self._ticket_waiters.release(self._tickets if oldest is None else oldest - 1)

    def check_now(self, doc: bytes) -> bool:
        """`check` on the loop, without a task switch, when that is allowed: the state is
        loaded, nobody holds `_engine` and the work is small (`_small`). True: `doc` applies
        to the latest state (a merge patch far from the state's limits is not checked at
        all: `_merge_fits`). False: not decided here, call `check` (also when the check
        failed while a delta this relay acknowledged or handed to the backend has yet to
        arrive: `check` waits for it). Raises DeltaError as `check` does. Most small deltas
        are checked here: the lock, the coroutines and the partial of `_check` were ~6 % of
        the publish path."""
        state = self.state
        if state is None or self._engine.locked():
            return False
        ops = self.queue
        size = self._size
        if size is None:
            return False
        total = len(doc)
        for op in ops:  # _small, without building its list
            total += len(op.delta)
            if op.delta.find(b'"copy"') >= 0:
                return False
        if doc.startswith(MERGE_DOC_HEAD) and _merge_fits(
            state, size, total, self.max_bytes, self.max_memory
        ):
            # Most merge patches: no parse, and no copy of the state with the queued ops
            # applied (`_head`: ~8 % of the loop thread's samples at memory ingest, py-spy).
            return True
        if doc.find(b'"copy"') >= 0:
            return False
        if total > SMALL_DELTA or size + GROWTH * total > SMALL_STATE:
            return False
        if ops:
            self._head, error = _check_job(state, self._head, ops, doc)
            self._head_used = True
        else:
            try:
                state.check(doc)
            except delta.DeltaError as exc:
                error = exc
            else:
                return True
        if error is None:
            return True
        if self._settled():
            raise error
        return False

    async def _check(self, doc: bytes) -> None:
        """Check `doc` against the state with the queued ops; off the loop unless small."""
        while True:
            await self.ensure_loaded()
            async with self._engine:
                state = self.state
                if state is None:
                    continue  # lost to a failed apply meanwhile: wait for the reload
                ops = list(self.queue)
                head = self._head
                inline = _small([doc, *(op.delta for op in ops)], self._size)
                work = functools.partial(_check_job, state, head, ops, doc)
                new_head, error = await self._run(work, inline)
                if self.state is state and ops:
                    self._head = new_head
                    self._head_used = True
                if error is not None:
                    raise error
                return

    def note_acked(self, seq: int) -> None:
        if seq > self.acked_seq:
            self.acked_seq = seq

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
                    ops = await self.backend.log.read_ops(self.name, self.last_seq)
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
        state, judged = await load_judged(self.backend, self.name, self.max_bytes, self.max_memory)
        if self._closed:
            return
        async with self._engine:
            if self._closed:
                return
            self._install(state, judged)
            await self._send_reset(state)
            self._waiters.release(self.last_seq)

    async def _send_reset(self, state: delta.RoomState) -> None:
        """Send every member a `reset` to `state` (the caller holds `_engine`): the state is
        encoded once per subprotocol, off the loop, and written as each member reads."""
        if not self.members:
            return
        self.metrics.resets.inc()
        members = list(self.members)
        count = total = 0
        for codec in {m.codec for m in members}:
            payload = await self._encoding(state, codec)
            prefix, suffix = _message_parts(
                codec, {"t": "reset", "room": self.name, "seq": self.seq}
            )
            for member in members:
                if member.codec == codec and member.send_payload(payload, prefix, suffix):
                    count += 1
                    total += len(prefix) + payload.size + len(suffix)
        self.metrics.broadcasts.inc()
        self.metrics.frames_out.inc(count)
        self.metrics.bytes_out.inc(total)

    async def _encoding(self, state: delta.RoomState, codec: Codec) -> Payload:
        """The state encoded in `codec` (the caller holds `_engine`), made at most once per
        state version and off the loop unless the state is small."""
        if self._encoded_seq != self.seq:
            self._encoded = {}
            self._encoded_seq = self.seq
        payload = self._encoded.get(codec)
        if payload is None:
            encode = state.to_json if codec == JSON else state.to_msgpack
            inline = self._size is not None and self._size <= SMALL_STATE
            payload = self._encoded[codec] = Payload([await self._run(encode, inline)])
        return payload

    # ------------------------------------------------------------------ compaction

    async def live_snapshot(self) -> tuple[int, bytes, list[str]] | None:
        """For compaction from this relay's state (compaction.LiveRoom): (seq, the state as
        compact JSON, `op_digest`s of the last ops applied as received, newest first),
        exactly at seq since `_engine` is held throughout; None when not loaded or when
        `recent` no longer holds the op at seq as stored (the store checks those ops
        before taking the state): one that failed at its position is kept as an empty
        patch, so compaction reads the history instead. The ops checked are the last ones
        up to LIVE_OPS and LIVE_OPS_BYTES (the op at seq always): lost ops of a failover are
        the last ones a relay applied, and a delta stored again at its seq may repeat the
        lost one byte for byte, one before it less likely so. The encoding is the engine's
        (made off the loop unless small, and cached for joins of this version)."""
        async with self._engine:
            state = self.state
            if state is None or self._closed or not self.recent:
                return None
            digests: list[str] = []
            size = 0
            expected = self.seq
            for op in reversed(self.recent):
                if op.seq != expected or op.delta == _EMPTY_PATCH:
                    break
                size += len(op.delta)
                if digests and (len(digests) == LIVE_OPS or size > LIVE_OPS_BYTES):
                    break
                digests.append(op_digest(op.seq, op.delta))
                expected -= 1
            if not digests:
                return None
            inline = self._size is not None and self._size <= SMALL_STATE
            data = await self._run(state.to_json, inline)
            return self.seq, data, digests

    # ------------------------------------------------------------------ fan-out

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None or self._flush_due:
            return
        if self.tick_s > 0:
            # At most one frame per tick: the first delta after a quiet tick goes at once.
            loop = running_loop()
            at = max(loop.time(), self._last_flush + self.tick_s)
            self._flush_handle = loop.call_at(at, self.flush)
        else:
            # Everything that arrives before the loop comes back here is merged.
            self._flush_due = True
            _flushes.add(self)

    def _cancel_flush(self) -> None:
        self._flush_due = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def flush(self) -> None:
        """Apply the queued ops to the state and broadcast them as one frame: here when
        the work is small and nobody uses the state, else in a task that runs it off the
        loop (ops arriving meanwhile go in the next frame)."""
        self._flush_handle = None
        self._flush_due = False
        if self._flushing is not None or not self.queue or self.state is None:
            return
        if not self._engine.locked() and self._inline_flush():
            ops, self.queue = self.queue, []
            self._last_flush = running_loop().time()
            state = self.state
            try:
                doc = _apply(state, ops)
                head = _advance(self._head, ops) if self._head_used else None
            except Exception:
                self._apply_failed(ops)
                return
            self._applied(ops, DeltaFrame(self.name, ops[0].seq, ops[-1].seq, doc), head)
            return
        self._flushing = asyncio.get_running_loop().create_task(self._flush_off_loop())

    def _inline_flush(self) -> bool:
        docs = [op.delta for op in self.queue]
        if self._head_used and self._head is not None:
            docs += docs  # the head is advanced by the same ops
        return _small(docs, self._size)

    async def _flush_off_loop(self) -> None:
        try:
            async with self._engine:
                ops, self.queue = self.queue, []
                state = self.state
                if not ops or state is None or self._closed:
                    return
                self._last_flush = asyncio.get_running_loop().time()
                head = self._head if self._head_used else None
                inline = _small([op.delta for op in ops], self._size) and head is None
                big = sum(len(op.delta) for op in ops) > SMALL_DELTA
                codecs = {m.codec for m in self.members} if big else set()

                def work() -> tuple[DeltaFrame, delta.RoomState | None]:
                    doc = _apply(state, ops)
                    message = DeltaFrame(self.name, ops[0].seq, ops[-1].seq, doc)
                    for codec in codecs:
                        message.payload(codec)  # a big frame is encoded here, not on the loop
                    return message, _advance(head, ops)

                try:
                    message, new_head = await self._run(work, inline)
                except Exception:
                    self._apply_failed(ops)
                    return
                if self.state is state and not self._closed:
                    self._applied(ops, message, new_head)
        finally:
            self._flushing = None
            if self.queue and not self._closed:
                self._schedule_flush()

    def _applied(self, ops: list[Op], message: DeltaFrame, head: delta.RoomState | None) -> None:
        """Take the result of applying `ops` and broadcast it (no await: members added
        before this get this frame, members added after start after it)."""
        self._head = head
        self._head_used = False
        if self.state is not None:
            self._size = self.state.json_size()  # O(1): the engine keeps it
        self.seq = ops[-1].seq
        if self._readers:
            self._readers.release(self.seq)
        if self._encoded:
            self._encoded = {}  # members still reading the previous version hold it
        self._remember(ops)
        self.metrics.deltas_per_frame.observe(len(ops))
        self._fanout(message, len(ops))

    def _remember(self, ops: list[Op]) -> None:
        """Keep `ops` for resumes, within RECENT_OPS and `recent_bytes`."""
        recent = self.recent
        for op in ops:
            recent.append(op)
            self._recent_size += len(op.delta)
        while recent and (len(recent) > RECENT_OPS or self._recent_size > self.recent_bytes):
            self._recent_size -= len(recent.popleft().delta)

    def _apply_failed(self, ops: list[Op]) -> None:
        # Never lose the ordering: reload the state and reset the members instead.
        logger.exception("room %s: cannot apply seq %d..%d", self.name, ops[0].seq, ops[-1].seq)
        self.state = None
        self._loading = asyncio.get_running_loop().create_task(self._load())
        self._loading.add_done_callback(self._loaded)

    def _loaded(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.metrics.backend_errors.inc()
            logger.error("room %s: reload failed: %s", self.name, task.exception())

    def _fanout(self, message: DeltaFrame, n_ops: int) -> None:
        if not self.members:
            return
        try:
            count, total = broadcast(list(self.members), message)
        except Exception:
            # Members may have missed this frame: a reset puts them back on the stream.
            logger.exception(
                "room %s: broadcast of %d..%d failed", self.name, message.first, message.seq
            )
            if n_ops and self.state is not None:
                asyncio.get_running_loop().create_task(self._reset_members())
            return
        m = self.metrics
        tally = _flushes.tally
        if tally is not None:  # flushed by _Flushes.run: counted once at its end
            counts = tally.get(m)
            if counts is None:
                tally[m] = [1, count, total]
            else:
                counts[0] += 1
                counts[1] += count
                counts[2] += total
            return
        m.broadcasts.inc()
        m.frames_out.inc(count)
        m.bytes_out.inc(total)

    async def _reset_members(self) -> None:
        async with self._engine:
            if self.state is not None and not self._closed:
                await self._send_reset(self.state)

    # ------------------------------------------------------------------ members

    async def join(
        self, member: Member, since: int | None, rid: RequestId | None, conn: str | None = None
    ) -> None:
        """Send `joined` (full state, or resumed + the missed deltas) and add the member.
        A big state or replay is written as the member reads (fanout.Member.send_stream).
        `conn`, the connection's id, goes into `joined` (v1.1, presence)."""
        self.last_active = time.monotonic()  # before any await: not idle, not evicted
        self._joining += 1
        try:
            await self._join(member, since, rid, conn)
        finally:
            self._joining -= 1

    async def _join(
        self, member: Member, since: int | None, rid: RequestId | None, conn: str | None
    ) -> None:
        while True:
            await self.ensure_loaded()
            missed: list[Op] | None = None
            if since is not None and since <= self.seq:
                missed = await self._missed(since)
            async with self._engine:
                state = self.state
                if state is None:
                    continue  # lost while we waited (a failed apply): serve after reload
                # Holding _engine, the state and its seq do not change until the member is
                # added: it sees exactly the stream after what it is sent here.
                if missed is not None and (missed[-1].seq if missed else since) == self.seq:
                    assert since is not None
                    member.send(encode_joined(member.codec, self.name, since, rid, None, conn))
                    if missed:
                        member.send_stream(Replay(self.name, missed, member.codec, member.opcode))
                else:
                    payload = await self._encoding(state, member.codec)
                    fields: dict[str, object] = {"t": "joined"}
                    if rid is not None:
                        fields["id"] = rid
                    fields["room"] = self.name
                    fields["seq"] = self.seq
                    if conn is not None:
                        fields["conn"] = conn
                    prefix, suffix = _message_parts(member.codec, fields)
                    member.send_payload(payload, prefix, suffix)
                self.members[member] = None
                return

    async def read(self, wait_s: float = 1.0) -> tuple[int, Payload]:
        """The state as JSON and its seq, for the HTTP API: the encoding joiners of this
        version share (made off the loop unless the state is small). It includes every
        delta this relay acknowledged in the room (a client reads its own writes), waiting
        up to `wait_s` for them to be applied (a tick, at most)."""
        self.last_active = time.monotonic()  # before any await: not idle, not evicted
        self._joining += 1  # a reader, like a joiner, keeps the room loaded meanwhile
        try:
            await self.ensure_loaded()
            target = self.acked_seq
            if self.seq < target:
                try:
                    async with asyncio.timeout(wait_s):
                        await self._readers.wait(target)
                except TimeoutError:
                    pass  # served as it is
            while True:
                await self.ensure_loaded()
                async with self._engine:
                    state = self.state
                    if state is None:
                        continue  # lost while we waited (a failed apply): read after reload
                    return self.seq, await self._encoding(state, JSON)
        finally:
            self._joining -= 1

    async def _missed(self, since: int) -> list[Op] | None:
        """The ops since+1 .. seq, or None when history cannot serve them. The last op
        returned is the room's seq at the moment this returns (no await after)."""
        out: list[Op] = []
        after = since
        judge: delta.RoomState | None = None
        for _ in range(10):
            if self.state is None:
                return None
            target = self.seq
            recent = self.recent
            if after >= target:
                return out
            if recent and recent[0].seq <= after + 1:
                out.extend(op for op in recent if after < op.seq <= target)
                return out
            ops = await self.backend.log.read_ops(self.name, after, target - after)
            if not ops or [op.seq for op in ops] != list(range(after + 1, after + 1 + len(ops))):
                return None
            # History holds the ops as sent: judge them on the state they applied to.
            if judge is None:
                judge = await self._state_at(after)
                if judge is None:
                    return None
            out.extend(await asyncio.to_thread(_judge, judge, ops))
            after = ops[-1].seq
        return None

    async def _state_at(self, seq: int) -> delta.RoomState | None:
        """The room's state at `seq`, rebuilt from the snapshot and the history (to judge the
        ops after it); None when the snapshot is past `seq` or the history does not reach it.
        Costs what loading the room costs, off the loop."""
        snap = await self.backend.snapshots.read_snapshot(self.name)
        base_seq, data = (snap.seq, snap.data) if snap is not None else (0, b"{}")
        if base_seq > seq:
            return None
        ops = (
            await self.backend.log.read_ops(self.name, base_seq, seq - base_seq)
            if (seq > base_seq)
            else []
        )
        if ops is None or len(ops) != seq - base_seq or (ops and ops[-1].seq != seq):
            return None
        max_bytes, max_memory = self.max_bytes, self.max_memory

        def work() -> delta.RoomState:
            deltas = [op.delta for op in ops]
            base = delta.compact(data, deltas, max_bytes, max_memory) if ops else data
            return delta.RoomState(base, seq, max_bytes, max_memory)

        return await asyncio.to_thread(work)

    def leave(self, member: Member) -> None:
        self.members.pop(member, None)
        self.last_active = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def idle(self, now: float, idle_s: float) -> bool:
        return (
            not self.members
            and not self._joining
            and not self.queue
            and not self._publishing  # its answers update acked_seq, which checks read
            and self._flushing is None
            and not self._engine.locked()
            and self._backfill is None
            and (self._loading is None or self._loading.done())
            and now - self.last_active >= idle_s
        )

    async def close(self) -> None:
        self._closed = True
        self._cancel_flush()
        for task in (self._backfill, self._loading, self._flushing):
            if task is not None and not task.done():
                task.cancel()
        try:
            await self.backend.feed.unsubscribe(self.name)
        except Exception as exc:
            logger.debug("room %s: unsubscribe failed: %s", self.name, exc)

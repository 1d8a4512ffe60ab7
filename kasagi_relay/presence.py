"""Presence on this relay: its members' entries in the backend, and the events to members.

docs/protocol.md, presence. A member is one connection joined to a room; its entry is the
compact JSON `{"conn":C,"sub":S,"info":{...},"j":J}`, where `j` is unique per join (so a
connection that leaves and joins again is a new member, and a stale copy of an old entry
is told from it). The hub (one per relay):

- writes an entry when a member joins and removes it when the member leaves, closes, is
  dropped (1013) or the relay stops; a joiner that asked for events is subscribed
  (`watch`) before its `joined`. The writes are queued, not awaited: ONE writer sends
  everything queued as one batch (`Presence.write`: one pipeline on Redis), and what is
  queued while a batch is under way goes in the next. One batch at a time, in queue
  order: a member's remove always reaches the backend after its add (the backend
  announces its join before its leave). A batch that removes or replaces an entry a
  refresh under way is writing waits for that refresh (else the refresh would write it
  back). A `presence` read waits for the writes queued before it. No task, future or
  retry loop per write: a failed batch is retried whole by the backend (every write is
  safe to repeat). A leave whose join's add is still queued cancels it: neither is
  sent, so nobody is told of a member already gone (the busier the relay, the longer a
  batch waits, and the more of these short visits cost nothing);
- re-writes a member's entries with its new `info` when its token is refreshed
  (`reidentify`: same `j`, so no event), queued like the rest;
- re-writes every entry it holds every `refresh_s` (and at once after the event
  subscription was re-made: a new master may lack them), which also makes the backend
  take out the entries of relays that stopped refreshing (dead) and announce their leave;
- subscribes to the events of the rooms where one of its members asked for them (`join`
  with `"presence": true`) and sends each `presence_join` / `presence_leave` to those
  members, except the one it is about. The events about its own members it makes itself
  as their writes are sent (`_announce`: in queue order, after cancellations); the
  backend's copy of them is dropped unread (their `j` carries this hub's prefix), so
  what the backend says of them later (a re-write on a new master, another relay taking
  a stalled relay for dead) does not reach the members here, who share the room with
  them. Each event is sent at most once: a join already seen, or of a member whose
  leave was seen, is dropped (the backend may repeat one after a failover); a member's
  leave is never followed by its join. Events go out at most once per `event_delay_s`
  (the first after a quiet period at the end of its loop turn), and each listener gets
  those of a room held meanwhile in one write, not one per event: on a busy relay most
  of the cost of an event was its own write (a turn held about one event per room). They
  go to the listeners there are then: one that started listening meanwhile gets only the
  events after it started, one that left gets none of them (it asked to go before they
  were sent);
- answers `presence` with one backend read, corrected by the events that arrived while
  the read was in flight (they may come in before its reply).

Costs are bounded: a reply lists at most `max_members` members (count and users exact),
is encoded off the event loop when large, and its bytes count in the connection's rate
limit (session.py); events count against each member's send queue like any frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from kasagi_relay.backends.base import Presence, PresenceOp
from kasagi_relay.domain import BackendUnavailable, Identity
from kasagi_relay.fanout import OP_BINARY, OP_TEXT, Member, frame
from kasagi_relay.loops import cancel_and_wait
from kasagi_relay.metrics import Metrics
from kasagi_relay.protocol import JSON, Codec, encode_presence_event

__all__ = ["PresenceHub", "PresenceView"]

logger = logging.getLogger("kasagi_relay.presence")

# Leaves remembered per room (to drop a repeated event), and for how long past the TTL.
TOMBSTONES_MAX: Final = 100_000
# A read of more entries than this is decoded in a worker thread.
THREAD_ENTRIES: Final = 500
# Writes per batch (one pipeline): bounds one round trip's size and the server's time on
# it when thousands of members go at once (a relay stopping); the rest go next.
BATCH_MAX: Final = 1000
# How long close() waits for the writes queued (then the entries expire by TTL).
CLOSE_TIMEOUT_S: Final = 5.0


@dataclass(slots=True)
class _Local:
    conn: str
    entry: bytes
    events: bool
    # Its join's add: an absolute position in the hub's queue (still queued while it is
    # at or past the queue's base: then a leave cancels it; positions only grow).
    slot: int = -1


_Event = tuple[str, str, str, dict[str, Any]]
# A queued write and whether it is a join or leave to announce (a re-identification's
# re-write is not: the member stays the same).
_Queued = tuple[PresenceOp, bool]


@dataclass(slots=True)
class _Watch:
    """A room with members of this relay that asked for events."""

    listeners: dict[Member, str] = field(default_factory=dict)  # writer -> its conn
    # The room's members as this relay knows them: conn -> (j, member).
    known: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    gone: OrderedDict[tuple[str, str], float] = field(default_factory=OrderedDict)
    # Event logs of the reads in flight: (kind, conn, j, member).
    reads: list[list[_Event]] = field(default_factory=list)
    # Set while the room is being subscribed (joiners meanwhile wait for it).
    ready: asyncio.Future[None] | None = None
    # Since when no member of this relay watches the room (None: some do).
    idle_since: float | None = None
    # The events of this loop turn not sent yet, in the order they came, and where in
    # them each listener that came meanwhile starts (the others start at 0).
    pending: list[_EventFrame] = field(default_factory=list)
    starts: dict[Member, int] = field(default_factory=dict)
    # The members the pending events are about (a listener among them gets a write of
    # its own: the events less its own).
    about: set[str] = field(default_factory=set)
    codecs: dict[Codec, int] = field(default_factory=dict)  # listeners per subprotocol
    room_json: bytes = b""  # the room as a JSON string, for its events

    def add_listener(self, member: Member, conn: str) -> None:
        if member not in self.listeners:
            self.codecs[member.codec] = self.codecs.get(member.codec, 0) + 1
        self.listeners[member] = conn

    def remove_listener(self, member: Member) -> None:
        del self.listeners[member]
        self.codecs[member.codec] -= 1

    def sent(self) -> None:
        """The pending events are all sent."""
        self.pending = []
        self.starts.clear()
        self.about.clear()


@dataclass(frozen=True, slots=True)
class PresenceView:
    """A room's presence: what a `presence` reply and the HTTP API show."""

    members: list[dict[str, Any]]
    count: int
    users: int
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"members": self.members, "count": self.count, "users": self.users}
        if self.truncated:
            out["truncated"] = True
        return out


# `j`: a random prefix and a counter, unique per join without a call to the system's
# random source per join. Each hub has its own prefix (its entries are told from every
# other relay's by it: `PresenceHub.on_presence`); this one is for entries made outside a
# hub (tools, tests standing in for another relay).
_J_BASE: Final = secrets.token_hex(8).encode()
_J_SEQ = itertools.count()
_J_KEY: Final = b',"j":"'
# Entry heads cached per connection (the identity they were made of): a member joining
# and leaving rooms re-encodes nothing. Cleared whole past this size.
HEADS_MAX: Final = 65_536
# Parsed entries kept from a member's join event for its leave event; cleared whole past
# this size (a leave that never comes, a member dropped by a failover, is not kept long).
PARSED_MAX: Final = 65_536


class _EventFrame:
    """One `presence_join` / `presence_leave` about member `conn`, encoded at most once per
    subprotocol. With `member_json` (the member as compact ASCII JSON, cut from its stored
    entry) the JSON payload is put together from bytes, and `member` (None then) is decoded
    from it only for another subprotocol. `room_json` is the room as a JSON string (made
    once per watched room, not per event)."""

    __slots__ = (
        "_member",
        "bad",
        "conn",
        "json_frame",
        "kind",
        "member_json",
        "others",
        "room",
        "room_json",
    )

    def __init__(
        self,
        kind: str,
        room: str,
        room_json: bytes,
        conn: str,
        member: dict[str, Any] | None,
        member_json: bytes | None,
    ) -> None:
        self.kind = kind
        self.room = room
        self.room_json = room_json
        self.conn = conn
        self._member = member
        self.member_json = member_json
        # The event as a frame: of JSON (nearly every listener), of other subprotocols.
        self.json_frame: bytes | None = None
        self.others: dict[Codec, bytes] | None = None
        # Whether a subprotocol could not encode it (None: not tried yet).
        self.bad: bool | None = None

    def check(self, codecs: Iterable[Codec]) -> None:
        """Encode it for `codecs`; `bad` says whether one of them failed."""
        try:
            for codec in codecs:
                self.frame(codec)
        except (ValueError, TypeError, OverflowError):
            self.bad = True
        else:
            self.bad = False

    def frame(self, codec: Codec) -> bytes:
        """The event as one frame of `codec`, built once."""
        if codec == JSON:
            data = self.json_frame
            if data is None:
                data = self.json_frame = frame(OP_TEXT, self.payload(codec))
            return data
        others = self.others
        if others is None:
            others = self.others = {}
        data = others.get(codec)
        if data is None:
            data = others[codec] = frame(OP_BINARY, self.payload(codec))
        return data

    def payload(self, codec: Codec) -> bytes:
        if codec == JSON and self.member_json is not None:
            return b'{"t":"presence_%s","room":%s,"member":%s}' % (
                self.kind.encode(),
                self.room_json,
                self.member_json,
            )
        return encode_presence_event(codec, self.kind, self.room, self.member())

    def member(self) -> dict[str, Any]:
        if self._member is None:
            assert self.member_json is not None
            self._member = json.loads(self.member_json)
        return self._member


def _json_string(text: str) -> bytes:
    """`text` as a JSON string, ASCII only (as protocol.py encodes)."""
    return json.dumps(text).encode()


def _head(conn: str, who: Identity) -> bytes:
    """The entry up to its `j` value: `{"conn":C,"sub":S,"info":{...},"j":"`."""
    doc = {"conn": conn, "sub": who.sub, "info": dict(who.info)}
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"j":"'
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (valid JSON, no UTF-8 form) would make the entry unencodable
        # on MessagePack for every member who reads it: stored replaced instead.
        return text.encode("utf-8", "replace")


def _entry(
    conn: str, who: Identity, head: bytes | None = None, j_base: bytes = _J_BASE, seq: int = -1
) -> bytes:
    if head is None:
        head = _head(conn, who)
    return b'%s%s%x"}' % (head, j_base, next(_J_SEQ) if seq < 0 else seq)


def _with_head(entry: bytes, head: bytes) -> bytes:
    """`entry` (same conn and `j`) with another head: the same member, new info."""
    return head + entry[entry.rindex(_J_KEY) + len(_J_KEY) :]


def _own(entry: bytes) -> tuple[str, dict[str, Any] | None, bytes | None]:
    """An entry this relay wrote (`_entry`): its `j`, and the member as it goes on the
    wire: compact ASCII JSON when the entry is ASCII (then the dict is decoded only when
    needed), else the dict. No parse: this relay made the bytes."""
    cut = entry.rindex(_J_KEY)
    j = entry[cut + len(_J_KEY) : -2].decode()
    member_json = entry[:cut] + b"}"
    if member_json.isascii():
        return j, None, member_json
    return j, json.loads(member_json), None


# (conn, j, the member as sent on the wire, that member as compact ASCII JSON or None)
_Parsed = tuple[str, str, dict[str, Any], bytes | None]


def _parse(entry: bytes) -> _Parsed | None:
    """One stored entry, parsed; None when malformed."""
    try:
        doc = json.loads(entry)
        conn, j = doc["conn"], str(doc.get("j", ""))
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(conn, str):
        return None
    member = {"conn": conn, "sub": doc.get("sub"), "info": doc.get("info", {})}
    # An entry as relays write it (`_entry`: conn, sub, info, then `j` last, written
    # exactly) is the member's JSON once its `j` is cut off: a JSON event is then made
    # of bytes. Non-ASCII entries are encoded again (as every payload, ASCII-only on
    # the wire), as is anything else.
    member_json = None
    if len(doc) == 4 and "info" in doc and "sub" in doc and j.isalnum() and entry.isascii():
        suffix = b',"j":"%s"}' % j.encode()
        if entry.endswith(suffix):
            member_json = entry[: -len(suffix)] + b"}"
    return conn, j, member, member_json


def _decode(entries: list[bytes]) -> dict[str, dict[str, Any]]:
    """conn -> wire member, from stored entries (malformed ones skipped)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        docs = json.loads(b"[" + b",".join(entries) + b"]")
    except ValueError:
        docs = []
        for raw in entries:
            with contextlib.suppress(ValueError):
                docs.append(json.loads(raw))
    for doc in docs:
        if isinstance(doc, dict) and isinstance(doc.get("conn"), str):
            doc.pop("j", None)
            out[doc["conn"]] = doc
    return out


class PresenceHub:
    def __init__(
        self,
        presence: Presence,
        metrics: Metrics,
        *,
        refresh_s: float = 20.0,
        ttl_s: float = 60.0,
        max_members: int = 10_000,
        event_delay_s: float = 0.0,
    ) -> None:
        self.presence = presence
        self.metrics = metrics
        self.refresh_s = refresh_s
        self.ttl_s = ttl_s
        self.max_members = max_members
        self.event_delay_s = event_delay_s
        # room -> writer -> its entry
        self.local: dict[str, dict[Member, _Local]] = {}
        self.watches: dict[str, _Watch] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_now = asyncio.Event()
        self._resynced = False
        # The writes not sent yet, in order, and the writer sending them (None: idle).
        # A slot is None when its add was cancelled by the member's leave (`leave`).
        self._queue: list[_Queued | None] = []
        # The absolute position of _queue[0] (positions count every write ever queued).
        self._queue_base = 0
        self._writer: asyncio.Task[None] | None = None
        # Resolved when the queued writes (next) / the batch under way (sending) are done:
        # made only when a read waits for them.
        self._next_done: asyncio.Future[None] | None = None
        self._sending_done: asyncio.Future[None] | None = None
        # The refresh under way: (room, the entries it writes, resolved when done).
        self._refreshing: tuple[str, dict[str, bytes], asyncio.Future[None]] | None = None
        # conn -> (the identity, its entry head)
        self._heads: dict[str, tuple[Identity, bytes]] = {}
        # This hub's `j` prefix: an entry ending in `,"j":"<it>...` is one of its members.
        self._j_base = secrets.token_hex(8).encode()
        self._j_seq = itertools.count()
        self.own_mark = _J_KEY + self._j_base
        # Join events' entries, parsed, until their leave comes (or PARSED_MAX is passed).
        self._parsed: dict[bytes, _Parsed] = {}
        # The rooms with events not sent yet (`_Watch.pending`), the callback that sends
        # them (None: none pending), and when it last ran (loop time).
        self._outbox: dict[str, _Watch] = {}
        self._flusher: asyncio.Handle | None = None
        self._flushed_at = float("-inf")
        presence.set_listener(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh_loop())
            self._refresher.set_name("kasagi-presence-refresh")

    async def close(self) -> None:
        """Wait (bounded) for the writes queued, then stop refreshing."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(writer)
        task, self._refresher = self._refresher, None
        if task is not None:
            await cancel_and_wait(task)

    # ------------------------------------------------------------------ members

    def holds(self, room: str, member: Member) -> bool:
        return member in self.local.get(room, {})

    def watch(self, room: str) -> Awaitable[None] | None:
        """Subscribe to the room's events (before a joiner that asked for them gets its
        `joined`, so that it misses none after it): what to await, or None when the room
        is subscribed already (most joins: no coroutine made)."""
        held = self.watches.get(room)
        if held is not None and held.ready is None:
            held.idle_since = None  # not unsubscribed under this joiner
            return None
        return self._watch(room)

    def join(self, room: str, member: Member, conn: str, who: Identity, events: bool) -> None:
        """Make `member` present in `room`: its entry is queued for the writer (a
        `presence` read on this relay waits for it; on an unavailable backend the next
        refresh writes it). A second join of the same member keeps its entry: no event."""
        watch = self.watches.get(room)
        if events and watch is not None:
            watch.idle_since = None  # a listener is on its way (listen)
        entries = self.local.setdefault(room, {})
        held = entries.get(member)
        if held is not None:
            held.events = events
            return
        entry = _entry(conn, who, self._head(conn, who), self._j_base, next(self._j_seq))
        local = entries[member] = _Local(conn, entry, events)
        self.metrics.presence_entries.inc()
        local.slot = self._write((room, conn, entry, True), announce=True)

    def _head(self, conn: str, who: Identity) -> bytes:
        held = self._heads.get(conn)
        if held is not None and held[0] is who:
            return held[1]
        if len(self._heads) >= HEADS_MAX:
            self._heads.clear()
        head = _head(conn, who)
        self._heads[conn] = (who, head)
        return head

    def reidentify(self, member: Member, conn: str, who: Identity) -> None:
        """`member`'s identity changed (a token refresh): its entries are re-written with
        the new `info`, queued after the member's writes.
        The member stays the same (same `j`): no event; reads show the new info."""
        head = self._head(conn, who)
        for room, entries in self.local.items():
            local = entries.get(member)
            if local is None:
                continue
            entry = _with_head(local.entry, head)
            if entry == local.entry:
                continue
            local.entry = entry
            if local.slot >= self._queue_base:
                # Its join's add is not sent yet: it takes the new entry instead.
                self._queue[local.slot - self._queue_base] = ((room, conn, entry, True), True)
            else:
                self._write((room, conn, entry, True), announce=False)

    def listen(self, room: str, member: Member) -> None:
        """From now on `member` gets the room's events (after its `joined`)."""
        local = self.local.get(room, {}).get(member)
        watch = self.watches.get(room)
        if local is not None and local.events and watch is not None:
            if watch.pending:
                # It gets the events that come from now on, not those already in.
                watch.starts[member] = len(watch.pending)
            watch.add_listener(member, local.conn)
            watch.idle_since = None

    def leave(self, room: str, member: Member) -> None:
        """`member` is no longer in `room`: its remove is queued for the writer."""
        entries = self.local.get(room)
        local = entries.pop(member, None) if entries is not None else None
        if entries is not None and not entries:
            del self.local[room]
        watch = self.watches.get(room)
        if watch is not None and member in watch.listeners:
            # Nothing more goes to it, not even the events held (`_pend`): they go out
            # after its leave (the leaver asked to go before they were sent). Sending
            # each leaver its share at once cost a write joined per leaver, a burst's
            # events times the burst's leavers.
            watch.starts.pop(member, None)
            watch.remove_listener(member)
        if watch is not None and not watch.listeners and watch.idle_since is None:
            # Kept subscribed for a while (rejoins are common): the refresh loop
            # unsubscribes rooms nobody has watched for a refresh period.
            watch.idle_since = time.monotonic()
        if local is None:
            return
        self.metrics.presence_entries.dec()
        if local.slot >= self._queue_base:
            # Its add is still queued (a batch is under way): neither goes out, so no
            # relay announces a member that is already gone (events are at most once).
            # Under load batches grow, and so does what this saves.
            self._queue[local.slot - self._queue_base] = None
            return
        self._write((room, local.conn, local.entry, False), announce=True)

    # ------------------------------------------------------------------ writes

    def _write(self, op: PresenceOp, *, announce: bool) -> int:
        """Queue `op` (with `announce`, a join or leave this relay's listeners are told of
        when it is sent); its absolute position in the queue."""
        self._queue.append((op, announce))
        if self._writer is None:
            # Starts on the next turn of the loop: this turn's writes are one batch.
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return self._queue_base + len(self._queue) - 1

    async def _write_loop(self) -> None:
        try:
            while self._queue:
                taken, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                # From here on these adds are sent: a leave no longer cancels them.
                self._queue_base += len(taken)
                ops = [queued[0] for queued in taken if queued is not None]
                try:
                    self._announce(taken)
                except Exception:
                    # The writes must still go (and the reads waiting for them be told).
                    logger.exception("presence: announcing %d write(s) failed", len(ops))
                done = None
                if not self._queue:  # the reads waiting for the queue wait for this batch
                    done, self._next_done = self._next_done, None
                self._sending_done = done
                try:
                    while self._conflicts(ops):
                        await asyncio.shield(self._refreshing[2])  # type: ignore[index]
                    if ops:
                        await self.presence.write(ops, self.ttl_s)
                except asyncio.CancelledError:
                    raise
                except BackendUnavailable as exc:
                    # Adds come back with the next refresh; removed entries expire.
                    logger.warning("presence: %d write(s) lost: %s", len(ops), exc)
                except Exception:
                    logger.exception("presence: %d write(s) failed", len(ops))
                finally:
                    self._sending_done = None
                    if done is not None and not done.done():
                        done.set_result(None)
        finally:
            self._writer = None
            # Cancelled (the loop is closing) with writes left: no read may wait for them.
            for fut in (self._next_done, self._sending_done):
                if fut is not None and not fut.done():
                    fut.set_result(None)
            self._next_done = self._sending_done = None

    def _conflicts(self, ops: list[PresenceOp]) -> bool:
        """Whether `ops` must wait for the refresh under way: it writes an entry that one
        of them removes or replaces (sent first, the refresh would write it back). Adds
        of other entries go at once: the refresh does not touch them."""
        refreshing = self._refreshing
        if refreshing is None:
            return False
        room, batch, _ = refreshing
        for op_room, conn, entry, add in ops:
            if op_room == room:
                held = batch.get(conn)
                if held is not None and (not add or held != entry):
                    return True
        return False

    def _written(self) -> asyncio.Future[None] | None:
        """Resolved once every write queued so far is done; None when nothing is pending."""
        if self._queue:
            if self._next_done is None:
                self._next_done = asyncio.get_running_loop().create_future()
            return self._next_done
        if self._writer is not None:
            if self._sending_done is None:
                # The batch under way has no future yet: wait for the writer instead.
                return asyncio.ensure_future(asyncio.shield(self._writer))
            return self._sending_done
        return None

    async def _watch(self, room: str) -> None:
        held = self.watches.get(room)
        if held is not None:
            held.idle_since = None  # not unsubscribed under this joiner
            if held.ready is not None:
                # Subscribing for another joiner: ready when it is.
                await asyncio.shield(held.ready)
            return
        watch = self.watches[room] = _Watch(
            idle_since=time.monotonic(), room_json=_json_string(room)
        )
        ready = watch.ready = asyncio.get_running_loop().create_future()
        try:
            await self.presence.subscribe(room)
            # Who is there already, so that a resync can tell what it missed.
            await self._reconcile(room, watch, deliver=False)
            ready.set_result(None)
        except BaseException as exc:
            if self.watches.get(room) is watch and not watch.listeners:
                del self.watches[room]
            ready.set_exception(
                exc if isinstance(exc, Exception) else BackendUnavailable("cancelled")
            )
            ready.exception()  # retrieved: nobody else may wait for it
            raise
        finally:
            watch.ready = None

    async def _drop_idle_watches(self) -> None:
        now = time.monotonic()
        for room, watch in list(self.watches.items()):
            since = watch.idle_since
            if since is not None and now - since >= self.refresh_s and watch.ready is None:
                del self.watches[room]
                with contextlib.suppress(Exception):
                    await self.presence.unsubscribe(room)

    # ------------------------------------------------------------------ reads

    async def view(self, room: str) -> PresenceView:
        """Every member of `room` on every relay: one backend read. BackendUnavailable
        when the backend cannot answer."""
        written = self._written()
        if written is not None:
            # This relay's own joins and leaves so far are in the answer.
            await asyncio.shield(written)
        watch = self.watches.get(room)
        log: list[_Event] = []
        if watch is not None:
            watch.reads.append(log)
        try:
            raw = await self.presence.members(room)
        finally:
            if watch is not None:
                with contextlib.suppress(ValueError):
                    watch.reads.remove(log)
        if len(raw) > THREAD_ENTRIES:
            members = await asyncio.to_thread(_decode, raw)
        else:
            members = _decode(raw)
        for kind, conn, _, doc in log:
            if kind == "leave":
                members.pop(conn, None)
            else:
                members[conn] = doc
        listed = list(members.values())
        count = len(listed)
        users = len({m.get("sub") for m in listed if m.get("sub") is not None})
        cap = self.max_members
        truncated = bool(cap) and count > cap
        if truncated:
            listed = listed[:cap]
        return PresenceView(listed, count, users, truncated)

    # ------------------------------------------------------------------ events

    def on_presence(self, room: str, kind: str, entry: bytes) -> None:
        watch = self.watches.get(room)
        if watch is None or kind not in ("join", "leave"):
            return
        cut = entry.rfind(_J_KEY)
        if cut >= 0 and entry.startswith(self.own_mark, cut):
            # One of this relay's members: its listeners were told when the write was
            # sent (`_announce`), and what the backend says of it later (a refresh that
            # re-wrote it on a new master, another relay that took it for dead) does not
            # change that it is here.
            return
        # A member's leave carries the entry of its join: parsed once for both.
        parsed = self._parsed.pop(entry, None) if kind == "leave" else None
        if parsed is None:
            parsed = _parse(entry)
            if parsed is None:
                logger.warning("room %s: malformed presence entry ignored", room)
                return
            if kind == "join":
                if len(self._parsed) >= PARSED_MAX:
                    self._parsed.clear()
                self._parsed[entry] = parsed
        conn, j, member, member_json = parsed
        self._event(room, watch, kind, conn, j, member, deliver=True, member_json=member_json)

    def _event(
        self,
        room: str,
        watch: _Watch,
        kind: str,
        conn: str,
        j: str,
        member: dict[str, Any],
        *,
        deliver: bool,
        member_json: bytes | None = None,
    ) -> None:
        if (conn, j) in watch.gone:
            return
        held = watch.known.get(conn)
        if kind == "join":
            if held is not None and held[0] == j:
                return
            watch.known[conn] = (j, member)
        else:
            if held is not None and held[0] == j:
                del watch.known[conn]
            self._bury(watch, conn, j)
        for log in watch.reads:
            log.append((kind, conn, j, member))
        if deliver and watch.listeners:
            self._pend(
                room, watch, _EventFrame(kind, room, watch.room_json, conn, member, member_json)
            )

    def _announce(self, taken: list[_Queued | None]) -> None:
        """The joins and leaves of this relay's members in a batch being sent, to its
        listeners (not through the backend: its copy of them is dropped, `on_presence`),
        in queue order. At sending, not at queueing: a leave that cancels its join's
        queued add leaves nothing to tell."""
        watches = self.watches
        for queued in taken:
            if queued is None or not queued[1]:
                continue
            (room, conn, entry, add), _ = queued
            watch = watches.get(room)
            if watch is None or (not watch.listeners and not watch.reads):
                continue
            kind = "join" if add else "leave"
            j, member, member_json = _own(entry)
            if watch.reads:
                if member is None:
                    member = json.loads(member_json)  # type: ignore[arg-type]
                for log in watch.reads:
                    log.append((kind, conn, j, member))
            if watch.listeners:
                event = _EventFrame(kind, room, watch.room_json, conn, member, member_json)
                self._pend(room, watch, event)

    def _pend(self, room: str, watch: _Watch, event: _EventFrame) -> None:
        """Send `event` with the room's other events held meanwhile, one write per
        listener for all of them: at the end of this loop turn if no events went out
        within `event_delay_s`, else once that much has passed since they did. One
        timer for the whole hub: after a period with no events on this relay an event
        goes at once; a busy relay writes each listener about once per period, not once
        per event (nor per turn: a turn held about one event per room, and the write was
        most of its cost)."""
        if not watch.pending:
            self._outbox[room] = watch
            if self._flusher is None:
                loop = asyncio.get_running_loop()
                wait = self._flushed_at + self.event_delay_s - loop.time()
                self._flusher = (
                    loop.call_later(wait, self._flush) if wait > 0 else loop.call_soon(self._flush)
                )
        watch.pending.append(event)
        watch.about.add(event.conn)

    def _flush(self) -> None:
        """Send the events held, room by room, in the order they came."""
        self._flusher = None
        self._flushed_at = asyncio.get_running_loop().time()
        outbox, self._outbox = self._outbox, {}
        for room, watch in outbox.items():
            if watch.pending and watch.listeners:
                self._send(room, watch)
            watch.sent()

    def _send(self, room: str, watch: _Watch) -> None:
        """The room's pending events to its listeners, each from where it started and
        except the events about itself: one write per listener, the frames back to back,
        joined once per subprotocol, start, and listener that some of the events are
        about."""
        try:
            events = watch.pending
            # An event is sent to all or to none: encoded once per subprotocol before it
            # is sent, and dropped if one of them cannot encode it.
            codecs = [codec for codec, count in watch.codecs.items() if count]
            for event in events:
                event.check(codecs)
                if event.bad:
                    logger.warning("room %s: presence entry cannot be encoded", room)
            starts, about = watch.starts, watch.about
            built: dict[tuple[Codec, str | None, int], tuple[bytes, int]] = {}
            sent = 0
            # A copy: a write that drops a member may take it out of the listeners.
            for writer, own in list(watch.listeners.items()):
                start = starts.get(writer, 0)
                key = (writer.codec, own if own in about else None, start)
                held = built.get(key)
                if held is None:
                    codec = writer.codec
                    frames = [e.frame(codec) for e in events[start:] if e.conn != own and not e.bad]
                    held = built[key] = (b"".join(frames), len(frames))
                data, count = held
                # A listener holding frames for the end of the turn (acks, a `left`) gets
                # these with them: one write, not two.
                later = writer._pending is not None
                if count and (writer.write_soon(data) if later else writer.write(data)):
                    sent += count
            if sent:
                self.metrics.presence_events.inc(sent)
        except Exception:
            # One room's failure must not hold up the others' events, nor a leave.
            logger.exception("room %s: sending presence events failed", room)

    def _bury(self, watch: _Watch, conn: str, j: str) -> None:
        now = time.monotonic()
        gone = watch.gone
        gone[(conn, j)] = now + 2 * self.ttl_s
        while gone:
            key, until = next(iter(gone.items()))
            if until > now and len(gone) <= TOMBSTONES_MAX:
                break
            del gone[key]

    def on_presence_resync(self) -> None:
        self._refresh_now.set()
        self._resynced = True

    async def _reconcile(self, room: str, watch: _Watch, *, deliver: bool) -> None:
        """Read the room's members and send the joins and leaves this relay has not seen
        (events lost while the subscription was being re-made). This relay's own members
        are not the backend's to tell (`_announce`)."""
        log: list[_Event] = []
        watch.reads.append(log)
        try:
            raw = await self.presence.members(room)
        finally:
            with contextlib.suppress(ValueError):
                watch.reads.remove(log)
        own = self._j_base.decode()
        current: dict[str, tuple[str, dict[str, Any]]] = {}
        for entry in raw:
            parsed = _parse(entry)
            if parsed is not None and not parsed[1].startswith(own):
                current[parsed[0]] = (parsed[1], parsed[2])
        for kind, conn, j, member in log:
            if j.startswith(own):
                continue
            if kind == "leave":
                if current.get(conn, ("",))[0] == j:
                    del current[conn]
            else:
                current[conn] = (j, member)
        for conn, (j, member) in list(watch.known.items()):
            if current.get(conn, ("",))[0] != j:
                self._event(room, watch, "leave", conn, j, member, deliver=deliver)
        for conn, (j, member) in current.items():
            self._event(room, watch, "join", conn, j, member, deliver=deliver)

    # ------------------------------------------------------------------ refresh

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.refresh_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await self._refresh_now.wait()
            self._refresh_now.clear()
            # The next refresh is due one period after this one starts, not after it ends:
            # a slow turn (a reconcile after a failover, a backend retrying) does not push
            # every later refresh back by its length, so a master that lost the entries has
            # them again within about one period (a CI run on a slower machine found one
            # relay's entries still missing 2 s after they were deleted, refresh 1 s). At
            # least a quarter period apart all the same: a slow backend is not refreshed
            # back to back.
            due = loop.time() + self.refresh_s
            resynced, self._resynced = self._resynced, False
            await self.refresh()
            await self._drop_idle_watches()
            if resynced:
                for room, watch in list(self.watches.items()):
                    try:
                        await self._reconcile(room, watch, deliver=True)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        logger.warning("presence resync of %s: %s", room, exc)
            due = max(due, loop.time() + self.refresh_s / 4)

    async def refresh(self) -> None:
        """Re-write every entry this relay holds (one call per room and batch)."""
        for room in list(self.local):
            entries = self.local.get(room)
            if not entries:
                continue
            # The snapshot and the refresh go together: a remove or re-identification
            # queued after it waits for the refresh (`_conflicts`). An entry whose add is
            # still queued is left to that add: its leave may cancel the add, and must
            # not find it written by the refresh.
            base = self._queue_base
            batch = {local.conn: local.entry for local in entries.values() if local.slot < base}
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._refreshing = (room, batch, done)
            try:
                await self.presence.refresh(room, batch, self.ttl_s)
            except asyncio.CancelledError:
                raise
            except BackendUnavailable as exc:
                logger.warning("presence refresh of %s: %s", room, exc)
            except Exception:
                logger.exception("presence refresh of %s failed", room)
            finally:
                self._refreshing = None
                done.set_result(None)

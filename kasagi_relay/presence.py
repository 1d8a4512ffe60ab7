"""Presence on this relay: its members' entries in the backend, and the events to members.

docs/protocol.md, presence. A member is one connection joined to a room; its entry is the
compact JSON `{"conn":C,"sub":S,"info":{...},"j":J}`, where `j` is unique per join (so a
connection that leaves and joins again is a new member, and a stale copy of an old entry
is told from it). The hub (one per relay):

- writes an entry when a member joins (`add`, in the background: a `presence` read waits
  for this relay's writes under way) and removes it when the member leaves, closes, is
  dropped (1013) or the relay stops (`leave`, in the background); a joiner that asked for
  events is subscribed (`watch`) before its `joined`. The operations of one member run
  in order: a remove waits for its add, so the backend announces a member's join before
  its leave;
- re-writes a member's entries with its new `info` when its token is refreshed
  (`reidentify`: same `j`, so no event), after the member's operations under way;
- re-writes every entry it holds every `refresh_s` (and at once after the event
  subscription was re-made: a new master may lack them), which also makes the backend
  take out the entries of relays that stopped refreshing (dead) and announce their leave;
- subscribes to the events of the rooms where one of its members asked for them (`join`
  with `"presence": true`) and sends each `presence_join` / `presence_leave` to those
  members, except the one it is about. Each event is sent at most once: a join already
  seen, or of a member whose leave was seen, is dropped (the backend may repeat one after
  a failover); a member's leave is never followed by its join;
- answers `presence` with one backend read, corrected by the events that arrived while
  the read was in flight (they may come in before its reply).

Costs are bounded: a reply lists at most `max_members` members (count and users exact),
is encoded off the event loop when large, and its bytes count in the connection's rate
limit (session.py); events count against each member's send queue like any frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from kasagi_relay.backends.base import Presence
from kasagi_relay.domain import BackendUnavailable, Identity
from kasagi_relay.fanout import Member
from kasagi_relay.metrics import Metrics
from kasagi_relay.protocol import Codec, encode_presence_event

__all__ = ["PresenceHub", "PresenceView"]

logger = logging.getLogger("kasagi_relay.presence")

# Leaves remembered per room (to drop a repeated event), and for how long past the TTL.
TOMBSTONES_MAX: Final = 100_000
# A read of more entries than this is decoded in a worker thread.
THREAD_ENTRIES: Final = 500
# How long close() waits for the removes under way (then the entries expire by TTL).
CLOSE_TIMEOUT_S: Final = 5.0


@dataclass(slots=True)
class _Local:
    conn: str
    entry: bytes
    events: bool
    # The member's last backend operation: the next one waits for it.
    last: asyncio.Future[None] | None = None


_Event = tuple[str, str, str, dict[str, Any]]


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


# `j`: this process's random prefix and a counter, unique per join without a call to
# the system's random source per join.
_J_BASE: Final = secrets.token_hex(4)
_J_SEQ = itertools.count()
# Entry heads cached per connection (the identity they were made of): a member joining
# and leaving rooms re-encodes nothing. Cleared whole past this size.
HEADS_MAX: Final = 65_536


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


def _entry(conn: str, who: Identity, head: bytes | None = None) -> bytes:
    if head is None:
        head = _head(conn, who)
    return b'%s%s%x"}' % (head, _J_BASE.encode(), next(_J_SEQ))


def _with_head(entry: bytes, head: bytes) -> bytes:
    """`entry` (same conn and `j`) with another head: the same member, new info."""
    return head + entry[entry.rindex(b',"j":"') + 6 :]


def _parse(entry: bytes) -> tuple[str, str, dict[str, Any]] | None:
    """(conn, j, wire member) of one stored entry; None when malformed."""
    try:
        doc = json.loads(entry)
        conn, j = doc["conn"], str(doc.get("j", ""))
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(conn, str):
        return None
    return conn, j, {"conn": conn, "sub": doc.get("sub"), "info": doc.get("info", {})}


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
    ) -> None:
        self.presence = presence
        self.metrics = metrics
        self.refresh_s = refresh_s
        self.ttl_s = ttl_s
        self.max_members = max_members
        # room -> writer -> its entry
        self.local: dict[str, dict[Member, _Local]] = {}
        self.watches: dict[str, _Watch] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_now = asyncio.Event()
        self._resynced = False
        # room -> its refresh under way (a remove waits for it)
        self._refreshing: dict[str, asyncio.Future[None]] = {}
        # conn -> (the identity, its entry head)
        self._heads: dict[str, tuple[Identity, bytes]] = {}
        presence.set_listener(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh_loop())
            self._refresher.set_name("kasagi-presence-refresh")

    async def close(self) -> None:
        """Wait (bounded) for the removes under way, then stop refreshing."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ members

    def holds(self, room: str, member: Member) -> bool:
        return member in self.local.get(room, {})

    async def watch(self, room: str) -> None:
        """Subscribe to the room's events (before a joiner that asked for them gets its
        `joined`, so that it misses none after it)."""
        await self._watch(room)

    def join(self, room: str, member: Member, conn: str, who: Identity, events: bool) -> None:
        """Make `member` present in `room`: its entry is written in the background (a
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
        local = entries[member] = _Local(conn, _entry(conn, who, self._head(conn, who)), events)
        self.metrics.presence_entries.inc()
        self._chain(local, lambda: self.presence.add(room, conn, local.entry, self.ttl_s))

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
        the new `info`, in the background, each after the member's operations under way.
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
            self._chain(
                local,
                functools.partial(self.presence.add, room, conn, entry, self.ttl_s),
                self._refreshing.get(room),
            )

    def listen(self, room: str, member: Member) -> None:
        """From now on `member` gets the room's events (after its `joined`)."""
        local = self.local.get(room, {}).get(member)
        watch = self.watches.get(room)
        if local is not None and local.events and watch is not None:
            watch.listeners[member] = local.conn
            watch.idle_since = None

    def leave(self, room: str, member: Member) -> None:
        """`member` is no longer in `room`: its leave goes out in the background."""
        entries = self.local.get(room)
        local = entries.pop(member, None) if entries is not None else None
        if entries is not None and not entries:
            del self.local[room]
        watch = self.watches.get(room)
        if watch is not None and member in watch.listeners:
            del watch.listeners[member]
        if watch is not None and not watch.listeners and watch.idle_since is None:
            # Kept subscribed for a while (rejoins are common): the refresh loop
            # unsubscribes rooms nobody has watched for a refresh period.
            watch.idle_since = time.monotonic()
        if local is None:
            return
        self.metrics.presence_entries.dec()
        # After a refresh of the room under way, which may hold this entry still.
        self._chain(
            local,
            lambda: self.presence.remove(room, local.conn, local.entry),
            self._refreshing.get(room),
        )

    def _chain(
        self,
        local: _Local,
        op: Callable[[], Awaitable[None]],
        also: asyncio.Future[None] | None = None,
    ) -> asyncio.Future[None]:
        previous = [f for f in (local.last, also) if f is not None and not f.done()]
        if not previous:
            # The common case (a join, a leave long after it): no wrapper coroutine.
            task = local.last = self._spawn(op())
            return task

        async def run() -> None:
            for f in previous:
                with contextlib.suppress(Exception):
                    await asyncio.shield(f)
            await op()

        task = local.last = self._spawn(run())
        return task

    def _spawn(self, aw: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, BackendUnavailable):
                logger.error("presence: %s", exc, exc_info=exc)

    async def _watch(self, room: str) -> None:
        held = self.watches.get(room)
        if held is not None:
            held.idle_since = None  # not unsubscribed under this joiner
            if held.ready is not None:
                # Subscribing for another joiner: ready when it is.
                await asyncio.shield(held.ready)
            return
        watch = self.watches[room] = _Watch(idle_since=time.monotonic())
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
        pending = [
            local.last
            for local in self.local.get(room, {}).values()
            if local.last is not None and not local.last.done()
        ]
        if pending:
            # This relay's own joins and leaves so far are in the answer.
            await asyncio.gather(*pending, return_exceptions=True)
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
        parsed = _parse(entry)
        if parsed is None:
            logger.warning("room %s: malformed presence entry ignored", room)
            return
        conn, j, member = parsed
        self._event(room, watch, kind, conn, j, member, deliver=True)

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
        if not deliver:
            return
        payloads: dict[Codec, bytes] = {}
        sent = 0
        for writer, own in list(watch.listeners.items()):
            if own == conn:
                continue  # not about itself
            payload = payloads.get(writer.codec)
            if payload is None:
                try:
                    payload = payloads[writer.codec] = encode_presence_event(
                        writer.codec, kind, room, member
                    )
                except (ValueError, TypeError, OverflowError):
                    logger.warning("room %s: presence entry cannot be encoded", room)
                    return
            if writer.send(payload):
                sent += 1
        if sent:
            self.metrics.presence_events.inc(sent)

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
        (events lost while the subscription was being re-made)."""
        log: list[_Event] = []
        watch.reads.append(log)
        try:
            raw = await self.presence.members(room)
        finally:
            with contextlib.suppress(ValueError):
                watch.reads.remove(log)
        current: dict[str, tuple[str, dict[str, Any]]] = {}
        for entry in raw:
            parsed = _parse(entry)
            if parsed is not None:
                current[parsed[0]] = (parsed[1], parsed[2])
        for kind, conn, j, member in log:
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
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_s):
                    await self._refresh_now.wait()
            self._refresh_now.clear()
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

    async def refresh(self) -> None:
        """Re-write every entry this relay holds (one call per room and batch)."""
        for room in list(self.local):
            entries = self.local.get(room)
            if not entries:
                continue
            batch = {local.conn: local.entry for local in entries.values()}
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._refreshing[room] = done
            try:
                await self.presence.refresh(room, batch, self.ttl_s)
            except asyncio.CancelledError:
                raise
            except BackendUnavailable as exc:
                logger.warning("presence refresh of %s: %s", room, exc)
            except Exception:
                logger.exception("presence refresh of %s failed", room)
            finally:
                done.set_result(None)
                if self._refreshing.get(room) is done:
                    del self._refreshing[room]

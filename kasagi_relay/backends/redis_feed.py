"""The channel feed: live deltas from the rooms' Redis channels (the `Feed` role).

Pub/sub is a doorbell, the `ops` stream is the truth. One pub/sub connection to the
link's master carries every active room plus a private probe channel; a supervisor task
owns it. A subscriber on a frozen master hangs silently (no error, no EOF), so the
supervisor PINGs on the subscription whenever it has been quiet and declares it dead when
no reply comes in time. On any doubt (a lost connection, a silent probe, the locator saying
the master moved) it reconnects to the master the locator names now, re-subscribes every
room, waits for the confirmations, and only then tells the listener to resync (the backfill
signal), so the relay backfills each room from `ops` with nothing falling between the two.

In a Redis Cluster (`sharded`), each shard has its own feed over its own link: rooms are
subscribed with SSUBSCRIBE, one channel per command (every channel of one SSUBSCRIBE must
share a slot), the probe channel stays a plain SUBSCRIBE, and a server-sent `sunsubscribe`
of a room still wanted (its slot moved to another shard) or a MOVED reply is passed to
`slot_moved`, so the cluster router re-homes the room (redis_cluster.py).

The presence events of the rooms (`room:{R}:presence-events`) travel on a second feed of
the same class, built with `channel`, `channel_re` and `on_message` (redis_presence.py):
the same supervisor, probe and resync, carrying messages that are not deltas.

The subscription's replies are read straight from the connection's hiredis reader (redis-py
sends the commands): every complete reply one socket read brings is handled in one pass, so
that the messages of one batch of publishes reach the rooms in one loop turn and merge into
one frame.

After a re-subscription it also compares the last deltas it delivered with what the master
stores: a delta published but lost in a failover makes the log's next read at or past it
answer "trimmed" once (`take_divergence`), so the relay resets that room.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio.client import PubSub
from redis.exceptions import AskError
from redis.exceptions import ConnectionError as RedisConnectionError

from kasagi_relay.backends.base import Listener
from kasagi_relay.backends.redis_link import MasterLink
from kasagi_relay.backends.redis_store import channel_key, room_keys
from kasagi_relay.domain import BackendUnavailable, Op
from kasagi_relay.loops import cancel_and_wait

__all__ = ["ChannelFeed"]

logger = logging.getLogger("kasagi_relay.backends.redis")

_CHANNEL = re.compile(rb"room:\{(.+)\}:channel")
_MSG_SEQ = re.compile(rb'\{"seq":(\d+),')
_RECENT = 64  # delivered deltas remembered per room to detect a lossy failover
_NAMES_MAX = 65536  # channel names remembered (channel -> room) before starting over
_READ_WAIT_S = 0.1  # the longest a read waits before the loop looks at its probe and doubts
_MESSAGE_KINDS = frozenset((b"message", b"smessage"))


class _Doubt(Exception):
    """The subscription may have missed messages (or the master moved)."""


# Delivered deltas up to this size are remembered as they are (the room holds the same
# bytes among its recent ops), larger ones by a digest: hashing each delta cost as much as
# the rest of its delivery.
_KEEP_BYTES = 1024


def _fingerprint(data: bytes) -> bytes:
    """What is remembered of a delivered message: equal for equal messages only (the same
    bytes have the same length, hence the same form)."""
    if len(data) <= _KEEP_BYTES:
        return data
    return hashlib.blake2b(data, digest_size=16).digest()


class ChannelFeed:
    def __init__(
        self,
        link: MasterLink,
        *,
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
        sharded: bool = False,
        slot_moved: Callable[[str], None] | None = None,
        channel: Callable[[str], str] = channel_key,
        channel_re: re.Pattern[bytes] = _CHANNEL,
        on_message: Callable[[str, bytes], None] | None = None,
        on_resync: Callable[[], None] | None = None,
    ) -> None:
        self.link = link
        # Which channel a room has, and the raw delivery of another kind of message (not
        # deltas: no seq, no history check) with its own resync signal.
        self._channel_of = channel
        self._channel_re = channel_re
        self._on_message = on_message
        self._on_resync = on_resync
        self.sharded = sharded
        self._slot_moved = slot_moved
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.listener: Listener | None = None
        self.rooms: set[str] = set()
        # Last deltas delivered per room, and the first seq found lost after a failover.
        self._recent: dict[str, deque[tuple[int, bytes]]] = {}
        # channel -> room (None: not a room channel), so that a message costs a dict
        # lookup, not a regex match and a decode.
        self._names: dict[bytes, str | None] = {}
        self._diverged: dict[str, int] = {}
        self._pubsub: PubSub | None = None
        self.ready = asyncio.Event()  # subscribed, every room confirmed
        # ready, and the resync after it handed to the listener: what health reports (a
        # relay is not healthy while its rooms have yet to hear that they may have missed
        # something).
        self.caught_up = False
        self._confirmed: set[bytes] = set()
        self._confirm_pulse = asyncio.Event()
        self._doubt_event = asyncio.Event()
        self._doubt_reason = ""
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._probe_channel = f"kasagi:probe:{secrets.token_hex(8)}"
        self.subscriptions = 0  # successful (re)subscriptions
        self.resyncs = 0

    # ------------------------------------------------------------------ the Feed role

    def set_listener(self, listener: Listener) -> None:
        self.listener = listener

    async def subscribe(self, room: str) -> None:
        """Returns once the room's channel is subscribed (so a read of the history after
        this misses nothing); BackendUnavailable when that cannot happen in time."""
        self.rooms.add(room)
        channel = self._channel_of(room).encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.link.op_timeout_s
        sent_on: PubSub | None = None
        while room in self.rooms:
            if self.ready.is_set() and channel in self._confirmed:
                return
            left = deadline - loop.time()
            if left <= 0:
                raise BackendUnavailable(f"cannot subscribe to {room}: no master")
            ps = self._pubsub
            # Taken before sending: a confirmation read while the command is sent pulses
            # this one (taken after, the wait would sleep its whole timeout).
            pulse = self._confirm_pulse
            if self.ready.is_set() and ps is not None and sent_on is not ps:
                sent_on = ps
                try:
                    await self._subscribe(ps, [channel])
                except Exception as exc:
                    self.doubt(f"subscribe failed: {exc}")
            if channel in self._confirmed and self.ready.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.25)):
                    await pulse.wait()

    async def unsubscribe(self, room: str) -> None:
        self.rooms.discard(room)
        self._recent.pop(room, None)
        channel = self._channel_of(room).encode()
        self._confirmed.discard(channel)
        ps = self._pubsub
        if ps is not None and self.ready.is_set():
            with contextlib.suppress(Exception):
                if self.sharded:
                    await ps.sunsubscribe(channel)
                else:
                    await ps.unsubscribe(channel)

    async def _subscribe(self, ps: PubSub, channels: list[bytes]) -> None:
        if not channels:
            return
        if not self.sharded:
            await ps.subscribe(*channels)
            return
        # One SSUBSCRIBE per channel: the channels of one command must share a slot.
        for channel in channels:
            await ps.ssubscribe(channel)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._closing = False
        if self._task is None:
            self._task = asyncio.ensure_future(self._supervise())
            self._task.set_name("kasagi-redis-subscriber")

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        self.rooms.clear()

    def doubt(self, reason: str) -> None:
        """The subscription may have missed something: re-subscribe and resync."""
        if not self._doubt_event.is_set():
            self._doubt_reason = reason
            self._doubt_event.set()
        self.link.wake()

    def take_divergence(self, room: str, after: int) -> bool:
        """Whether a reader holding `room` up to `after` holds a delta the master lost
        (answered True once: the reader then resets)."""
        bad = self._diverged.get(room)
        if bad is not None and after >= bad:
            del self._diverged[room]
            return True
        return False

    # ------------------------------------------------------------------ the supervisor

    def _pulse(self) -> None:
        self._confirm_pulse.set()
        self._confirm_pulse = asyncio.Event()

    async def _supervise(self) -> None:
        delay = 0.02
        while not self._closing:
            ready_before = self.subscriptions
            try:
                await self.link.connect_current()
                await self._run_subscription()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    logger.warning("redis feed: subscription lost: %s", exc)
                if isinstance(exc, AskError) and self._slot_moved is not None:
                    # MOVED/ASK to an SSUBSCRIBE: a room here belongs to another shard now.
                    self._slot_moved(str(exc))
            self.ready.clear()
            self._confirmed.clear()
            self._pulse()
            if self._closing:
                return
            # Back off while nothing works; a subscription that was up retries at once.
            delay = 0.02 if self.subscriptions != ready_before else min(delay * 2, 0.25)
            await self.link.nap(delay)

    async def _run_subscription(self) -> None:
        ps = self.link.client().pubsub()
        self._doubt_event.clear()
        self._confirmed.clear()
        try:
            self._pubsub = ps
            channels = [self._probe_channel.encode()] + [
                self._channel_of(r).encode() for r in sorted(self.rooms)
            ]
            loop = asyncio.get_running_loop()

            async def setup() -> None:
                await ps.subscribe(channels[0])
                await self._subscribe(ps, channels[1:])
                # Every channel confirmed before anyone reads history: nothing falls between.
                while not all(c in self._confirmed for c in channels):
                    self._handle(await ps.get_message(timeout=0.1))

            # Connecting to a frozen server blocks in the handshake until the socket
            # timeout: let a doubt (the Sentinels named another master) cut it short.
            async with asyncio.timeout(self.probe_timeout_s + self.link.socket_timeout_s):
                await self._or_doubt(setup())
            self.ready.set()
            self.subscriptions += 1
            self._pulse()
            if self._on_resync is not None:
                self.resyncs += 1
                with contextlib.suppress(Exception):
                    self._on_resync()
            if self.rooms and self.listener is not None:
                with contextlib.suppress(Exception):
                    await self._check_history()
                # Anything published while we were not subscribed is in `ops` only.
                self.resyncs += 1
                self.listener.on_resync(None)
            self.caught_up = True
            # The lean reader: with hiredis (a dependency), replies are taken straight
            # from the connection's RESP reader, skipping PubSub.get_message's per-message
            # machinery (a dict, a health check, a timeout per message). Commands
            # (SUBSCRIBE, PING...) still go out through `ps`; their replies come here.
            parser = getattr(ps.connection, "_parser", None)
            lean = isinstance(parser, _AsyncHiredisParser)
            last_rx = loop.time()
            ping_at: float | None = None
            while not self._closing:
                if self._doubt_event.is_set():
                    raise _Doubt(self._doubt_reason)
                now = loop.time()
                if ping_at is None and now - last_rx >= self.probe_interval_s:
                    async with asyncio.timeout(self.probe_timeout_s):
                        await ps.ping()
                    ping_at = now
                elif ping_at is not None and now - ping_at > self.probe_timeout_s:
                    raise _Doubt(f"no reply on the subscription for {self.probe_timeout_s}s")
                if lean:
                    assert isinstance(parser, _AsyncHiredisParser)
                    # Every reply already buffered, then at most one read from the socket:
                    # what one read brings (many messages under load) is handled in one go.
                    # The reader is looked up each time: a reconnect gives the parser a new one.
                    got = self._drain(parser)
                    if not got:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(_READ_WAIT_S):
                                await parser.read_from_socket()  # type: ignore[no-untyped-call]
                        got = self._drain(parser)
                    if got:
                        last_rx = loop.time()
                        ping_at = None
                    continue
                message = await ps.get_message(timeout=_READ_WAIT_S)
                if message is not None:
                    last_rx = loop.time()
                    ping_at = None
                    self._handle(message)
        finally:
            self.ready.clear()
            self.caught_up = False
            self._pubsub = None
            self.link.background(ps.aclose())  # type: ignore[no-untyped-call]

    async def _check_history(self) -> None:
        """After a re-subscription: did this master lose deltas we already delivered?

        A delta is published to subscribers before it reaches any replica; if the master
        dies in between, relays hold it while the new master reuses its seq for another
        delta (or has not reached it yet). Compare the last deltas delivered with what is
        stored; the first mismatch makes read_ops return None once for a caller at or past
        it, so the relay resets that room from what is stored instead of diverging."""
        rooms = [(r, list(q)) for r, q in self._recent.items() if q and r in self.rooms]
        if not rooms:
            return
        pipe = self.link.client().pipeline(transaction=False)
        for room, recent in rooms:
            k = room_keys(room)
            pipe.xrange(k["ops"], min=f"{recent[0][0]}-0", max=f"{recent[-1][0]}-0")
            pipe.get(k["seq"])
        replies = await pipe.execute()
        for i, (room, recent) in enumerate(rooms):
            entries, last_raw = replies[2 * i], replies[2 * i + 1]
            last = int(last_raw or 0)
            stored = {}
            for entry_id, fields in entries:
                seq = int(entry_id.split(b"-", 1)[0])
                kind, d = fields.get(b"k", b""), fields.get(b"d", b"")
                stored[seq] = _fingerprint(b'{"seq":%d,"%s":%s}' % (seq, kind, d))
            for seq, data in recent:
                have = stored.get(seq)
                # Missing below `last` is trimming, not loss; only beyond it is loss.
                if (have is not None and have != data) or (have is None and seq > last):
                    logger.warning("room %s: seq %d was lost in the failover: reset", room, seq)
                    self._diverged[room] = seq
                    self._recent.pop(room, None)
                    break

    async def _or_doubt(self, aw: Awaitable[None]) -> None:
        """Await `aw`, unless a doubt comes first (then cancel it and raise _Doubt)."""
        task = asyncio.ensure_future(aw)
        doubt = asyncio.ensure_future(self._doubt_event.wait())
        try:
            await asyncio.wait({task, doubt}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
                return
            raise _Doubt(self._doubt_reason)
        finally:
            for t in (task, doubt):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t

    def _drain(self, parser: _AsyncHiredisParser) -> int:
        """Handle every complete reply in the parser's hiredis buffer; how many there were."""
        reader = parser._reader
        if reader is None:
            raise RedisConnectionError("the subscription's connection is closed")
        n = 0
        deliver = self._deliver
        while True:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                return n
            n += 1
            if isinstance(reply, list) and len(reply) == 3 and reply[0] in _MESSAGE_KINDS:
                deliver(reply[1], reply[2])
            elif isinstance(reply, list) and reply:
                kind = reply[0]
                self._handle({"type": kind, "channel": reply[1] if len(reply) > 1 else None})
            elif isinstance(reply, RedisConnectionError):
                raise reply
            elif isinstance(reply, Exception):
                # An error reply (a MOVED to an SSUBSCRIBE...): as get_message would raise.
                raise reply

    def _handle(self, message: dict[str, Any] | None) -> None:
        if message is None:
            return
        kind = message.get("type")
        if kind in ("message", b"message", "smessage", b"smessage"):
            self._deliver(message["channel"], message["data"])
        elif kind in ("subscribe", b"subscribe", "ssubscribe", b"ssubscribe"):
            channel = message["channel"]
            self._confirmed.add(channel if isinstance(channel, bytes) else str(channel).encode())
            self._pulse()
        elif kind in ("sunsubscribe", b"sunsubscribe"):
            self._shard_unsubscribed(message["channel"])

    def _shard_unsubscribed(self, channel: Any) -> None:
        """A `sunsubscribe`: ours (unsubscribe), or the server's when the channel's slot
        left this shard; for a room still wanted, the router must re-home it."""
        raw = channel if isinstance(channel, bytes) else str(channel).encode()
        m = self._channel_re.fullmatch(raw)
        if m is None or m.group(1).decode() not in self.rooms:
            return
        self._confirmed.discard(raw)
        if self._slot_moved is not None:
            self._slot_moved(f"the slot of room {m.group(1).decode()} moved")

    def _room_of(self, channel: bytes) -> str | None:
        """The room of a channel not seen yet (or forgotten)."""
        m = self._channel_re.fullmatch(channel)
        room = None if m is None else m.group(1).decode()
        if len(self._names) >= _NAMES_MAX:
            self._names.clear()
        self._names[channel] = room
        return room

    def _deliver(self, channel: bytes, data: bytes) -> None:
        try:
            room = self._names[channel]
        except KeyError:
            room = self._room_of(channel)
        if room is None or room not in self.rooms:
            return
        if self._on_message is not None:
            try:
                self._on_message(room, bytes(data))
            except Exception:
                logger.exception("listener failed on a message of %s", room)
            return
        if self.listener is None:
            return
        seq_m = _MSG_SEQ.match(data)
        try:
            seq = int(seq_m.group(1)) if seq_m else int(json.loads(data)["seq"])
        except (ValueError, KeyError, TypeError):
            # Not from kasagi_publish: unordered, so skip it; the next op's gap backfills.
            logger.warning("room %s: channel message without a seq ignored", room)
            return
        recent = self._recent.get(room)
        if recent is None:
            recent = self._recent[room] = deque(maxlen=_RECENT)
        recent.append((seq, data if len(data) <= _KEEP_BYTES else _fingerprint(data)))
        try:
            self.listener.on_op(room, Op(seq, data))
        except Exception:
            logger.exception("listener failed on %s seq %d", room, seq)

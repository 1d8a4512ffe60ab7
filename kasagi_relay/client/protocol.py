"""The client side of the wire protocol, Sans-I/O: requests out, replies in, one room's stream.

Nothing here touches a socket or an event loop (docs/protocol.md describes the messages):

- `encode_auth`, `encode_join`, `encode_leave`, `encode_delta`, `encode_presence` build one
  request for a subprotocol;
- `parse` turns one received WebSocket message into a typed reply (`Authed`, `Joined`,
  `Left`, `Ack`, `ErrorReply`, `DeltaFrame`, `Reset`, `Presence`, `PresenceEvent`, or
  `Other` for types this client does not know, which the protocol says to ignore);
- `RoomStream` is one room's `(seq, state)`: it applies a `delta` whose `from` is `seq + 1`
  with `kasagi_relay.delta` (the native engine, or the pure twin under
  `KASAGI_PURE_PYTHON=1`), replaces the state on a full `joined` and on `reset`, and answers
  "rejoin with since" on anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack

from kasagi_relay import delta
from kasagi_relay.domain import valid_room

__all__ = [
    "FORMATS",
    "SUBPROTOCOLS",
    "Ack",
    "Applied",
    "Authed",
    "DeltaFrame",
    "ErrorReply",
    "Format",
    "Joined",
    "Left",
    "Other",
    "Presence",
    "PresenceEvent",
    "ProtocolError",
    "Rejoin",
    "Replaced",
    "Reply",
    "Reset",
    "RoomStream",
    "encode_auth",
    "encode_delta",
    "encode_join",
    "encode_leave",
    "encode_presence",
    "json_bytes",
    "parse",
]

Format = Literal["json", "msgpack"]
FORMATS: Final[tuple[Format, ...]] = ("json", "msgpack")
SUBPROTOCOLS: Final[dict[Format, str]] = {
    "json": "kasagi.v1.json",
    "msgpack": "kasagi.v1.msgpack",
}
MAX_KEY_CHARS: Final = 64

RequestId = int | str


class ProtocolError(ValueError):
    """The relay sent something docs/protocol.md does not allow (a malformed reply)."""


def json_bytes(value: object) -> bytes:
    """Compact UTF-8 JSON, the form the delta engine takes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- requests


def _encode(fmt: Format, message: dict[str, Any]) -> str | bytes:
    # JSON goes in text frames and MessagePack in binary frames (docs/protocol.md, transport).
    if fmt == "msgpack":
        return bytes(msgpack.packb(message, use_bin_type=True))
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def encode_auth(fmt: Format, token: str, id: RequestId | None = None) -> str | bytes:
    """`auth`: authenticate the connection, or refresh its token (docs/protocol.md)."""
    if not isinstance(token, str) or not token:
        raise ValueError("a token is a non-empty string")
    message: dict[str, Any] = {"t": "auth", "token": token}
    if id is not None:
        message["id"] = id
    return _encode(fmt, message)


def encode_join(
    fmt: Format,
    room: str,
    since: int | None = None,
    id: RequestId | None = None,
    presence: bool = False,
) -> str | bytes:
    """A `join`; `presence` also asks for the room's presence_join / presence_leave."""
    if not valid_room(room):
        raise ValueError(f"not a valid room name: {room!r}")
    if since is not None and (isinstance(since, bool) or since < 0):
        raise ValueError(f"since must be a non-negative integer, not {since!r}")
    message: dict[str, Any] = {"t": "join", "room": room}
    if since is not None:
        message["since"] = since
    if presence:
        message["presence"] = True
    if id is not None:
        message["id"] = id
    return _encode(fmt, message)


def encode_presence(fmt: Format, room: str, id: RequestId | None = None) -> str | bytes:
    """A `presence` request: every member of the room on every relay."""
    if not valid_room(room):
        raise ValueError(f"not a valid room name: {room!r}")
    message: dict[str, Any] = {"t": "presence", "room": room}
    if id is not None:
        message["id"] = id
    return _encode(fmt, message)


def encode_leave(fmt: Format, room: str, id: RequestId | None = None) -> str | bytes:
    if not valid_room(room):
        raise ValueError(f"not a valid room name: {room!r}")
    message: dict[str, Any] = {"t": "leave", "room": room}
    if id is not None:
        message["id"] = id
    return _encode(fmt, message)


def encode_delta(
    fmt: Format,
    room: str,
    *,
    patch: list[Any] | None = None,
    merge: Any = None,
    key: str | None = None,
    id: RequestId | None = None,
) -> str | bytes:
    """A `delta` request: exactly one of `patch` (RFC 6902) or `merge` (RFC 7396)."""
    if not valid_room(room):
        raise ValueError(f"not a valid room name: {room!r}")
    if (patch is None) == (merge is None):
        raise ValueError("give exactly one of patch= or merge=")
    if patch is not None and not isinstance(patch, list):
        raise ValueError("patch must be a list of RFC 6902 operations")
    if key is not None and not 1 <= len(key) <= MAX_KEY_CHARS:
        raise ValueError(f"key must be 1-{MAX_KEY_CHARS} characters")
    message: dict[str, Any] = {"t": "delta", "room": room}
    if patch is not None:
        message["patch"] = patch
    else:
        message["merge"] = merge
    if key is not None:
        message["key"] = key
    if id is not None:
        message["id"] = id
    return _encode(fmt, message)


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Joined:
    room: str
    seq: int
    state: bytes | None  # compact JSON; None when resumed (the missed deltas follow)
    id: RequestId | None = None
    conn: str | None = None  # this connection's id (v1.1), as presence shows it

    @property
    def resumed(self) -> bool:
        return self.state is None


@dataclass(frozen=True, slots=True)
class Left:
    room: str
    id: RequestId | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Authed:
    """The relay accepted a token: who the connection is and until when (Unix seconds)."""

    sub: str
    exp: float
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    room: str
    seq: int
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: str
    message: str
    id: RequestId | None = None
    room: str | None = None


@dataclass(frozen=True, slots=True)
class DeltaFrame:
    """Deltas `first`..`seq` of a room as one delta document (`{"patch":..}`/`{"merge":..}`)."""

    room: str
    first: int
    seq: int
    doc: bytes

    @property
    def delta(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.doc)
        return value


@dataclass(frozen=True, slots=True)
class Reset:
    room: str
    seq: int
    state: bytes


@dataclass(frozen=True, slots=True)
class Other:
    """A message type this client does not handle (ignored, as docs/protocol.md asks)."""

    t: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Presence:
    """The reply to `presence`: `members` (each `{"conn","sub","info"}`), `count`, `users`
    (distinct non-null subs); `truncated` when the relay listed fewer than `count`."""

    room: str
    members: list[dict[str, Any]]
    count: int
    users: int
    id: RequestId | None = None
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """`presence_join` (`joined` True) or `presence_leave` of one member of a room."""

    room: str
    joined: bool
    member: dict[str, Any]

    @property
    def conn(self) -> str:
        conn: str = self.member["conn"]
        return conn


Reply = (
    Authed
    | Joined
    | Left
    | Ack
    | ErrorReply
    | DeltaFrame
    | Reset
    | Presence
    | PresenceEvent
    | Other
)


def _decode(data: str | bytes) -> dict[str, Any]:
    # Text frames are JSON and binary frames MessagePack, whatever was negotiated: the relay
    # answers in the negotiated one, and this keeps the parser free of connection state.
    try:
        value = json.loads(data) if isinstance(data, str) else msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable message: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("a message must be an object")
    return value


def _seq(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{obj.get('t')}: {name} must be a non-negative integer")
    return value


def _room(obj: dict[str, Any]) -> str:
    room = obj.get("room")
    if not isinstance(room, str):
        raise ProtocolError(f"{obj.get('t')}: room missing")
    return room


def _id(obj: dict[str, Any]) -> RequestId | None:
    value = obj.get("id")
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def _member(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("conn"), str)
        and (value.get("sub") is None or isinstance(value.get("sub"), str))
        and isinstance(value.get("info", {}), dict)
    )


def parse(data: str | bytes) -> Reply:
    """One message from the relay as a typed reply; ProtocolError if it is malformed."""
    obj = _decode(data)
    t = obj.get("t")
    if t == "delta":
        first, seq = _seq(obj, "from"), _seq(obj, "seq")
        if first > seq or first == 0:
            raise ProtocolError(f"delta: from {first} with seq {seq}")
        if ("patch" in obj) == ("merge" in obj):
            raise ProtocolError("delta: exactly one of patch or merge")
        doc = {"patch": obj["patch"]} if "patch" in obj else {"merge": obj["merge"]}
        return DeltaFrame(_room(obj), first, seq, json_bytes(doc))
    if t == "joined":
        conn = obj.get("conn")
        if conn is not None and not isinstance(conn, str):
            raise ProtocolError("joined: conn must be a string")
        if obj.get("resumed"):
            return Joined(_room(obj), _seq(obj, "seq"), None, _id(obj), conn)
        if "state" not in obj:
            raise ProtocolError("joined: neither state nor resumed")
        return Joined(_room(obj), _seq(obj, "seq"), json_bytes(obj["state"]), _id(obj), conn)
    if t == "authed":
        sub, exp = obj.get("sub"), obj.get("exp")
        if not isinstance(sub, str) or isinstance(exp, bool) or not isinstance(exp, int | float):
            raise ProtocolError("authed: sub and exp required")
        return Authed(sub, float(exp), _id(obj))
    if t == "presence":
        members = obj.get("members")
        if not isinstance(members, list) or not all(_member(m) for m in members):
            raise ProtocolError("presence: members must be a list of members")
        return Presence(
            _room(obj),
            members,
            _seq(obj, "count"),
            _seq(obj, "users"),
            _id(obj),
            obj.get("truncated") is True,
        )
    if t in ("presence_join", "presence_leave"):
        member = obj.get("member")
        if not _member(member):
            raise ProtocolError(f"{t}: member must be {{conn, sub, info}}")
        assert isinstance(member, dict)
        return PresenceEvent(_room(obj), t == "presence_join", member)
    if t == "ack":
        return Ack(_room(obj), _seq(obj, "seq"), _id(obj))
    if t == "error":
        code = obj.get("code")
        if not isinstance(code, str):
            raise ProtocolError("error: code missing")
        message = obj.get("message")
        room = obj.get("room")
        return ErrorReply(
            code,
            message if isinstance(message, str) else "",
            _id(obj),
            room if isinstance(room, str) else None,
        )
    if t == "reset":
        if "state" not in obj:
            raise ProtocolError("reset: state missing")
        return Reset(_room(obj), _seq(obj, "seq"), json_bytes(obj["state"]))
    if t == "left":
        code = obj.get("code")
        return Left(_room(obj), _id(obj), code if isinstance(code, str) else None)
    if not isinstance(t, str):
        raise ProtocolError("a message needs a type t")
    return Other(t, obj)


# --------------------------------------------------------------------------- one room


@dataclass(frozen=True, slots=True)
class Applied:
    """A delta frame applied: the state is now `seq`. `ok` False when it failed at its
    position and was a no-op, which docs/protocol.md makes the same for every party."""

    first: int
    seq: int
    doc: bytes
    ok: bool


@dataclass(frozen=True, slots=True)
class Replaced:
    """The state was replaced (a full `joined`, or a `reset`)."""

    seq: int
    reset: bool  # True for a `reset` message, False for a full `joined`


@dataclass(frozen=True, slots=True)
class Rejoin:
    """The stream cannot continue: send `join` with this `since` (None: a full join)."""

    since: int | None
    reason: str


class RoomStream:
    """One room's `(seq, state)` as the relay's stream describes it.

    Feed it every `joined`, `delta` and `reset` of its room. Until the first `joined`
    (and after `rejoin_sent()` until the next one) delta frames are ignored: they belong to
    a stream the next `joined` restarts."""

    def __init__(self, room: str) -> None:
        self.room = room
        self._state: delta.RoomState | None = None
        self._waiting = True
        # A resume went wrong: the state is kept (still shown) but only a full join fixes it.
        self._full = False

    @property
    def seq(self) -> int | None:
        """The last seq applied, None before the first `joined`."""
        return None if self._state is None else self._state.seq

    @property
    def synced(self) -> bool:
        """True between a `joined` and a gap or a lost connection."""
        return not self._waiting

    def state_json(self) -> bytes:
        return b"{}" if self._state is None else self._state.to_json()

    def since(self) -> int | None:
        """What the next `join` should carry: the last seq held, if any."""
        return None if self._full else self.seq

    def rejoin_sent(self) -> None:
        """A `join` went out (or the connection was lost): ignore frames until `joined`."""
        self._waiting = True

    def on_joined(self, msg: Joined) -> Replaced | Rejoin | None:
        """None when resumed at the seq held (the missed deltas follow)."""
        if msg.state is None:
            if self._state is None or self._full or msg.seq != self._state.seq:
                # Resumed from a seq we do not hold: only a full state can put us back.
                self._full = True
                self._waiting = True
                return Rejoin(None, f"resumed at {msg.seq}, held {self.seq}")
            self._waiting = False
            return None
        self._state = delta.RoomState(msg.state, msg.seq)
        self._waiting = False
        self._full = False
        return Replaced(msg.seq, reset=False)

    def on_reset(self, msg: Reset) -> Replaced:
        self._state = delta.RoomState(msg.state, msg.seq)
        return Replaced(msg.seq, reset=True)

    def on_delta(self, msg: DeltaFrame) -> Applied | Rejoin | None:
        """Applied; Rejoin on a gap or an overlap; None while waiting for a `joined`."""
        if self._waiting:
            return None
        state = self._state
        assert state is not None  # not waiting means joined
        if msg.first != state.seq + 1:
            self._waiting = True
            return Rejoin(state.seq, f"frame from {msg.first} after seq {state.seq}")
        ok = state.apply(msg.doc, msg.seq)
        return Applied(msg.first, msg.seq, msg.doc, ok)

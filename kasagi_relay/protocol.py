"""The wire protocol of PROTOCOL.md, Sans-I/O: messages in, typed requests out; replies out.

Nothing here touches a socket or an event loop. `parse` turns one WebSocket message into a
`Join`, `Leave` or `Delta` request, or raises `BadRequest` carrying the error to send back.
The `encode_*` functions build reply payloads for one subprotocol; `DeltaFrame` builds the
`delta`/`reset` payloads that fan out to many members by concatenating bytes around what
the engine already encoded, so the room state and the delta are never parsed again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, Literal

import msgpack

from kasagi_relay import delta
from kasagi_relay.backends.base import DeltaKind, valid_room

__all__ = [
    "JSON",
    "MSGPACK",
    "SUBPROTOCOLS",
    "BadRequest",
    "Codec",
    "Delta",
    "DeltaFrame",
    "ErrorCode",
    "Join",
    "Leave",
    "Request",
    "RequestId",
    "delta_doc",
    "encode_ack",
    "encode_error",
    "encode_joined",
    "encode_left",
    "parse",
    "peek_id",
    "split_delta_doc",
]

Codec = Literal["kasagi.v1.json", "kasagi.v1.msgpack"]
JSON: Final = "kasagi.v1.json"
MSGPACK: Final = "kasagi.v1.msgpack"
# Server preference order when a client offers both.
SUBPROTOCOLS: Final[tuple[Codec, ...]] = (JSON, MSGPACK)

ErrorCode = Literal[
    "bad_message",
    "bad_room",
    "bad_patch",
    "too_large",
    "rate_limited",
    "unauthorized",
    "forbidden",
    "unavailable",
    "internal",
]

RequestId = int | str
MAX_KEY_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: int | None = None
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    room: str
    kind: DeltaKind
    body: bytes  # compact JSON of the patch array / merge object, as the engine validated it
    key: str | None = None
    id: RequestId | None = None

    @property
    def doc(self) -> bytes:
        return delta_doc(self.kind, self.body)


Request = Join | Leave | Delta


class BadRequest(Exception):
    """The message cannot be served; `code`/`message` go back to the client as an `error`."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        id: RequestId | None = None,
        room: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.id = id
        self.room = room


# --------------------------------------------------------------------------- parsing


def parse(data: str | bytes, codec: Codec) -> Request:
    """Parse one message received on a connection that negotiated `codec`.

    Text frames are JSON whatever the subprotocol (handy when debugging a MessagePack client
    by hand); binary frames are MessagePack on `kasagi.v1.msgpack` and UTF-8 JSON on
    `kasagi.v1.json`."""
    obj = _decode(data, codec)
    return _parse_object(obj, data, is_json=isinstance(data, str) or codec == JSON)


def peek_id(data: str | bytes, codec: Codec) -> RequestId | None:
    """The request's `id` if it has a valid one, else None (for replies that do not parse
    the request otherwise, such as rate_limited)."""
    try:
        return _request_id(_decode(data, codec))
    except (BadRequest, AttributeError):
        return None


def _decode(data: str | bytes, codec: Codec) -> object:
    if isinstance(data, str) or codec == JSON:
        try:
            return json.loads(data)
        except RecursionError:
            raise BadRequest("bad_message", "message nested too deeply") from None
        except (ValueError, TypeError):
            raise BadRequest("bad_message", "message is not valid JSON") from None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises a handful of unrelated types for bad input
        raise BadRequest("bad_message", "message is not valid MessagePack") from None


def _request_id(obj: object) -> RequestId | None:
    if not isinstance(obj, dict):
        return None
    rid = obj.get("id")
    if rid is None:
        return None
    if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid
    raise BadRequest("bad_message", "id must be an integer or a string")


def _parse_object(obj: object, raw: str | bytes, *, is_json: bool) -> Request:
    if not isinstance(obj, dict):
        raise BadRequest("bad_message", "message must be an object")
    rid = _request_id(obj)
    t = obj.get("t")
    if t is None:
        raise BadRequest("bad_message", "missing field t", rid)
    if t not in ("join", "leave", "delta"):
        raise BadRequest("bad_message", f"unknown message type {_short(t)}", rid)
    if "room" not in obj:
        raise BadRequest("bad_message", "missing field room", rid)
    room = obj["room"]
    if not valid_room(room):
        raise BadRequest("bad_room", f"invalid room name {_short(room)}", rid)
    assert isinstance(room, str)
    if t == "join":
        since = obj.get("since")
        if since is not None and (
            not isinstance(since, int) or isinstance(since, bool) or since < 0
        ):
            raise BadRequest("bad_message", "since must be a non-negative integer", rid, room)
        return Join(room, since, rid)
    if t == "leave":
        return Leave(room, rid)
    return _parse_delta(obj, raw, room, rid, is_json=is_json)


def _parse_delta(
    obj: dict[object, object], raw: str | bytes, room: str, rid: RequestId | None, *, is_json: bool
) -> Delta:
    key = obj.get("key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
        raise BadRequest(
            "bad_message", f"key must be a string of 1 to {MAX_KEY_CHARS} characters", rid, room
        )
    has_patch, has_merge = "patch" in obj, "merge" in obj
    if not has_patch and not has_merge:
        raise BadRequest("bad_message", "missing field patch or merge", rid, room)
    if has_patch and has_merge:
        raise BadRequest("bad_patch", "a delta holds either patch or merge, not both", rid, room)
    if is_json:
        # The engine reads the message itself (other members are ignored): the delta is
        # parsed by the engine's rules (depth, numbers) rather than re-serialized by us.
        source: str | bytes = raw
    else:
        kind = "patch" if has_patch else "merge"
        try:
            body = json.dumps(obj[kind], ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except RecursionError:
            raise BadRequest("bad_patch", "delta nested too deeply", rid, room) from None
        except (TypeError, ValueError) as exc:
            raise BadRequest("bad_patch", f"delta has no JSON form: {exc}", rid, room) from None
        source = '{"' + kind + '":' + body + "}"
    try:
        kind_s, body_b = delta.validate(source)
    except delta.DeltaError as exc:
        raise BadRequest("bad_patch", str(exc), rid, room) from None
    except RecursionError:  # pragma: no cover - the engine bounds depth itself
        raise BadRequest("bad_patch", "delta nested too deeply", rid, room) from None
    kind_l: DeltaKind = "patch" if kind_s == "patch" else "merge"
    return Delta(room, kind_l, body_b, key, rid)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- encoding


def delta_doc(kind: str, body: bytes) -> bytes:
    """The engine's delta document `{"patch": body}` / `{"merge": body}`."""
    return b'{"' + kind.encode() + b'":' + body + b"}"


def split_delta_doc(doc: bytes) -> tuple[DeltaKind, bytes]:
    """(kind, body) of a delta document with any extra members (such as a channel `seq`)."""
    kind, body = delta.validate(doc)
    return ("patch" if kind == "patch" else "merge"), body


def _json_payload(fields: dict[str, object]) -> bytes:
    # ASCII-only: a client's id or an engine message may hold a lone surrogate, which has
    # no UTF-8 form; escaped, it is still valid JSON.
    return json.dumps(fields, separators=(",", ":")).encode()


def _payload(codec: Codec, fields: dict[str, object]) -> bytes:
    if codec == JSON:
        return _json_payload(fields)
    return _pack(fields)


def _with_id(t: str, rid: RequestId | None) -> dict[str, object]:
    fields: dict[str, object] = {"t": t}
    if rid is not None:
        fields["id"] = rid
    return fields


def encode_ack(codec: Codec, room: str, seq: int, rid: RequestId | None) -> bytes:
    fields = _with_id("ack", rid)
    fields["room"] = room
    fields["seq"] = seq
    return _payload(codec, fields)


def encode_left(codec: Codec, room: str, rid: RequestId | None) -> bytes:
    fields = _with_id("left", rid)
    fields["room"] = room
    return _payload(codec, fields)


def encode_error(
    codec: Codec,
    code: ErrorCode,
    message: str,
    rid: RequestId | None = None,
    room: str | None = None,
) -> bytes:
    fields = _with_id("error", rid)
    if room is not None:
        fields["room"] = room
    fields["code"] = code
    fields["message"] = message
    return _payload(codec, fields)


def encode_joined(
    codec: Codec,
    room: str,
    seq: int,
    rid: RequestId | None,
    state: delta.RoomState | None,
) -> bytes:
    """`joined` with the full state (`state` given, its seq is `seq`) or `resumed` (None)."""
    fields = _with_id("joined", rid)
    fields["room"] = room
    fields["seq"] = seq
    if state is None:
        fields["resumed"] = True
        return _payload(codec, fields)
    return _with_state(codec, fields, state)


def _with_state(codec: Codec, fields: dict[str, object], state: delta.RoomState) -> bytes:
    # The state is appended as the engine encoded it: no parse, no per-member work.
    if codec == JSON:
        head = _json_payload(fields)
        return head[:-1] + b',"state":' + state.to_json() + b"}"
    out = bytearray(_map_header(len(fields) + 1))
    for name, value in fields.items():
        out += _pack(name)
        out += _pack(value)
    out += _STATE
    out += state.to_msgpack()
    return bytes(out)


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    return b"\xde" + n.to_bytes(2, "big")  # pragma: no cover - our maps are small


def _msgpack_body(doc: bytes) -> bytes:
    """The MessagePack of a one-member delta document, minus its fixmap header: the packed
    key and value, ready to be appended to a bigger map."""
    packed = delta.json_to_msgpack(doc)
    assert packed[0] == 0x81, "a delta document has exactly one member"
    return packed[1:]


class DeltaFrame:
    """One `delta` (or `reset`) message, encoded at most once per subprotocol on demand."""

    __slots__ = ("_doc", "_json", "_msgpack", "_reset_state", "first", "room", "seq")

    def __init__(self, room: str, first: int, seq: int, doc: bytes) -> None:
        """`doc` is a one-member delta document `{"patch": ...}` / `{"merge": ...}`, as the
        engine writes it (compact, no other member)."""
        self.room = room
        self.first = first
        self.seq = seq
        self._doc = doc
        self._reset_state: delta.RoomState | None = None
        self._json: bytes | None = None
        self._msgpack: bytes | None = None

    @classmethod
    def reset(cls, room: str, state: delta.RoomState) -> DeltaFrame:
        frame = cls(room, state.seq, state.seq, b"")
        frame._reset_state = state
        return frame

    def payload(self, codec: Codec) -> bytes:
        if codec == JSON:
            if self._json is None:
                self._json = self._encode_json()
            return self._json
        if self._msgpack is None:
            self._msgpack = self._encode_msgpack()
        return self._msgpack

    def _encode_json(self) -> bytes:
        if self._reset_state is not None:
            return (
                b'{"t":"reset","room":"'
                + self.room.encode()
                + b'","seq":'
                + str(self.seq).encode()
                + b',"state":'
                + self._reset_state.to_json()
                + b"}"
            )
        # Room names match [A-Za-z0-9_.-]+: nothing to escape. doc[1:] is `"kind":body}`.
        return (
            b'{"t":"delta","room":"'
            + self.room.encode()
            + b'","from":'
            + str(self.first).encode()
            + b',"seq":'
            + str(self.seq).encode()
            + b","
            + self._doc[1:]
        )

    def _encode_msgpack(self) -> bytes:
        if self._reset_state is not None:
            return b"".join(
                (
                    _RESET_HEAD,
                    _pack(self.room),
                    _SEQ,
                    _pack(self.seq),
                    _STATE,
                    self._reset_state.to_msgpack(),
                )
            )
        return b"".join(
            (
                _DELTA_HEAD,
                _pack(self.room),
                _FROM,
                _pack(self.first),
                _SEQ,
                _pack(self.seq),
                _msgpack_body(self._doc),
            )
        )


def _pack(value: object) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


# Constant fragments of the fan-out messages, packed once.
_DELTA_HEAD: Final = _map_header(5) + _pack("t") + _pack("delta") + _pack("room")
_RESET_HEAD: Final = _map_header(4) + _pack("t") + _pack("reset") + _pack("room")
_FROM: Final = _pack("from")
_SEQ: Final = _pack("seq")
_STATE: Final = _pack("state")

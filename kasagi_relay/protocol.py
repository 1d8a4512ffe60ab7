"""The wire protocol of docs/protocol.md, Sans-I/O: messages in, typed requests out; replies out.

Nothing here touches a socket or an event loop. `parse` turns one WebSocket message into a
`Join`, `Leave`, `Delta` or `PresenceRequest` request, or raises `BadRequest` carrying the
error to send back.
The `encode_*` functions build reply payloads for one subprotocol; `DeltaFrame` builds the
`delta`/`reset` payloads that fan out to many members by concatenating bytes around what
the engine already encoded, so the room state and the delta are never parsed again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import msgpack

from kasagi_relay import delta
from kasagi_relay.backends.base import DeltaKind, valid_room
from kasagi_relay.domain import delta_doc

__all__ = [
    "JSON",
    "MSGPACK",
    "SUBPROTOCOLS",
    "Auth",
    "BadRequest",
    "Codec",
    "Delta",
    "DeltaFrame",
    "ErrorCode",
    "Join",
    "Leave",
    "PresenceRequest",
    "Request",
    "RequestId",
    "delta_doc",
    "encode_ack",
    "encode_authed",
    "encode_error",
    "encode_joined",
    "encode_left",
    "encode_presence",
    "encode_presence_event",
    "parse",
    "parse_delta_body",
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
    "key_conflict",  # the same idempotency key with a different delta (docs/protocol.md)
]

RequestId = int | str
MAX_KEY_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: int | None = None
    id: RequestId | None = None
    # v1.1: also deliver presence_join / presence_leave of the room's other members.
    presence: bool = False


@dataclass(frozen=True, slots=True)
class PresenceRequest:
    """v1.1 `{"t":"presence","room":R}`: every member of the room on every relay."""

    room: str
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str
    id: RequestId | None = None


@dataclass(slots=True, unsafe_hash=True)
class Delta:
    """Read-only by convention, not frozen like the other requests: one is made per delta,
    and a frozen dataclass's `__init__` (an `object.__setattr__` per field) took 1.1 us
    against 0.21 us (a NamedTuple's, 0.5 us)."""

    room: str
    kind: DeltaKind
    body: bytes  # compact JSON of the patch array / merge object, as the engine validated it
    key: str | None = None
    id: RequestId | None = None

    @property
    def doc(self) -> bytes:
        return delta_doc(self.kind, self.body)


@dataclass(frozen=True, slots=True)
class Auth:
    """`{"t":"auth","token":T}`: authenticate, or refresh (docs/protocol.md, "Identity")."""

    token: str = field(repr=False)  # never in a log line
    id: RequestId | None = None
    room: None = None  # no room: replies carry none


Request = Join | Leave | Delta | Auth | PresenceRequest


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

# Limits on what a request may hold (docs/protocol.md, "Limits"). Each bounds a cost or keeps
# every reply encodable on both subprotocols.
MAX_ID_CHARS: Final = 256
MIN_INT: Final = -(2**63)  # the range MessagePack can carry, so an id is echoed on both codecs
MAX_INT: Final = 2**64 - 1
# Arrays and objects in one message. A JSON message is decoded into Python objects, which
# costs ~0.3 us per container with the garbage collector's passes (1 MiB of `[]`, 350k of
# them, took ~95 ms); this caps it near 30 ms.
MAX_CONTAINERS: Final = 100_000
_TOO_MANY_CONTAINERS: Final = f"a message may hold at most {MAX_CONTAINERS} arrays and objects"
# Members of the message object itself. A request uses at most six; the top level of a
# MessagePack message is walked in Python (~2 us per member: 1 MiB of one-byte members took
# ~400 ms), so the cap bounds that walk.
MAX_MEMBERS: Final = 64
# peek_id decodes nothing bigger than this (see its docstring).
PEEK_MAX_BYTES: Final = 16 * 1024
# A JSON message up to this size is decoded by CPython's json module (exact on every corner
# of JSON, ~1 ms at most); a bigger one is read by the engine with the GIL released, so that
# parse() holds the GIL only for a walk of the top level (see parse's docstring).
INLINE_JSON_CHARS: Final = 16 * 1024
assert INLINE_JSON_CHARS <= MAX_CONTAINERS  # _parse_json skips counting them for such messages

_TOO_MANY_MEMBERS: Final = f"a message may have at most {MAX_MEMBERS} members"
_STRINGS_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
# MessagePack type bytes (the format spec's first-byte table).
_MP_MAP: Final = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_MP_CONTAINER: Final = _MP_MAP | frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MP_STR: Final = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}
# Top-level members read as values; every other member is only checked, never built.
_SCALARS: Final = frozenset(("t", "room", "id", "since", "key", "token", "presence"))
_KINDS: Final = ("patch", "merge")


class _Container:
    """Stands for an array or map where a scalar field was expected (never decoded)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<array or map>"


_CONTAINER: Final = _Container()


def parse(data: str | bytes, codec: Codec) -> Request:
    """Parse one message received on a connection that negotiated `codec`.

    Text frames are JSON whatever the subprotocol (handy when debugging a MessagePack client
    by hand); binary frames are MessagePack on `kasagi.v1.msgpack` and UTF-8 JSON on
    `kasagi.v1.json`. Every field that a reply echoes is checked here, so that whatever this
    accepts can be answered on either codec (docs/protocol.md, "Limits").

    Cost: linear in the message's size, at most MAX_CONTAINERS arrays and objects, at most
    MAX_MEMBERS members. Up to INLINE_JSON_CHARS a JSON message is decoded by CPython's json
    module. Past it, and for MessagePack at any size, only the top-level members that a
    request uses become Python objects; the rest is read by the engine with the GIL
    released (converted, validated), so a caller may run parse() of a big message in a
    worker thread and keep its event loop free: it then holds the GIL for the top-level walk,
    the bracket count and copies, a few ms per MiB (an event loop beside a thread parsing
    1 MiB frames of empty arrays or of 87k-member objects lagged 5-15 ms, 2 busy CPUs)."""
    if isinstance(data, str):
        return _parse_json(data, codec)
    if codec == JSON:
        return _parse_json(_utf8(data), codec)
    return _parse_msgpack(bytes(data))


def peek_id(data: str | bytes, codec: Codec) -> RequestId | None:
    """The request's `id` if it has a valid one, else None (for replies that do not parse
    the request otherwise, such as rate_limited).

    Cost: bounded. A message longer than PEEK_MAX_BYTES (16 KiB) is not read at all (None);
    a shorter one is decoded at most once (a MessagePack one only down to its top level)."""
    if len(data) > PEEK_MAX_BYTES:
        return None
    try:
        if isinstance(data, str) or codec == JSON:
            text = data if isinstance(data, str) else _utf8(data)
            obj = _loads(text)
            return _request_id(obj, codec) if isinstance(obj, dict) else None
        fields, _ = _msgpack_top(bytes(data))
        return _request_id(fields, codec)
    except BadRequest:
        return None


def _utf8(data: bytes) -> str:
    # json.loads(bytes) would also take UTF-16 and UTF-32 (it guesses from the first bytes);
    # the protocol says UTF-8, and a strict decode refuses those and any invalid sequence.
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("bad_message", "a binary JSON message must be UTF-8") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _check_containers(text: str | bytes) -> None:
    """Refuse more than MAX_CONTAINERS arrays and objects; cost ~1 ms per MiB."""
    if isinstance(text, str):
        count = text.count("[") + text.count("{")
    else:
        count = text.count(b"[") + text.count(b"{")
    if count <= MAX_CONTAINERS:
        return
    # Brackets inside strings were counted too: count again without the strings.
    plain = _STRINGS_RE.sub("", text if isinstance(text, str) else text.decode("utf-8"))
    if plain.count("[") + plain.count("{") > MAX_CONTAINERS:
        raise BadRequest("bad_message", _TOO_MANY_CONTAINERS)


# One decoder and one encoder for every message: `json.loads` / `json.dumps` with options
# build a new one per call (JSONDecoder.__init__ and the encoder's setup were ~2 % of the
# publish path, py-spy). Both are stateless between calls, as json's own defaults are.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# A string as _ENCODER writes it (ASCII-only, escaped, quoted).
_json_str: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


def _loads(text: str) -> object:
    _check_containers(text)
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise BadRequest("bad_message", "message nested too deeply") from None
    except (ValueError, TypeError):
        raise BadRequest("bad_message", "message is not valid JSON") from None


def _parse_json(text: str, codec: Codec) -> Request:
    if len(text) <= INLINE_JSON_CHARS:
        # Most messages are deltas: the engine reads the delta and the other members in one
        # parse (json.loads and then the engine's validate read each message twice: ~7 %
        # of the publish path). Whatever it leaves (joins, anything malformed) goes the
        # long way below, which gives each error as before.
        # No _check_containers: a message this short cannot hold MAX_CONTAINERS of them
        # (the long way counts them again anyway).
        read = delta.validate_request(text)
        if read is not None and len(read[0]) < MAX_MEMBERS:
            fields, kind, body = read
            simple = _simple_delta(fields, kind, body, codec)
            if simple is not None:
                return simple
            obj: dict[str, object] = dict(fields)
            obj[kind] = _CONTAINER  # present; its value is `body`
            return _parse_object(obj, lambda kind: text, codec, (kind, body))
    # The engine reads the delta from the message itself (other members are ignored), by its
    # own rules (depth, numbers), rather than from a re-serialization of ours.
    return _parse_object(_json_top(text), lambda kind: text, codec)


def _simple_delta(
    fields: dict[str, str | int | bool | None], kind: str, body: bytes, codec: Codec
) -> Delta | None:
    """The Delta of a JSON delta message whose members are all as they should be (nearly
    every one), read straight from the engine's fields; None for anything else, which
    `_parse_object` then reads (and refuses with its errors). The same result as
    `_parse_object`, without its generic walk (~5 % of the memory ingest path)."""
    if fields.get("t") != "delta" or codec != JSON:
        return None
    room = fields.get("room")
    if type(room) is not str or not valid_room(room):
        return None
    rid = fields.get("id")
    # The engine gives integers within -2**63 .. 2**64-1 only (MIN_INT .. MAX_INT).
    if (
        rid is not None
        and type(rid) is not int
        and (type(rid) is not str or len(rid) > MAX_ID_CHARS)
    ):
        return None
    key = fields.get("key")
    if key is not None and (
        type(key) is not str or not 0 < len(key) <= MAX_KEY_CHARS or not _encodable(key)
    ):
        return None
    return Delta(room, "patch" if kind == "patch" else "merge", body, key, rid)


def _json_top(text: str) -> Mapping[str, object]:
    """The top-level members of a JSON message (past INLINE_JSON_CHARS only the scalars:
    see parse)."""
    if len(text) > INLINE_JSON_CHARS:
        _check_containers(text)
        try:
            packed = delta.json_to_msgpack(text)
        except delta.DeltaError as exc:
            raise BadRequest("bad_message", f"message is not valid JSON: {exc}") from None
        fields, _ = _msgpack_top(packed)
        return fields
    obj = _loads(text)
    if not isinstance(obj, dict):
        raise BadRequest("bad_message", "message must be an object")
    if len(obj) > MAX_MEMBERS:  # the same limit on both codecs
        raise BadRequest("bad_message", _TOO_MANY_MEMBERS)
    return obj


def parse_delta_body(data: bytes, room: str) -> Delta:
    """A delta for `room` from the body of an HTTP API request (docs/protocol.md, "HTTP
    API"): a UTF-8 JSON object with `patch` or `merge` and an optional `key`, checked
    exactly as a `delta` message (`t`, `room` and `id`, if present, are ignored).

    Cost: as parse(), so a caller may run it in a worker thread for a big body."""
    if not valid_room(room):
        raise BadRequest("bad_room", f"invalid room name {_short(room)}")
    text = _utf8(data)
    return _parse_delta(_json_top(text), lambda kind: text, room, None)


def _msgpack_top(data: bytes) -> tuple[dict[str, object], dict[str, tuple[int, int]]]:
    """The scalar top-level members of a MessagePack map, and the byte spans of the others.

    Nothing below the top level becomes a Python object: containers are skipped by the C
    unpacker (~2.5 ms for a million of them)."""
    if not data or data[0] == 0xC1:  # 0xC1: the one byte MessagePack never uses
        raise BadRequest("bad_message", "message is not valid MessagePack")
    if data[0] not in _MP_MAP:
        raise BadRequest("bad_message", "message must be an object")
    n = len(data)
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=n,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=n,
    )
    unpacker.feed(data)
    fields: dict[str, object] = {}
    spans: dict[str, tuple[int, int]] = {}
    try:
        members = unpacker.read_map_header()
        if members > MAX_MEMBERS:
            raise BadRequest("bad_message", _TOO_MANY_MEMBERS)
        for _ in range(members):
            pos = unpacker.tell()
            if pos >= n or data[pos] not in _MP_STR:
                raise BadRequest("bad_message", "map keys must be strings")
            name = unpacker.unpack()
            pos = unpacker.tell()
            if name in _SCALARS and pos < n and data[pos] not in _MP_CONTAINER:
                fields[name] = unpacker.unpack()
                spans.pop(name, None)
            else:
                unpacker.skip()
                spans[name] = (pos, unpacker.tell())
                fields[name] = _CONTAINER
    except BadRequest:
        raise
    except msgpack.StackError:
        raise BadRequest("bad_message", "message nested too deeply") from None
    except Exception:  # msgpack raises a handful of unrelated types for bad input
        raise BadRequest("bad_message", "message is not valid MessagePack") from None
    if unpacker.tell() != n:
        raise BadRequest("bad_message", "trailing bytes after the message")
    return fields, spans


def _msgpack_json(data: bytes, rid: RequestId | None, left: list[int]) -> bytes:
    """MessagePack -> JSON by the engine (GIL released), in memory of the output's size; raises
    DeltaError, or BadRequest past the arrays and maps `left[0]` allows (what the members
    converted before left of MAX_CONTAINERS: the cap is per message; the engine stops there,
    so a frame of a million empty arrays costs no more than its first 100,000)."""
    try:
        out, used = delta.msgpack_to_json_counted(data, left[0])
    except delta.DeltaError as exc:
        if "arrays and objects" in str(exc):
            raise BadRequest("bad_message", _TOO_MANY_CONTAINERS, rid) from None
        raise
    left[0] -= used
    return out


def _bad_msgpack(exc: delta.DeltaError) -> bool:
    """Whether the engine refused the data as MessagePack (bad_message) rather than as JSON
    (a value without a JSON form, too deep: bad_patch in a delta)."""
    text = str(exc).lower()
    return "map keys must be strings" in text or "utf-8" in text or "invalid data" in text


def _parse_msgpack(data: bytes) -> Request:
    fields, spans = _msgpack_top(data)
    rid = _request_id(fields, MSGPACK)
    left = [MAX_CONTAINERS - 1]  # the message's own map is one
    # Members nobody reads must still be MessagePack with a JSON form (string keys, UTF-8),
    # as on the JSON subprotocol: no message means two things.
    for name, (start, end) in spans.items():
        if name in _KINDS or name in _SCALARS:
            continue
        try:
            _msgpack_json(data[start:end], rid, left)
        except delta.DeltaError:
            raise BadRequest(
                "bad_message", f"member {_short(name)} has no JSON form", rid
            ) from None

    def source(kind: str) -> bytes:
        start, end = spans[kind]
        try:
            body = _msgpack_json(data[start:end], None, left)
        except delta.DeltaError as exc:
            if _bad_msgpack(exc):
                raise BadRequest("bad_message", str(exc)) from None
            raise BadRequest("bad_patch", f"delta has no JSON form: {exc}") from None
        return b'{"' + kind.encode() + b'":' + body + b"}"

    return _parse_object(fields, source, MSGPACK)


def _encodable(text: str) -> bool:
    """Whether `text` has a UTF-8 form (no lone surrogate), so MessagePack can carry it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _request_id(obj: Mapping[str, object], codec: Codec) -> RequestId | None:
    """The id, if it can be echoed in every reply on `codec` (docs/protocol.md, "Limits")."""
    rid = obj.get("id")
    if rid is None:
        return None
    if isinstance(rid, str):
        if len(rid) > MAX_ID_CHARS:
            raise BadRequest("bad_message", f"a string id has at most {MAX_ID_CHARS} characters")
        # JSON replies escape a lone surrogate (ASCII-only output); MessagePack has no form
        # for it.
        if codec == MSGPACK and not _encodable(rid):
            raise BadRequest("bad_message", "id has no UTF-8 form (a lone surrogate)")
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool):
        if not MIN_INT <= rid <= MAX_INT:
            raise BadRequest("bad_message", "an integer id must be within -2**63 .. 2**64-1")
        return rid
    raise BadRequest("bad_message", "id must be an integer or a string")


# The engine's delta document for one kind, or a BadRequest (without id and room).
_Source = Callable[[str], "str | bytes"]


def _parse_object(
    obj: Mapping[str, object],
    source: _Source,
    codec: Codec,
    validated: tuple[str, bytes] | None = None,
) -> Request:
    rid = _request_id(obj, codec)
    t = obj.get("t")
    if t is None:
        raise BadRequest("bad_message", "missing field t", rid)
    if t not in ("join", "leave", "delta", "auth", "presence"):
        raise BadRequest("bad_message", f"unknown message type {_short(t)}", rid)
    if t == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest("bad_message", "auth needs a token (a string)", rid)
        return Auth(token, rid)
    if "room" not in obj:
        raise BadRequest("bad_message", "missing field room", rid)
    room = obj["room"]
    if not valid_room(room):
        raise BadRequest("bad_room", f"invalid room name {_short(room)}", rid)
    assert isinstance(room, str)
    if t == "join":
        since = obj.get("since")
        if since is not None and (
            not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= MAX_INT
        ):
            raise BadRequest(
                "bad_message", "since must be an integer within 0 .. 2**64-1", rid, room
            )
        presence = obj.get("presence", False)
        if presence is None:
            presence = False
        if not isinstance(presence, bool):
            raise BadRequest("bad_message", "presence must be true or false", rid, room)
        return Join(room, since, rid, presence)
    if t == "leave":
        return Leave(room, rid)
    if t == "presence":
        return PresenceRequest(room, rid)
    return _parse_delta(obj, source, room, rid, validated)


def _parse_delta(
    obj: Mapping[str, object],
    source: _Source,
    room: str,
    rid: RequestId | None,
    validated: tuple[str, bytes] | None = None,
) -> Delta:
    """`validated`: the delta's (kind, body) when the engine already read it
    (delta.validate_request); else it reads `source`."""
    key = obj.get("key")
    if key is not None and (
        not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS or not _encodable(key)
    ):
        # Keys are stored (Redis, as UTF-8): one without a UTF-8 form would fail after the
        # checks, as an internal error.
        raise BadRequest(
            "bad_message",
            f"key must be a string of 1 to {MAX_KEY_CHARS} characters, in UTF-8",
            rid,
            room,
        )
    has_patch, has_merge = "patch" in obj, "merge" in obj
    if not has_patch and not has_merge:
        raise BadRequest("bad_message", "missing field patch or merge", rid, room)
    if has_patch and has_merge:
        raise BadRequest("bad_patch", "a delta holds either patch or merge, not both", rid, room)
    try:
        if validated is not None:
            kind_s, body_b = validated
        else:
            kind_s, body_b = delta.validate(source("patch" if has_patch else "merge"))
    except BadRequest as exc:
        raise BadRequest(exc.code, exc.message, rid, room) from None
    except delta.DeltaError as exc:
        raise BadRequest("bad_patch", str(exc), rid, room) from None
    except RecursionError:  # pragma: no cover - the engine bounds depth itself
        raise BadRequest("bad_patch", "delta nested too deeply", rid, room) from None
    kind_l: DeltaKind = "patch" if kind_s == "patch" else "merge"
    return Delta(room, kind_l, body_b, key, rid)


def _short(value: object, limit: int = 40) -> str:
    # Only the start of a long value is shown, so repr() never walks a big container.
    if isinstance(value, list | dict):
        value = _CONTAINER
    elif isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- encoding


def split_delta_doc(doc: bytes) -> tuple[DeltaKind, bytes]:
    """(kind, body) of a delta document with any extra members (such as a channel `seq`)."""
    kind, body = delta.validate(doc)
    return ("patch" if kind == "patch" else "merge"), body


def _json_payload(fields: dict[str, object]) -> bytes:
    # ASCII-only: a client's id or an engine message may hold a lone surrogate, which has
    # no UTF-8 form; escaped, it is still valid JSON.
    return _ENCODER.encode(fields).encode()


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
    if codec == JSON:
        # One per delta: the bytes json.dumps writes for these fields, without building a
        # dict and walking it (~4 % of the publish path). Strings go through the encoder's
        # own escaping (ASCII-only, as _json_payload); an id is a str or an int (parse).
        head = b'{"t":"ack","room":' if rid is None else _ack_head(rid)
        return b'%s%s,"seq":%d}' % (head, _json_str(room).encode(), seq)
    fields = _with_id("ack", rid)
    fields["room"] = room
    fields["seq"] = seq
    return _payload(codec, fields)


def _ack_head(rid: RequestId) -> bytes:
    value = _json_str(rid) if isinstance(rid, str) else int.__repr__(rid)
    return b'{"t":"ack","id":%s,"room":' % value.encode()


def encode_left(
    codec: Codec, room: str, rid: RequestId | None, code: ErrorCode | None = None
) -> bytes:
    """`left`; with `code` when the relay left the room for the client (`forbidden`: a
    refreshed token no longer reads it)."""
    fields = _with_id("left", rid)
    fields["room"] = room
    if code is not None:
        fields["code"] = code
    return _payload(codec, fields)


def encode_authed(codec: Codec, sub: str, exp: float, rid: RequestId | None) -> bytes:
    fields = _with_id("authed", rid)
    fields["sub"] = sub
    fields["exp"] = int(exp) if float(exp).is_integer() else exp
    return _payload(codec, fields)


def encode_presence(
    codec: Codec,
    room: str,
    members: list[dict[str, object]],
    count: int,
    users: int,
    rid: RequestId | None,
    truncated: bool = False,
) -> bytes:
    """The `presence` reply; `truncated` when `members` lists fewer than `count`
    (--max-presence-members)."""
    fields = _with_id("presence", rid)
    fields["room"] = room
    fields["members"] = members
    fields["count"] = count
    fields["users"] = users
    if truncated:
        fields["truncated"] = True
    return _payload(codec, fields)


def encode_presence_event(codec: Codec, kind: str, room: str, member: dict[str, object]) -> bytes:
    """`presence_join` / `presence_leave` (`kind` "join" / "leave") of one member."""
    return _payload(codec, {"t": "presence_" + kind, "room": room, "member": member})


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
    # An engine or library message may quote input: keep it encodable on MessagePack.
    fields["message"] = (
        message
        if _encodable(message)
        else message.encode("utf-8", "backslashreplace").decode("utf-8")
    )
    return _payload(codec, fields)


def encode_joined(
    codec: Codec,
    room: str,
    seq: int,
    rid: RequestId | None,
    state: delta.RoomState | None,
    conn: str | None = None,
) -> bytes:
    """`joined` with the full state (`state` given, its seq is `seq`) or `resumed` (None);
    `conn`, the connection's id (v1.1, presence), when given."""
    fields = _with_id("joined", rid)
    fields["room"] = room
    fields["seq"] = seq
    if conn is not None:
        fields["conn"] = conn
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

"""The client's Sans-I/O core (kasagi_relay.client.protocol): requests, replies, and one
room's stream as docs/protocol.md describes it, with both delta engines' RoomState."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasagi_relay import _pydelta
from kasagi_relay.client import backoff_delay
from kasagi_relay.client.protocol import (
    Ack,
    Applied,
    DeltaFrame,
    ErrorReply,
    Joined,
    Left,
    Other,
    Presence,
    PresenceEvent,
    ProtocolError,
    Rejoin,
    Replaced,
    Reset,
    RoomStream,
    encode_delta,
    encode_join,
    encode_leave,
    json_bytes,
    parse,
)


def wire(fmt: str, message: dict[str, Any]) -> str | bytes:
    """A message as the relay sends it on each subprotocol."""
    if fmt == "msgpack":
        return bytes(msgpack.packb(message, use_bin_type=True))
    return json.dumps(message)


def read(data: str | bytes) -> Any:
    return json.loads(data) if isinstance(data, str) else msgpack.unpackb(data, raw=False)


FORMATS = ["json", "msgpack"]


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize("fmt", FORMATS)
def test_requests_are_text_json_or_binary_msgpack(fmt: Any) -> None:
    join = encode_join(fmt, "lobby", since=7, id=1)
    assert isinstance(join, str if fmt == "json" else bytes)
    assert read(join) == {"t": "join", "room": "lobby", "since": 7, "id": 1}
    assert read(encode_join(fmt, "lobby")) == {"t": "join", "room": "lobby"}
    assert read(encode_leave(fmt, "lobby", id="x")) == {"t": "leave", "room": "lobby", "id": "x"}
    d = encode_delta(fmt, "lobby", merge={"hp": None}, key="k1", id=3)
    assert read(d) == {"t": "delta", "room": "lobby", "merge": {"hp": None}, "key": "k1", "id": 3}
    p = encode_delta(fmt, "lobby", patch=[{"op": "add", "path": "/a", "value": "é"}])
    assert read(p) == {
        "t": "delta",
        "room": "lobby",
        "patch": [{"op": "add", "path": "/a", "value": "é"}],
    }


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_join("json", "bad room"),
        lambda: encode_join("json", "room:{x}"),
        lambda: encode_join("json", "lobby", since=-1),
        lambda: encode_leave("json", ""),
        lambda: encode_delta("json", "lobby"),
        lambda: encode_delta("json", "lobby", patch=[], merge={}),
        lambda: encode_delta("json", "lobby", patch={"op": "add"}),  # type: ignore[arg-type]
        lambda: encode_delta("json", "lobby", merge={}, key=""),
        lambda: encode_delta("json", "lobby", merge={}, key="k" * 65),
    ],
)
def test_requests_the_relay_would_refuse_are_refused_before_sending(call: Any) -> None:
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- replies


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_reply_parses_the_same_on_both_subprotocols(fmt: str) -> None:
    assert parse(
        wire(fmt, {"t": "joined", "room": "r", "seq": 4, "state": {"a": [1]}, "id": 1})
    ) == Joined("r", 4, b'{"a":[1]}', 1)
    resumed = parse(wire(fmt, {"t": "joined", "room": "r", "seq": 4, "resumed": True}))
    assert resumed == Joined("r", 4, None, None) and isinstance(resumed, Joined) and resumed.resumed
    assert parse(wire(fmt, {"t": "ack", "room": "r", "seq": 9, "id": "a"})) == Ack("r", 9, "a")
    assert parse(wire(fmt, {"t": "left", "room": "r", "id": 2})) == Left("r", 2)
    assert parse(
        wire(fmt, {"t": "error", "id": 5, "room": "r", "code": "bad_patch", "message": "m"})
    ) == ErrorReply("bad_patch", "m", 5, "r")
    frame = parse(wire(fmt, {"t": "delta", "room": "r", "from": 3, "seq": 5, "merge": {"x": 1}}))
    assert frame == DeltaFrame("r", 3, 5, b'{"merge":{"x":1}}')
    assert isinstance(frame, DeltaFrame) and frame.delta == {"merge": {"x": 1}}
    assert parse(wire(fmt, {"t": "reset", "room": "r", "seq": 8, "state": {}})) == Reset(
        "r", 8, b"{}"
    )
    # Unknown types are handed on, not errors.
    assert parse(wire(fmt, {"t": "later", "room": "r"})) == Other(
        "later", {"t": "later", "room": "r"}
    )
    # v1.1 presence: the reply, the events, and `conn` in `joined`.
    ann = {"conn": "c1", "sub": "u1", "info": {"n": "Ann"}}
    reply = {"t": "presence", "id": 2, "room": "r", "members": [ann], "count": 1, "users": 1}
    assert parse(wire(fmt, reply)) == Presence("r", [ann], 1, 1, 2)
    event = parse(wire(fmt, {"t": "presence_leave", "room": "r", "member": ann}))
    assert event == PresenceEvent("r", False, ann) and event.conn == "c1"
    joined = parse(wire(fmt, {"t": "joined", "room": "r", "seq": 0, "conn": "c9", "state": {}}))
    assert isinstance(joined, Joined) and joined.conn == "c9"
    with pytest.raises(ProtocolError):
        parse(wire(fmt, {"t": "presence_join", "room": "r", "member": {"sub": "u"}}))


@pytest.mark.parametrize(
    "message",
    [
        [1, 2],
        {"room": "r"},
        {"t": "delta", "room": "r", "from": 2, "seq": 1, "patch": []},
        {"t": "delta", "room": "r", "from": 0, "seq": 1, "patch": []},
        {"t": "delta", "room": "r", "from": 1, "seq": 1},
        {"t": "delta", "room": "r", "from": 1, "seq": 1, "patch": [], "merge": {}},
        {"t": "delta", "from": 1, "seq": 1, "patch": []},
        {"t": "joined", "room": "r", "seq": 1},
        {"t": "joined", "room": "r", "seq": "1", "state": {}},
        {"t": "ack", "room": "r", "seq": True},
        {"t": "error", "message": "no code"},
        {"t": "reset", "room": "r", "seq": 1},
    ],
)
def test_malformed_replies_are_protocol_errors(message: Any) -> None:
    for fmt in FORMATS:
        with pytest.raises(ProtocolError):
            parse(wire(fmt, message))
    with pytest.raises(ProtocolError):
        parse("{not json")
    with pytest.raises(ProtocolError):
        parse(b"\xc1")  # never used in MessagePack


# --------------------------------------------------------------------------- the stream


def joined(seq: int, state: Any) -> Joined:
    return Joined("r", seq, json_bytes(state))


def frame(first: int, seq: int, doc: Any) -> DeltaFrame:
    return DeltaFrame("r", first, seq, json_bytes(doc))


def test_a_stream_applies_contiguous_frames_and_asks_to_rejoin_on_a_gap() -> None:
    s = RoomStream("r")
    assert [s.seq, s.since()] == [None, None]
    assert s.on_delta(frame(1, 1, {"merge": {"a": 1}})) is None  # before joined: ignored
    assert s.on_joined(joined(2, {"a": 1})) == Replaced(2, reset=False)
    step = s.on_delta(frame(3, 3, {"merge": {"b": 2}}))
    assert isinstance(step, Applied) and step.ok and (step.first, step.seq) == (3, 3)
    # A merged frame covers several seqs.
    assert isinstance(
        s.on_delta(frame(4, 6, {"patch": [{"op": "add", "path": "/c", "value": 3}]})), Applied
    )
    assert (s.seq, json.loads(s.state_json())) == (6, {"a": 1, "b": 2, "c": 3})
    # A frame that fails at its position is a no-op, and the seq still advances.
    failed = s.on_delta(frame(7, 7, {"patch": [{"op": "remove", "path": "/nope"}]}))
    assert isinstance(failed, Applied) and not failed.ok and s.seq == 7
    # A gap: rejoin with the seq held; frames until the next joined are ignored.
    assert s.on_delta(frame(9, 9, {"merge": {"z": 1}})) == Rejoin(7, "frame from 9 after seq 7")
    assert not s.synced
    assert s.on_delta(frame(8, 8, {"merge": {"z": 1}})) is None
    assert s.since() == 7
    assert s.on_joined(Joined("r", 7, None)) is None  # resumed where we were
    assert s.synced
    assert isinstance(s.on_delta(frame(8, 8, {"merge": {"d": 4}})), Applied)
    assert json.loads(s.state_json()) == {"a": 1, "b": 2, "c": 3, "d": 4}


def test_an_overlapping_frame_is_a_protocol_error_too() -> None:
    s = RoomStream("r")
    s.on_joined(joined(5, {}))
    assert s.on_delta(frame(5, 6, {"merge": {"x": 1}})) == Rejoin(5, "frame from 5 after seq 5")
    assert json.loads(s.state_json()) == {}


def test_reset_and_full_joined_replace_the_state() -> None:
    s = RoomStream("r")
    s.on_joined(joined(3, {"old": True}))
    assert s.on_reset(Reset("r", 40, json_bytes({"new": 1}))) == Replaced(40, reset=True)
    assert (s.seq, json.loads(s.state_json())) == (40, {"new": 1})
    assert isinstance(s.on_delta(frame(41, 41, {"merge": {"n": 2}})), Applied)
    s.rejoin_sent()
    # History no longer reaches back: the relay answers the rejoin with the full state.
    assert s.on_joined(joined(90, {"full": 1})) == Replaced(90, reset=False)
    assert (s.seq, json.loads(s.state_json())) == (90, {"full": 1})


def test_resumed_at_a_seq_not_held_asks_for_a_full_join() -> None:
    s = RoomStream("r")
    assert s.on_joined(Joined("r", 4, None)) == Rejoin(None, "resumed at 4, held None")
    s.on_joined(joined(4, {"a": 1}))
    s.rejoin_sent()
    assert s.on_joined(Joined("r", 9, None)) == Rejoin(None, "resumed at 9, held 4")
    # The state held is still shown until the full join replaces it.
    assert (s.since(), s.seq, json.loads(s.state_json())) == (None, 4, {"a": 1})
    assert s.on_delta(frame(10, 10, {"merge": {"b": 1}})) is None
    assert s.on_joined(Joined("r", 4, None)) == Rejoin(None, "resumed at 4, held 4")
    assert s.on_joined(joined(10, {"b": 1})) == Replaced(10, reset=False)
    assert (s.since(), s.synced) == (10, True)


merges = st.dictionaries(
    st.sampled_from("abcdef"),
    st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3)),
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(
    deltas=st.lists(merges, min_size=1, max_size=30),
    cuts=st.lists(st.integers(1, 30), max_size=10),
    drop=st.one_of(st.none(), st.integers(0, 29)),
)
def test_any_framing_gives_the_state_of_the_whole_history(
    deltas: list[dict[str, Any]], cuts: list[int], drop: int | None
) -> None:
    """The relay may merge any run of deltas into one frame; the stream's state is always
    state(N). A dropped frame is caught at the next one, with the seq before it."""
    docs = [json_bytes({"merge": d}) for d in deltas]
    bounds = sorted({0, len(docs), *(c for c in cuts if c < len(docs))})
    s = RoomStream("r")
    s.on_joined(joined(0, {}))
    frames = list(itertools.pairwise(bounds))
    dropped = None if drop is None or drop >= len(frames) - 1 else drop
    for i, (lo, hi) in enumerate(frames):
        doc = _pydelta.merge(docs[lo:hi])
        if i == dropped:
            continue
        step = s.on_delta(DeltaFrame("r", lo + 1, hi, doc))
        if dropped is not None and i == dropped + 1:
            assert step == Rejoin(
                frames[dropped][0], f"frame from {lo + 1} after seq {frames[dropped][0]}"
            )
            return
        assert isinstance(step, Applied) and step.ok
    assert s.seq == len(docs)
    assert json.loads(s.state_json()) == json.loads(_pydelta.compact(b"{}", docs))


# --------------------------------------------------------------------------- backoff


@given(st.integers(0, 10_000), st.floats(0, 1, exclude_max=True))
def test_backoff_is_full_jitter_between_zero_and_the_capped_exponential(
    attempt: int, r: float
) -> None:
    ceiling = min(10.0, 0.25 * 2.0 ** min(attempt, 64))
    delay = backoff_delay(attempt, rand=lambda: r)
    assert 0 <= delay <= ceiling
    assert delay == pytest.approx(r * ceiling)


def test_backoff_ceilings() -> None:
    top = [backoff_delay(a, rand=lambda: 1.0) for a in range(8)]
    assert top == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_delay(3, rand=lambda: 0.0) == 0.0

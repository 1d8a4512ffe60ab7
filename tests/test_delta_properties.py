"""Property tests on random states and deltas: the laws of the engine, and native == pure."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasagi_relay import _pydelta as pure_engine

# KASAGI_HYPOTHESIS_EXAMPLES=5000 for a longer hunt than the suite's default.
SETTINGS = settings(
    max_examples=int(os.environ.get("KASAGI_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Few keys, so that deltas hit the same paths often; some need escaping or look like indices.
KEYS = st.sampled_from(["a", "b", "c", "d", "e", "0", "1", "01", "-", "~", "a/b", "~1", "", "é"])
INTS = st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**64 - 1))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, st.text(max_size=4))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
STATES = st.one_of(st.dictionaries(KEYS, VALUES, max_size=6), VALUES)
MERGE_VALUES = st.recursive(
    st.one_of(SCALARS, st.lists(VALUES, max_size=3)),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
MERGE_PATCHES = st.one_of(st.dictionaries(KEYS, MERGE_VALUES, max_size=4), MERGE_VALUES)


def dumps(v: Any) -> bytes:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()


def canon(doc: bytes) -> str:
    """Type-exact, key-order-free form (JSON objects are unordered, RFC 8259)."""
    return json.dumps(json.loads(doc), sort_keys=True)


def pointer(tokens: Sequence[str]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def locations(doc: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = [(prefix, doc)]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(locations(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(locations(v, (*prefix, str(i))))
    return out


@st.composite
def target(draw: st.DrawFn, doc: Any) -> str:
    """A pointer where add can put a value: a new or existing member, an index or '-'."""
    containers = [(t, v) for t, v in locations(doc) if isinstance(v, dict | list)]
    if not containers or draw(st.integers(0, 9)) == 0:
        return pointer(draw(st.lists(KEYS, max_size=3)))
    tokens, parent = draw(st.sampled_from(containers))
    if isinstance(parent, dict):
        key = draw(st.one_of(KEYS, st.sampled_from(list(parent) or ["a"])))
    else:
        key = draw(st.one_of(st.just("-"), st.integers(0, len(parent)).map(str)))
    return pointer((*tokens, key))


@st.composite
def existing(draw: st.DrawFn, doc: Any, root: bool = True) -> str:
    """Mostly a pointer that exists in doc; sometimes a random one."""
    locs = [t for t, _ in locations(doc) if root or t]
    if not locs or draw(st.integers(0, 9)) == 0:
        return pointer(draw(st.lists(KEYS, min_size=0 if root else 1, max_size=3)))
    return pointer(draw(st.sampled_from(locs)))


def value_at(doc: Any, ptr: str) -> Any:
    for t in ptr.split("/")[1:] if ptr else []:
        t = t.replace("~1", "/").replace("~0", "~")
        doc = doc[t] if isinstance(doc, dict) else doc[int(t)]
    return doc


@st.composite
def operation(draw: st.DrawFn, doc: Any, recent: list[str]) -> dict[str, Any]:
    """One op on doc. Half the time its pointers are ones that earlier ops used, so that
    sequences write, overwrite, read and shift the same places (what merge() collapses)."""
    kind = draw(
        st.sampled_from(["add", "add", "replace", "replace", "remove", "move", "copy", "test"])
    )

    def hot(fallback: st.SearchStrategy[str]) -> str:
        if len(recent) > 0 and draw(st.booleans()):
            return draw(st.sampled_from(recent))
        return draw(fallback)

    op: dict[str, Any]
    if kind == "add":
        op = {"op": "add", "path": hot(target(doc)), "value": draw(VALUES)}
    elif kind == "replace":
        op = {"op": "replace", "path": hot(existing(doc)), "value": draw(VALUES)}
    elif kind == "remove":
        op = {"op": "remove", "path": hot(existing(doc, root=False))}
    elif kind in ("move", "copy"):
        op = {"op": kind, "from": hot(existing(doc)), "path": hot(target(doc))}
    else:
        path = hot(existing(doc))
        try:
            value = value_at(doc, path) if draw(st.booleans()) else draw(VALUES)
        except (KeyError, IndexError, ValueError, TypeError):
            value = draw(VALUES)
        op = {"op": "test", "path": path, "value": value}
    recent.extend(v for k, v in op.items() if k in ("path", "from"))
    # Ancestors too: writing them overwrites what was written below.
    if op["path"].count("/") > 1:
        recent.append(op["path"].rsplit("/", 1)[0])
    return op


def try_apply(state: bytes, d: bytes) -> bytes | None:
    try:
        return pure_engine.apply(state, d)
    except pure_engine.DeltaError:
        return None


@st.composite
def patch_delta(draw: st.DrawFn, state: bytes, recent: list[str]) -> bytes:
    """A patch of 1-4 ops, each generated against the state the ones before it leave."""
    ops = []
    cur: bytes | None = state
    for _ in range(draw(st.integers(1, 4))):
        doc = json.loads(cur) if cur is not None else json.loads(state)
        op = draw(operation(doc, recent))
        ops.append(op)
        if cur is not None:
            cur = try_apply(cur, dumps({"patch": [op]}))
    return dumps({"patch": ops})


@st.composite
def delta(draw: st.DrawFn, state: bytes, recent: list[str], kinds: str = "mixed") -> bytes:
    merge = kinds == "merge" or (kinds == "mixed" and draw(st.integers(0, 3)) == 0)
    if merge:
        return dumps({"merge": draw(MERGE_PATCHES)})
    return draw(patch_delta(state, recent))


@st.composite
def histories(
    draw: st.DrawFn, kinds: str = "mixed", valid: bool = False, max_len: int = 6
) -> tuple[bytes, list[bytes]]:
    """(state, deltas): each delta generated against the state before it. With valid=True,
    only deltas that apply at their position are kept."""
    state = dumps(draw(STATES))
    cur = state
    ds: list[bytes] = []
    recent: list[str] = []
    for _ in range(draw(st.integers(0, max_len))):
        d = draw(delta(cur, recent, kinds))
        nxt = try_apply(cur, d)
        if nxt is None and valid:
            continue
        ds.append(d)
        cur = nxt if nxt is not None else cur
    return state, ds


def outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """A result or the error class name, so that engines compare on failures too."""
    try:
        return fn(*args)
    except ValueError as exc:
        return f"raised {type(exc).__name__}"


def sequential(engine: ModuleType, state: bytes, ds: Sequence[bytes]) -> bytes | None:
    for d in ds:
        try:
            state = engine.apply(state, d)
        except engine.DeltaError:
            return None
    return state


# --------------------------------------------------------------------------- laws, each engine


@SETTINGS
@given(histories(valid=True))
def test_merge_is_sequential_apply(engines: ModuleType, history: tuple[bytes, list[bytes]]) -> None:
    state, ds = history
    expected = sequential(engines, state, ds)
    assert expected is not None  # the generator keeps only deltas that apply
    try:
        merged = engines.merge(ds)
    except engines.DeltaError as exc:
        assert "cannot be merged into one delta" in str(exc)
        return
    assert canon(engines.apply(state, merged)) == canon(expected)
    assert len(merged) <= sum(len(d) for d in ds) + 64


@SETTINGS
@given(histories(kinds="patch", valid=True, max_len=8))
def test_patches_always_merge(engines: ModuleType, history: tuple[bytes, list[bytes]]) -> None:
    state, ds = history
    merged = engines.merge(ds)
    assert canon(engines.apply(state, merged)) == canon(sequential(engines, state, ds) or b"")


@SETTINGS
@given(histories(kinds="merge", valid=True))
def test_merge_patches_compose(engines: ModuleType, history: tuple[bytes, list[bytes]]) -> None:
    state, ds = history
    try:
        merged = engines.merge(ds)
    except engines.DeltaError as exc:
        assert "cannot be merged into one delta" in str(exc)
        return
    assert canon(engines.apply(state, merged)) == canon(sequential(engines, state, ds) or b"")
    # The composition holds on every state, not only the one the deltas were made on.
    for other in (b"{}", b"[]", b'{"a":{"b":1},"c":[1]}'):
        assert canon(engines.apply(other, merged)) == canon(sequential(engines, other, ds) or b"")


@SETTINGS
@given(histories())
def test_compact_is_sequential_skipping_failures(
    engines: ModuleType, history: tuple[bytes, list[bytes]]
) -> None:
    state, ds = history
    expected = state
    for d in ds:
        with contextlib.suppress(engines.DeltaError):
            expected = engines.apply(expected, d)
    assert engines.compact(state, ds) == expected


@SETTINGS
@given(histories(), STATES)
def test_diff_takes_a_to_b(
    engines: ModuleType, history: tuple[bytes, list[bytes]], unrelated: Any
) -> None:
    a, ds = history
    near = engines.compact(a, ds)  # a small change of a
    for b in (near, dumps(unrelated)):
        d = engines.diff(a, b)
        assert canon(engines.apply(a, d)) == canon(b)
    assert engines.diff(a, a) == b'{"patch":[]}'


@SETTINGS
@given(histories(), st.integers(0, 6))
def test_room_state_follows_compact_and_apply_batch(
    engines: ModuleType, history: tuple[bytes, list[bytes]], split: int
) -> None:
    state, ds = history
    room = engines.RoomState(state, 100)
    first, rest = ds[:split], ds[split:]
    cur = state
    for i, d in enumerate(first, start=101):
        try:
            nxt: bytes | None = engines.apply(cur, d)
        except engines.DeltaError:
            nxt = None
        assert room.apply(d, i) is (nxt is not None)
        cur = nxt if nxt is not None else cur
        assert room.to_json() == cur
    old = room.to_json()
    batch = room.apply_batch(rest, room.seq + len(rest))
    assert room.seq == 100 + len(ds)
    assert room.to_json() == engines.compact(state, ds)
    assert canon(engines.apply(old, batch)) == canon(room.to_json())
    assert room.json_size() == len(room.to_json())
    assert json.loads(engines.msgpack_to_json(room.to_msgpack())) == json.loads(room.to_json())


# --------------------------------------------------------------------------- native == pure


@SETTINGS
@given(histories())
def test_native_matches_pure_on_apply_compact_merge(
    pure: ModuleType, native: ModuleType, history: tuple[bytes, list[bytes]]
) -> None:
    state, ds = history
    for d in ds:
        assert outcome(native.apply, state, d) == outcome(pure.apply, state, d)
        assert outcome(native.validate, d) == outcome(pure.validate, d)
    assert native.compact(state, ds) == pure.compact(state, ds)
    assert outcome(native.merge, ds) == outcome(pure.merge, ds)
    assert native.json_to_msgpack(state) == pure.json_to_msgpack(state)


@SETTINGS
@given(histories(valid=True), STATES)
def test_native_matches_pure_on_diff(
    pure: ModuleType, native: ModuleType, history: tuple[bytes, list[bytes]], unrelated: Any
) -> None:
    a, ds = history
    for b in (pure.compact(a, ds), dumps(unrelated)):
        assert native.diff(a, b) == pure.diff(a, b)


@SETTINGS
@given(histories(), st.integers(0, 6))
def test_native_matches_pure_room_state(
    pure: ModuleType, native: ModuleType, history: tuple[bytes, list[bytes]], split: int
) -> None:
    state, ds = history
    rooms = [pure.RoomState(state), native.RoomState(state)]
    for i, d in enumerate(ds[:split], start=1):
        assert rooms[1].apply(d, i) == rooms[0].apply(d, i)
        assert outcome(rooms[1].check, d) == outcome(rooms[0].check, d)
        assert rooms[1].to_json() == rooms[0].to_json()
    rest = ds[split:]
    seq = rooms[0].seq + len(rest)
    assert rooms[1].apply_batch(rest, seq) == rooms[0].apply_batch(rest, seq)
    assert rooms[1].to_json() == rooms[0].to_json()
    assert rooms[1].to_msgpack() == rooms[0].to_msgpack()


# Deltas near the limits: arrays and strings around the work budget (WORK_BASE units), a
# size limit close to the state's size, removals from the middle of an object.
LIMIT_OPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "remove", "copy", "move", "deep", "null", "grow"]),
        st.integers(0, 2**20),
    ),
    min_size=1,
    max_size=4,
)


def limit_delta(kind: str, n: int, size: int) -> bytes:
    if kind == "null":
        return json.dumps({"merge": {"o": {f"k{n % 40}": None, f"k{n % 7}": None}}}).encode()
    if kind == "grow":
        return json.dumps({"merge": {f"g{n % 3}": "z" * (n % 64)}}).encode()
    at = n % (size + 1)
    ops: dict[str, dict[str, Any]] = {
        "insert": {"op": "add", "path": f"/a/{at}", "value": n},
        "remove": {"op": "remove", "path": f"/a/{at}"},
        "copy": {"op": "copy", "from": "/s", "path": f"/c{n % 3}"},
        "move": {"op": "move", "from": f"/o/k{n % 40}", "path": f"/o/m{n % 5}"},
        "deep": {"op": "move", "from": "/s", "path": "/o/s"},  # charged: len(s)
    }
    op = ops[kind]
    extra = [{"op": "remove", "path": f"/o/k{(n + 1) % 40}"}] if n % 2 else []
    return json.dumps({"patch": [op, *extra], "pad": "p" * (n % 200)}).encode()


@SETTINGS
@given(
    st.integers(0, 2000),
    st.integers(-200, 200),
    st.lists(LIMIT_OPS, min_size=1, max_size=6),
    st.integers(-1, 60),
)
def test_native_matches_pure_at_the_limits(
    pure: ModuleType,
    native: ModuleType,
    spread: int,
    string_spread: int,
    deltas: list[list[tuple[str, int]]],
    slack: int,
) -> None:
    # Budgets here are WORK_BASE + 32 * (60 .. 300 bytes): arrays and strings on both sides.
    size = pure.WORK_BASE - 1000 + spread * 8
    state = json.dumps(
        {
            "a": list(range(size)),
            "s": "x" * (pure.WORK_BASE + string_spread * 40),
            "o": {f"k{i}": i for i in range(40)},
        },
        separators=(",", ":"),
    ).encode()
    max_bytes = 0 if slack < 0 else len(state) + slack
    rooms = [pure.RoomState(state, 0, max_bytes), native.RoomState(state, 0, max_bytes)]
    seq = 0
    applied = []
    for ops in deltas:
        for kind, n in ops:
            d = limit_delta(kind, n, size)
            seq += 1
            assert outcome(rooms[1].check, d) == outcome(rooms[0].check, d), d[:200]
            ok = rooms[1].apply(d, seq)
            assert ok == rooms[0].apply(d, seq), d[:200]
            applied.append((d, ok))
        assert rooms[1].to_json() == rooms[0].to_json()
        assert rooms[1].json_size() == rooms[0].json_size() == len(rooms[0].to_json())
    ds = [d for d, _ in applied]
    want = rooms[0].to_json()
    assert native.compact(state, ds, max_bytes) == pure.compact(state, ds, max_bytes) == want
    for engine in (pure, native):
        batch = engine.RoomState(state, 0, max_bytes)
        batch.apply_batch(ds, len(ds))
        assert batch.to_json() == want

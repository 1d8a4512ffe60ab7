"""Pure-Python twin of the native delta engine (`kasagi_relay._native`, see `_native.pyi`).

Both implementations must give the same results; the tests hold them together. The exact
rules, where RFC 6902 / RFC 7396 or the stub leave room:

JSON in and out
- Input is `bytes` (strict UTF-8, no BOM) or `str` (no lone surrogates); anything else is
  `TypeError`. Output is compact UTF-8 JSON (`,` and `:` separators, non-ASCII unescaped,
  control characters as `\\b \\f \\n \\r \\t` or `\\u00xx`): `json.dumps` with
  `separators=(",", ":")` and `ensure_ascii=False`.
- Floats are written as Python's `repr` writes them (the native engine formats them the
  same way): shortest round-trip digits, `1e+16`, `1.5e-07`, `100.0`, `-0.0`.
- Numbers as serde_json parses them: integers in [-2**63, 2**64-1] stay integers, others
  become floats; `-0` is the float `-0.0`; a literal beyond the double range (`1e400`) and
  NaN/Infinity are errors. An escaped lone surrogate (`"\\ud800"`) is an error.
- Depth: a scalar has depth 0, a container 1 + the deepest child. Every input document
  (state, the whole delta document, MessagePack) may nest at most MAX_DEPTH = 128 levels;
  deeper input (even 100,000 levels) is a DeltaError. An operation that would make the
  state deeper than MAX_DEPTH fails.
- Object key order: insertion order, except that removing a member (remove, the remove
  half of move, a merge patch null) moves the LAST member into its place, as IndexMap's
  `swap_remove` does in the native engine (O(1) there; emulated here in O(n), which is fine
  for the oracle). JSON objects are unordered (RFC 8259): only determinism matters, and both
  engines give the same bytes.

Deltas
- `{"patch": [...]}` or `{"merge": ...}`, exactly one of them, other keys ignored.
- Ops that the engine writes (merge, diff, apply_batch) are canonical:
  `{"op", "from"?, "path", "value"?}`, unknown members dropped (RFC 6902 4 ignores them);
  validate() returns the body as sent, only compacted.
- JSON Pointer: "" or starting with "/"; `~` must be followed by `0` or `1`. An array
  index is `0` or digits without a leading zero, below the length (or equal to it for
  add); `-` means "after the last element" for add, move and copy targets only.
- Removing the root ("" path of remove, or moving "" anywhere but "") is an error;
  replace "" and add "" replace the whole document.
- `test` compares JSON values: numbers numerically and exactly (1 == 1.0,
  2**53+1 != 2.0**53), booleans never equal numbers, objects regardless of key order.
- A failing patch changes nothing. Errors are `DeltaError`, named like
  `op 2 (remove /a/b): path not found`.

Limits (the native engine's rules, `rust/apply.rs`; docs/design.md)
- Work budget: a patch of N bytes may use WORK_BASE + WORK_PER_BYTE * N units: a copy costs
  the compact JSON length of the copied value, so does a move into a deeper path; an array
  insert or removal costs one unit per element shifted (len - index, len - 1 - index).
  Nothing else is charged. Past it the patch fails: DeltaError "delta needs too much work"
  (`bad_patch`), in apply, check, compact and RoomState alike.
- Size limit (RoomState(max_bytes=...), compact(..., max_bytes=...); 0 = none): a delta
  that would make the state's compact JSON longer than max_bytes and longer than before
  fails with TooLarge (a DeltaError), checked after every op of a patch (the native engine
  checks before each op that grows the state: the same decisions), so a state never passes
  its limit, not even in the middle of a patch.
- Memory limit (RoomState(max_memory=...), compact(..., max_memory=...); 0 = none): the
  same rule for the native engine's memory estimate of the state, its JSON length plus
  NODE_BYTES per node and MEMBER_BYTES per object member (`_weight`), whichever engine
  runs, so that both refuse the same deltas; TooLarge "... take about N bytes of memory".

merge(ds)
- Patches concatenate, then collapse (see `_collapse`): test ops dropped; a replace or
  object-member add is dropped when a later write overwrites its path (or an ancestor)
  and nothing in between reads, writes below or shifts it; an add followed by a replace
  of the same path becomes one add; an add followed by a remove of it is kept.
- Merge patches compose into one merge patch, per key of the later one: null -> null;
  object over object -> compose; object over a non-object or a deleted key -> DeltaError
  ("cannot be merged into one delta"); other values replace.
- A merge patch whose value is not an object sets the whole document, so it is the same as
  `replace ""`: it composes with anything; a merge object after it folds into one
  `{"patch": [{"op": "replace", "path": "", ...}]}`. Other mixes of the two kinds are a
  DeltaError. Empty input: `{"patch": []}`.
- Equivalence is of JSON values: object key order may differ from the sequential result.

RoomState.apply_batch returns merge(the deltas that applied) when that exists, else a patch
of concrete operations (merge patches turned into add/remove/replace against the state they
applied to), collapsed like merge().
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple, TypeAlias

import msgpack

__all__ = [
    "IMPLEMENTATION",
    "MAX_DEPTH",
    "WORK_BASE",
    "WORK_PER_BYTE",
    "DeltaError",
    "RoomState",
    "TooLarge",
    "apply",
    "compact",
    "diff",
    "json_to_msgpack",
    "merge",
    "msgpack_to_json",
    "validate",
    "validate_request",
]

IMPLEMENTATION: Final = "python"
MAX_DEPTH: Final = 128
WORK_BASE: Final = 16_384
WORK_PER_BYTE: Final = 32
NODE_BYTES: Final = 72
MEMBER_BYTES: Final = 48
_TOO_MUCH_WORK: Final = "delta needs too much work"

Json: TypeAlias = Any
Tokens: TypeAlias = tuple[str, ...]


class DeltaError(ValueError):
    """Bad input: malformed JSON or delta, or a patch that cannot apply."""


class TooLarge(DeltaError):
    """A delta that would take the state past its size limit (max_bytes)."""


class _Fail(Exception):
    """An operation failed; the caller adds the op index and path."""


# --------------------------------------------------------------------------- JSON in/out

_I64_MIN: Final = -(2**63)
_U64_MAX: Final = 2**64 - 1

# The C decoder is fast but knows nothing of serde_json's number rules; these catch every
# literal that may need them (long digit runs, 3-digit exponents, `-0`) so that the slow
# decoder with hooks runs only then. False positives (inside strings) only cost time.
_NEEDS_HOOKS = re.compile(r"\d{19}|[eE]\+?0*[1-9]\d\d|-0(?![.eE\d])")
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_int(s: str) -> int | float:
    if s == "-0":
        return -0.0
    if len(s) > 21:
        return _parse_float(s)
    v = int(s)
    if _I64_MIN <= v <= _U64_MAX:
        return v
    return _parse_float(s)


def _parse_float(s: str) -> float:
    v = float(s)
    if v in (float("inf"), float("-inf")):
        raise DeltaError(f"number out of range: {s[:40]}")
    return v


def _parse_constant(s: str) -> Json:
    raise DeltaError(f"invalid JSON: {s} is not a JSON value")


_DEC_FAST: Final = json.JSONDecoder(parse_constant=_parse_constant)
_DEC_SLOW: Final = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def _text(doc: bytes | str, what: str) -> str:
    if isinstance(doc, str):
        if not doc.isascii():
            try:
                doc.encode("utf-8")
            except UnicodeEncodeError:
                raise DeltaError(f"{what}: not valid Unicode (lone surrogate)") from None
        return doc
    if isinstance(doc, bytes | bytearray | memoryview):
        try:
            return bytes(doc).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DeltaError(f"{what}: not valid UTF-8 ({exc.reason} at {exc.start})") from None
    raise TypeError(f"{what}: expected bytes or str, not {type(doc).__name__}")


def _depth(v: Json, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of v, or some value > limit as soon as it passes the limit."""
    if type(v) is not dict and type(v) is not list:
        return 0
    level: list[Json] = [v]
    d = 0
    while level:
        d += 1
        if d > limit:
            return d
        nxt: list[Json] = []
        for c in level:
            for x in c.values() if type(c) is dict else c:
                if type(x) is dict or type(x) is list:
                    nxt.append(x)
        level = nxt
    return d


def _loads(doc: bytes | str, what: str) -> Json:
    text = _text(doc, what)
    try:
        dec = _DEC_SLOW if _NEEDS_HOOKS.search(text) else _DEC_FAST
        v = dec.decode(text)
    except DeltaError as exc:
        raise DeltaError(f"{what}: {exc}") from None
    except RecursionError:
        raise DeltaError(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and int() of > 4300 digits
        raise DeltaError(f"{what}: invalid JSON: {exc}") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(v) > MAX_DEPTH:
        raise DeltaError(f"{what}: nested deeper than {MAX_DEPTH} levels")
    if "\\u" in text and _MAYBE_SURROGATE.search(text):
        try:
            _ENC.encode(v).encode("utf-8")
        except UnicodeEncodeError:
            raise DeltaError(f"{what}: invalid JSON: lone surrogate in \\u escape") from None
    return v


_ENC: Final = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)


def _dumps(v: Json) -> bytes:
    return _ENC.encode(v).encode("utf-8")


def _clone(v: Json) -> Json:
    t = type(v)
    if t is dict:
        return {k: _clone(x) for k, x in v.items()}
    if t is list:
        return [_clone(x) for x in v]
    return v


def _json_eq(a: Json, b: Json) -> bool:
    """RFC 6902 4.6 equality: numbers by value, booleans apart from numbers."""
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta is int or ta is float:
        return (tb is int or tb is float) and a == b
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(_json_eq(x, y) for x, y in zip(a, b, strict=True))
    if ta is dict:
        return len(a) == len(b) and all(k in b and _json_eq(x, b[k]) for k, x in a.items())
    return bool(a == b)


def _same(a: Json, b: Json) -> bool:
    """Same JSON value that serialises the same: 1 and 1.0 differ, and 0.0 and -0.0."""
    ta = type(a)
    if ta is not type(b):
        return False
    if ta is float:
        return bool(a == b) and (a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b))
    if ta is dict:
        return a.keys() == b.keys() and all(_same(x, b[k]) for k, x in a.items())
    if ta is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --------------------------------------------------------------------------- pointers


def _parse_pointer(p: str) -> Tokens:
    if p == "":
        return ()
    if p[0] != "/":
        raise _Fail("invalid JSON Pointer: must be empty or start with '/'")
    toks = p[1:].split("/")
    if "~" in p:
        for t in toks:
            if re.search(r"~(?![01])", t):
                raise _Fail("invalid JSON Pointer: '~' must be followed by '0' or '1'")
        toks = [t.replace("~1", "/").replace("~0", "~") for t in toks]
    return tuple(toks)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1") if ("~" in key or "/" in key) else key


_INDEX = re.compile(r"0|[1-9][0-9]*")


def _index_like(t: str) -> bool:
    return t == "-" or _INDEX.fullmatch(t) is not None


def _index(t: str, n: int, for_add: bool) -> int:
    if t == "-":
        if for_add:
            return n
        raise _Fail("'-' (after the last element) does not exist here")
    if _INDEX.fullmatch(t) is None:
        raise _Fail(f"invalid array index {t!r}")
    if len(t) > 19 or int(t) > n or (int(t) == n and not for_add):
        raise _Fail(f"array index {t} out of range")
    return int(t)


# --------------------------------------------------------------------------- operations

_OPS: Final = frozenset(("add", "remove", "replace", "move", "copy", "test"))


class _Op:
    __slots__ = ("frm", "ftoks", "idx", "op", "path", "ptoks", "value")

    def __init__(
        self,
        idx: int,
        op: str,
        path: str,
        ptoks: Tokens,
        value: Json = None,
        frm: str | None = None,
        ftoks: Tokens = (),
    ) -> None:
        self.idx = idx
        self.op = op
        self.path = path
        self.ptoks = ptoks
        self.value = value
        self.frm = frm
        self.ftoks = ftoks

    def label(self) -> str:
        return f"op {self.idx} ({self.op} {self.path})"

    def as_json(self) -> dict[str, Json]:
        d: dict[str, Json] = {"op": self.op}
        if self.frm is not None:
            d["from"] = self.frm
        d["path"] = self.path
        if self.op in ("add", "replace", "test"):
            d["value"] = self.value
        return d


def _parse_ops(patch: Json) -> list[_Op]:
    if type(patch) is not list:
        raise DeltaError('"patch" must be an array of operations')
    ops: list[_Op] = []
    for i, o in enumerate(patch):
        if type(o) is not dict:
            raise DeltaError(f"op {i}: not an object")
        name = o.get("op")
        if type(name) is not str:
            raise DeltaError(f'op {i}: missing or non-string "op"')
        if name not in _OPS:
            raise DeltaError(f"op {i} ({name}): unknown operation")
        path = o.get("path")
        if type(path) is not str:
            raise DeltaError(f'op {i} ({name}): missing or non-string "path"')
        label = f"op {i} ({name} {path})"
        try:
            ptoks = _parse_pointer(path)
        except _Fail as exc:
            raise DeltaError(f"{label}: {exc}") from None
        op = _Op(i, name, path, ptoks)
        if name in ("add", "replace", "test"):
            if "value" not in o:
                raise DeltaError(f'{label}: missing "value"')
            op.value = o["value"]
        elif name in ("move", "copy"):
            frm = o.get("from")
            if type(frm) is not str:
                raise DeltaError(f'{label}: missing or non-string "from"')
            try:
                op.ftoks = _parse_pointer(frm)
            except _Fail as exc:
                raise DeltaError(f'{label}: "from": {exc}') from None
            op.frm = frm
        ops.append(op)
    return ops


_TEXT_TYPES: Final = (bytes, bytearray, memoryview, str)


def _deltas(ds: Sequence[bytes | str]) -> list[bytes | str]:
    """The items of a sequence of deltas, type-checked before any work starts."""
    if isinstance(ds, str | bytes):
        raise TypeError("expected a sequence of deltas, not a single str/bytes")
    items = list(ds)
    for d in items:
        if not isinstance(d, _TEXT_TYPES):
            raise TypeError(f"expected bytes or str, not {type(d).__name__}")
    return items


def _max_arg(max_bytes: int, name: str = "max_bytes") -> int:
    if type(max_bytes) is not int or not 0 <= max_bytes <= _U64_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**64), not {max_bytes!r}")
    return max_bytes


class _Limits(NamedTuple):
    """A state's limits (0: none): its compact JSON length and its memory estimate."""

    max_bytes: int = 0
    max_memory: int = 0


_NO_LIMITS: Final = _Limits()


def _weight(v: Json) -> int:
    """The structure part of the native engine's memory estimate (rust/json.rs `weight`)."""
    if isinstance(v, list):
        return NODE_BYTES + sum(_weight(x) for x in v)
    if isinstance(v, dict):
        return NODE_BYTES + sum(MEMBER_BYTES + _weight(x) for x in v.values())
    return NODE_BYTES


class _Size(NamedTuple):
    json: int
    weight: int

    @property
    def memory(self) -> int:
        return self.json + self.weight


def _size_of(root: Json, out: bytes | None = None) -> _Size:
    return _Size(len(_dumps(root) if out is None else out), _weight(root))


def _seq_arg(seq: int) -> int:
    if type(seq) is not int or seq < 0:
        raise ValueError(f"seq must be a non-negative integer, not {seq!r}")
    if seq > _U64_MAX:
        raise ValueError(f"seq must be a non-negative integer below 2**64, not {seq}")
    return seq


def _parse_delta(d: bytes | str, what: str = "delta") -> tuple[str, Json]:
    """(kind, body): ("patch", list[_Op]) or ("merge", value)."""
    return _parse_delta_doc(_loads(d, what), what)


def _parse_delta_doc(doc: Json, what: str) -> tuple[str, Json]:
    if type(doc) is not dict:
        raise DeltaError(f'{what}: must be an object with "patch" or "merge"')
    has_p, has_m = "patch" in doc, "merge" in doc
    if has_p == has_m:
        raise DeltaError(f'{what}: must have exactly one of "patch" and "merge"')
    if has_m:
        return "merge", doc["merge"]
    try:
        return "patch", _parse_ops(doc["patch"])
    except DeltaError as exc:
        if what == "delta":
            raise
        raise DeltaError(f"{what}: {exc}") from None


class _Doc:
    """The document being patched, boxed so that a root replacement can be undone."""

    __slots__ = ("root",)

    def __init__(self, root: Json) -> None:
        self.root = root


# Undo log entries: (kind, container, key, old). Replayed in reverse on failure.
_U_ROOT, _U_DEL_KEY, _U_SET_KEY, _U_PUT_KEY_BACK, _U_DEL_ITEM, _U_INS_ITEM, _U_SET_ITEM = range(7)
Undo: TypeAlias = list[tuple[int, Any, Any, Any]]


def _rollback(doc: _Doc, log: Undo) -> None:
    for kind, c, k, old in reversed(log):
        if kind == _U_ROOT:
            doc.root = old
        elif kind == _U_DEL_KEY:
            del c[k]
        elif kind in (_U_SET_KEY, _U_SET_ITEM):
            c[k] = old
        elif kind == _U_PUT_KEY_BACK:
            # Undo a swap_remove: append k, then swap-remove the member that took its
            # place (k moves back there) and append that one again, as the native engine.
            v, moved = old
            c[k] = v
            if moved is not None:
                mv, _ = _swap_pop(c, moved)
                c[moved] = mv
        elif kind == _U_DEL_ITEM:
            del c[k]
        else:
            c.insert(k, old)
    log.clear()


class _Work:
    """The work budget left to a patch (see the module doc)."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def charge(self, units: int) -> None:
        if units > self.left:
            raise _Fail(_TOO_MUCH_WORK)
        self.left -= units


_NO_LIMIT: Final = 2**64 - 1


def _budget(d: bytes | str | bytearray | memoryview) -> int:
    """The work budget of delta `d` (by its length in UTF-8 bytes)."""
    if isinstance(d, str):
        n = len(d) if d.isascii() else len(d.encode("utf-8", "surrogatepass"))
    elif isinstance(d, memoryview):
        n = d.nbytes
    else:
        n = len(d)
    return WORK_BASE + WORK_PER_BYTE * n


def _swap_pop(d: dict[str, Json], k: str) -> tuple[Json, str | None]:
    """Remove member k the way IndexMap's swap_remove does: the last member takes its place.
    Returns (its value, the key of the member that moved, or None)."""
    last = next(reversed(d))
    if last == k:
        return d.pop(k), None
    keys = list(d)
    i = keys.index(k)
    v = d.pop(k)
    # A dict only appends: re-append `last`, then every member that followed k, so that
    # `last` ends up in k's place (O(n - i)).
    d[last] = d.pop(last)
    for key in keys[i + 1 : -1]:
        d[key] = d.pop(key)
    return v, last


def _check_size(old: _Size, new: _Size, lim: _Limits, label: str = "") -> None:
    """TooLarge when `new` passes a limit and is larger than `old` (rust/apply.rs
    `limit_error`: the JSON length first, then the memory estimate)."""
    if lim.max_bytes and new.json > lim.max_bytes and new.json > old.json:
        raise TooLarge(
            f"{label}the delta would make the state {new.json} bytes, "
            f"past its limit of {lim.max_bytes}"
        )
    m, max_memory = new.memory, lim.max_memory
    if max_memory and m > max_memory and m > old.memory:
        raise TooLarge(
            f"{label}the delta would make the state take about {m} bytes of memory, "
            f"past its limit of {max_memory}"
        )


def _get(root: Json, toks: Iterable[str]) -> Json:
    cur = root
    for t in toks:
        tc = type(cur)
        if tc is dict:
            try:
                cur = cur[t]
            except KeyError:
                raise _Fail("path not found") from None
        elif tc is list:
            cur = cur[_index(t, len(cur), False)]
        else:
            raise _Fail("path not found")
    return cur


def _check_room(toks: Tokens, v: Json) -> None:
    if (type(v) is dict or type(v) is list) and len(toks) + _depth(v) > MAX_DEPTH:
        raise _Fail(f"the result would nest deeper than {MAX_DEPTH} levels")


def _add(doc: _Doc, toks: Tokens, v: Json, log: Undo | None, work: _Work) -> None:
    _check_room(toks, v)
    if not toks:
        if log is not None:
            log.append((_U_ROOT, None, None, doc.root))
        doc.root = v
        return
    parent = _get(doc.root, toks[:-1])
    last = toks[-1]
    tp = type(parent)
    if tp is dict:
        if last in parent:
            if log is not None:
                log.append((_U_SET_KEY, parent, last, parent[last]))
        elif log is not None:
            log.append((_U_DEL_KEY, parent, last, None))
        parent[last] = v
    elif tp is list:
        i = _index(last, len(parent), True)
        work.charge(len(parent) - i)
        parent.insert(i, v)
        if log is not None:
            log.append((_U_DEL_ITEM, parent, i, None))
    else:
        raise _Fail("path not found (parent is not an object or array)")


def _remove(doc: _Doc, toks: Tokens, log: Undo | None, work: _Work) -> Json:
    if not toks:
        raise _Fail("cannot remove the whole document")
    parent = _get(doc.root, toks[:-1])
    last = toks[-1]
    tp = type(parent)
    if tp is dict:
        if last not in parent:
            raise _Fail("path not found")
        v, moved = _swap_pop(parent, last)
        if log is not None:
            log.append((_U_PUT_KEY_BACK, parent, last, (v, moved)))
        return v
    if tp is list:
        i = _index(last, len(parent), False)
        work.charge(len(parent) - 1 - i)
        v = parent.pop(i)
        if log is not None:
            log.append((_U_INS_ITEM, parent, i, v))
        return v
    raise _Fail("path not found")


def _replace(doc: _Doc, toks: Tokens, v: Json, log: Undo | None) -> None:
    _check_room(toks, v)
    if not toks:
        if log is not None:
            log.append((_U_ROOT, None, None, doc.root))
        doc.root = v
        return
    parent = _get(doc.root, toks[:-1])
    last = toks[-1]
    tp = type(parent)
    if tp is dict:
        if last not in parent:
            raise _Fail("path not found")
        if log is not None:
            log.append((_U_SET_KEY, parent, last, parent[last]))
        parent[last] = v
    elif tp is list:
        i = _index(last, len(parent), False)
        if log is not None:
            log.append((_U_SET_ITEM, parent, i, parent[i]))
        parent[i] = v
    else:
        raise _Fail("path not found")


def _apply_op(doc: _Doc, op: _Op, log: Undo | None, work: _Work) -> None:
    name = op.op
    if name == "add":
        _add(doc, op.ptoks, _clone(op.value), log, work)
    elif name == "replace":
        _replace(doc, op.ptoks, _clone(op.value), log)
    elif name == "remove":
        _remove(doc, op.ptoks, log, work)
    elif name == "test":
        if not _json_eq(_get(doc.root, op.ptoks), op.value):
            raise _Fail("test failed: the value differs")
    elif name == "copy":
        src = _get(doc.root, op.ftoks)
        work.charge(len(_dumps(src)))  # the copy's JSON length, as the native engine
        _add(doc, op.ptoks, _clone(src), log, work)
    else:  # move
        f, p = op.ftoks, op.ptoks
        if f == p:
            _get(doc.root, f)
            return
        if len(p) > len(f) and p[: len(f)] == f:
            raise _Fail(f"cannot move {op.frm!r} into its own child")
        if len(p) > len(f):
            # The depth check walks the value: charged like a copy.
            work.charge(len(_dumps(_get(doc.root, f))))
        # A failing add leaves the value removed: callers roll back or discard the doc.
        v = _remove(doc, f, log, work)
        _add(doc, p, v, log, work)


def _apply_ops(
    doc: _Doc, ops: Sequence[_Op], log: Undo | None, budget: int, lim: _Limits = _NO_LIMITS
) -> None:
    """All ops or (with a log, after rollback by the caller) none; raises DeltaError."""
    work = _Work(budget)
    limited = lim != _NO_LIMITS
    start = _size_of(doc.root) if limited else _Size(0, 0)
    for op in ops:
        try:
            _apply_op(doc, op, log, work)
            if limited:
                _check_size(start, _size_of(doc.root), lim, f"{op.label()}: ")
        except _Fail as exc:
            raise DeltaError(f"{op.label()}: {exc}") from None


def _merge_apply(target: Json, patch: Json) -> Json:
    """RFC 7396 MergePatch, in place on target; never shares containers with patch."""
    if type(patch) is not dict:
        return _clone(patch)
    if type(target) is not dict:
        target = {}
    for k, v in patch.items():
        if v is None:
            if k in target:
                _swap_pop(target, k)
        else:
            target[k] = _merge_apply(target.get(k), v)
    return target


# --------------------------------------------------------------------------- merge


def _compose(a: dict[str, Json], b: dict[str, Json], path: str) -> dict[str, Json]:
    """One merge patch with the effect of a then b (both objects)."""
    r = dict(a)
    for k, bv in b.items():
        if type(bv) is dict and k in a:
            av = a[k]
            if type(av) is not dict:
                raise DeltaError(
                    f"cannot be merged into one delta: {path}/{_escape(k)} is set to a "
                    "non-object or deleted, then merged into"
                )
            r[k] = _compose(av, bv, f"{path}/{_escape(k)}")
        else:
            r[k] = bv
    return r


def _root_replace(v: Json) -> _Op:
    return _Op(0, "replace", "", (), v)


def _fold(items: Sequence[tuple[str, Json]]) -> tuple[str, Json]:
    """Fold parsed deltas left to right into ("merge", value) or ("patch", list[_Op])."""
    acc: tuple[str, Json] = ("patch", [])
    first = True
    for kind, body in items:
        if first:
            acc = (kind, list(body) if kind == "patch" else body)
            first = False
            continue
        akind, abody = acc
        if kind == "merge":
            if type(body) is not dict:
                acc = (
                    ("merge", body)
                    if akind == "merge"
                    else ("patch", [*abody, _root_replace(body)])
                )
            elif akind == "merge" and type(abody) is dict:
                acc = ("merge", _compose(abody, body, ""))
            elif akind == "merge":  # the state is exactly abody now
                acc = ("patch", [_root_replace(_merge_apply(_clone(abody), body))])
            else:
                raise DeltaError(
                    "cannot be merged into one delta: a JSON Merge Patch object after a JSON Patch"
                )
        elif akind == "patch":
            acc = ("patch", [*abody, *body])
        elif type(abody) is not dict:
            acc = ("patch", [_root_replace(abody), *body])
        else:
            raise DeltaError(
                "cannot be merged into one delta: a JSON Patch after a JSON Merge Patch object"
            )
    return acc


def _locations(op: _Op) -> list[tuple[Tokens, bool]]:
    """(pointer, may shift array indices of its siblings) for every place op touches."""
    p = op.ptoks
    p_shift = op.op in ("add", "remove", "move", "copy") and bool(p) and _index_like(p[-1])
    locs = [(p, p_shift)]
    if op.op in ("move", "copy"):
        f = op.ftoks
        locs.append((f, op.op == "move" and bool(f) and _index_like(f[-1])))
    return locs


def _kills(e: _Op, w: _Op) -> bool:
    """Does w overwrite everything e wrote (given nothing in between relates to e's path)?"""
    if w.op not in ("add", "replace", "remove"):
        return False
    p, q = e.ptoks, w.ptoks
    if len(q) > len(p) or p[: len(q)] != q:
        return False
    object_add = w.op == "add" and (not q or not _index_like(q[-1]))
    if len(q) < len(p):
        return w.op != "add" or object_add
    if w.op == "replace":
        return True
    if w.op == "add":
        return object_add
    return e.op == "replace"  # remove after add: the path may not have existed before


def _collapse(ops: Sequence[_Op]) -> list[_Op]:
    """Drop test ops and writes that a later write overwrites.

    An op E = `replace p` or an object-member `add p` (last token not an array index or
    `-`, or p the root) is dropped when the first later op that relates to p is a write W
    that overwrites p: replace/remove of p or an ancestor, or an add of p or an ancestor
    whose last token is not an index (an index add inserts, it does not overwrite). A
    later op relates to p when one of its pointers (path or from) is p, an ancestor or a
    descendant of p, or it inserts into / removes from an array that is an ancestor of p
    (which may shift p). Exceptions keep it exact on every state where the ops all apply:
    `add p` then `remove p` is kept (p may not have existed before); `add p` then
    `replace p` becomes one `add p` with the later value.
    """
    work = [
        _Op(o.idx, o.op, o.path, o.ptoks, o.value, o.frm, o.ftoks) for o in ops if o.op != "test"
    ]
    n = len(work)
    kept = [True] * n
    # Index of the earliest kept later op at a pointer / strictly below it / shifting its
    # children. Walking backwards, the op seen last is the earliest.
    at: dict[Tokens, int] = {}
    below: dict[Tokens, int] = {}
    shifts: dict[Tokens, int] = {}
    for e in range(n - 1, -1, -1):
        o = work[e]
        p = o.ptoks
        if o.op == "replace" or (o.op == "add" and (not p or not _index_like(p[-1]))):
            m = n
            for table, key in ((at, p), (below, p)):
                m = min(m, table.get(key, n))
            for i in range(len(p)):
                anc = p[:i]
                m = min(m, at.get(anc, n), shifts.get(anc, n))
            if m < n and _kills(o, work[m]):
                kept[e] = False
                w = work[m]
                if o.op == "add" and p and w.op == "replace" and w.ptoks == p:
                    w.op = "add"
                continue
        for toks, shifting in _locations(o):
            at[toks] = e
            for i in range(len(toks)):
                below[toks[:i]] = e
            if shifting:
                shifts[toks[:-1]] = e
    return [o for o, k in zip(work, kept, strict=True) if k]


def _delta_bytes(acc: tuple[str, Json]) -> bytes:
    kind, body = acc
    if kind == "merge":
        return _dumps({"merge": body})
    return _dumps({"patch": [o.as_json() for o in _collapse(body)]})


# --------------------------------------------------------------------------- diff


def _diff(a: Json, b: Json, path: str, out: list[dict[str, Json]]) -> None:
    ta, tb = type(a), type(b)
    if ta is dict and tb is dict:
        for k in a:
            if k not in b:
                out.append({"op": "remove", "path": f"{path}/{_escape(k)}"})
        for k, bv in b.items():
            if k in a:
                _diff(a[k], bv, f"{path}/{_escape(k)}", out)
            else:
                out.append({"op": "add", "path": f"{path}/{_escape(k)}", "value": bv})
    elif ta is list and tb is list:
        _diff_list(a, b, path, out)
    elif not _same(a, b):
        out.append({"op": "replace", "path": path, "value": b})


def _diff_list(a: list[Json], b: list[Json], path: str, out: list[dict[str, Json]]) -> None:
    """Index-wise after trimming the common head and tail, so that one insertion or
    removal anywhere is one op."""
    na, nb = len(a), len(b)
    m = min(na, nb)
    head = 0
    while head < m and _same(a[head], b[head]):
        head += 1
    tail = 0
    while tail < m - head and _same(a[na - 1 - tail], b[nb - 1 - tail]):
        tail += 1
    ca, cb = na - head - tail, nb - head - tail
    common = min(ca, cb)
    for i in range(head, head + common):
        _diff(a[i], b[i], f"{path}/{i}", out)
    for i in range(head + ca - 1, head + common - 1, -1):
        out.append({"op": "remove", "path": f"{path}/{i}"})
    for i in range(head + common, head + cb):
        out.append({"op": "add", "path": f"{path}/{i}", "value": b[i]})


# --------------------------------------------------------------------------- public API


def validate(d: bytes | str) -> tuple[str, bytes]:
    """Check that `d` is a well-formed delta; return (kind, compact JSON body)."""
    doc = _loads(d, "delta")
    kind, _ = _parse_delta_doc(doc, "delta")
    # The body as sent (compacted, unknown op members kept), like the native engine.
    return kind, _dumps(doc[kind])


def validate_request(
    d: bytes | str,
) -> tuple[dict[str, str | int | bool | None], str, bytes] | None:
    """`validate` of a whole request message and its other top-level members, or None
    (see the native engine's stub)."""
    try:
        doc = _loads(d, "delta")
    except DeltaError:
        return None
    if type(doc) is not dict or ("patch" in doc) == ("merge" in doc):
        return None
    fields: dict[str, str | int | bool | None] = {}
    for k, v in doc.items():
        if k == "patch" or k == "merge":
            continue
        # Integers past 64 bits and `-0` parse as floats here too.
        if v is None or type(v) is str or type(v) is bool or type(v) is int:
            fields[k] = v
        else:
            return None
    kind = "patch" if "patch" in doc else "merge"
    try:
        if kind == "patch":
            _parse_ops(doc["patch"])
    except DeltaError:
        return None
    return fields, kind, _dumps(doc[kind])


def apply(state: bytes | str, d: bytes | str) -> bytes:
    """Apply one delta to a state; a failing RFC 6902 patch raises DeltaError."""
    kind, body = _parse_delta(d)
    root = _loads(state, "state")
    if kind == "merge":
        return _dumps(_merge_apply(root, body))
    doc = _Doc(root)
    # The parsed state is ours: no undo needed on failure.
    _apply_ops(doc, body, None, _budget(d))
    return _dumps(doc.root)


def merge(ds: Sequence[bytes | str]) -> bytes:
    """One delta equivalent to `ds` in order on every state where they all apply."""
    items = [_parse_delta(d, f"delta {i}") for i, d in enumerate(_deltas(ds))]
    if not items:
        return b'{"patch":[]}'
    return _delta_bytes(_fold(items))


def diff(a: bytes | str, b: bytes | str) -> bytes:
    """A {"patch": [...]} delta taking a to b."""
    va, vb = _loads(a, "a"), _loads(b, "b")
    out: list[dict[str, Json]] = []
    _diff(va, vb, "", out)
    return _dumps({"patch": out})


def _apply_limited(
    doc: _Doc, kind: str, body: Json, log: Undo, budget: int, lim: _Limits, old_size: _Size
) -> bytes | None:
    """Apply one parsed delta atomically under the work budget and limits (old_size: the
    state's size before, read only with a limit). Raises DeltaError (TooLarge included)
    with doc unchanged. Returns the new state's JSON when it was made (a limit)."""
    limited = lim != _NO_LIMITS
    if kind == "merge":
        if not limited:
            doc.root = _merge_apply(doc.root, body)
            return None
        root = _merge_apply(_clone(doc.root), body)
        merged = _dumps(root)
        _check_size(old_size, _size_of(root, merged), lim)
        doc.root = root
        return merged
    # One op other than move fails before it changes anything: no undo log needed. With a
    # limit, a patch that applied may still be rolled back (TooLarge).
    needs_log = limited or len(body) > 1 or (body and body[0].op == "move")
    out: bytes | None = None
    try:
        _apply_ops(doc, body, log if needs_log else None, budget, lim)
        if limited:
            out = _dumps(doc.root)
            _check_size(old_size, _size_of(doc.root, out), lim)
    except DeltaError:
        _rollback(doc, log)
        raise
    log.clear()
    return out


def compact(
    state: bytes | str, ds: Sequence[bytes | str], max_bytes: int = 0, max_memory: int = 0
) -> bytes:
    """Apply `ds` in order; a delta that is malformed or fails at its position (too much
    work and TooLarge included) is a no-op."""
    todo = _deltas(ds)
    lim = _Limits(_max_arg(max_bytes), _max_arg(max_memory, "max_memory"))
    doc = _Doc(_loads(state, "state"))
    size = _size_of(doc.root) if lim != _NO_LIMITS else _Size(0, 0)
    log: Undo = []
    for d in todo:
        try:
            kind, body = _parse_delta(d)
            out = _apply_limited(doc, kind, body, log, _budget(d), lim, size)
        except DeltaError:
            continue
        if out is not None:
            size = _size_of(doc.root, out)
    return _dumps(doc.root)


def json_to_msgpack(doc: bytes | str) -> bytes:
    """Re-encode a JSON document as MessagePack."""
    return bytes(msgpack.packb(_loads(doc, "document"), use_bin_type=True))


def _check_from_msgpack(v: Json) -> None:
    level: list[Json] = [v]
    d = 0
    while level:
        nxt: list[Json] = []
        for x in level:
            t = type(x)
            if t is dict or t is list:
                if d + 1 > MAX_DEPTH:
                    raise DeltaError(f"MessagePack: nested deeper than {MAX_DEPTH} levels")
                if t is dict:
                    for k in x:
                        if type(k) is not str:
                            raise DeltaError("MessagePack: map keys must be strings")
                    nxt.extend(x.values())
                else:
                    nxt.extend(x)
            elif t is float:
                if x != x or x in (float("inf"), float("-inf")):
                    raise DeltaError("MessagePack: NaN and infinities have no JSON form")
            elif t not in (str, int, bool, type(None)):
                raise DeltaError(f"MessagePack: {t.__name__} has no JSON form")
        level = nxt
        d += 1


class _TooManyContainers(Exception):
    pass


def msgpack_to_json(data: bytes, max_containers: int = 0) -> bytes:
    """Re-encode a MessagePack document as JSON (maps must have string keys); past
    `max_containers` arrays and maps (0 = no limit), DeltaError at once."""
    if type(max_containers) is not int or not 0 <= max_containers <= _U64_MAX:
        raise ValueError(
            f"max_containers must be a non-negative integer below 2**64, not {max_containers!r}"
        )
    return _msgpack_to_json(data, max_containers or _U64_MAX)[0]


def msgpack_to_json_counted(data: bytes, budget: int) -> tuple[bytes, int]:
    """msgpack_to_json under an exact budget of arrays and maps (0: none), and how many it
    read: one budget for every member of a message."""
    if type(budget) is not int or not 0 <= budget <= _U64_MAX:
        raise ValueError(f"budget must be a non-negative integer below 2**64, not {budget!r}")
    return _msgpack_to_json(data, budget)


def _msgpack_to_json(data: bytes, max_containers: int) -> tuple[bytes, int]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, not {type(data).__name__}")
    count = 0

    # Called as each container is complete: the unpacking stops at the first one past
    # the cap, so at most max_containers of them are ever built.
    def counted(x: Any) -> Any:
        nonlocal count
        count += 1
        if count > max_containers:
            raise _TooManyContainers
        return x

    hooks: dict[str, Any] = {"list_hook": counted, "object_hook": counted}
    try:
        v = msgpack.unpackb(data, raw=False, strict_map_key=False, **hooks)
    except _TooManyContainers:
        raise DeltaError(
            f"MessagePack: a document may hold at most {max_containers} arrays and objects"
        ) from None
    except Exception as exc:  # msgpack raises many types for bad input
        raise DeltaError(f"MessagePack: invalid data: {exc}") from None
    _check_from_msgpack(v)
    try:
        return _dumps(v), count
    except UnicodeEncodeError:  # pragma: no cover - msgpack rejects bad UTF-8 already
        raise DeltaError("MessagePack: invalid UTF-8 in a string") from None


def _merge_to_ops(target: Json, patch: Json, path: str, out: list[_Op]) -> None:
    """Concrete JSON Patch ops doing what merge patch `patch` does to `target`."""
    if type(patch) is not dict:
        out.append(_Op(0, "replace", path, _parse_pointer(path), _clone(patch)))
        return
    if type(target) is not dict:
        v = _merge_apply(None, patch)
        out.append(_Op(0, "add" if path else "replace", path, _parse_pointer(path), v))
        return
    for k, v in patch.items():
        p = f"{path}/{_escape(k)}"
        if v is None:
            if k in target:
                out.append(_Op(0, "remove", p, _parse_pointer(p)))
        elif type(v) is dict and type(target.get(k)) is dict:
            _merge_to_ops(target[k], v, p, out)
        else:
            out.append(_Op(0, "add", p, _parse_pointer(p), _merge_apply(None, v)))


class RoomState:
    """One room's state, parsed once and patched in place; encodings cached."""

    __slots__ = ("_doc", "_failed", "_json", "_log", "_max", "_msgpack", "_seq")

    def __init__(
        self, state: bytes | str = b"{}", seq: int = 0, max_bytes: int = 0, max_memory: int = 0
    ) -> None:
        self._seq = _seq_arg(seq)
        self._max = _Limits(_max_arg(max_bytes), _max_arg(max_memory, "max_memory"))
        self._doc = _Doc(_loads(state, "state"))
        self._json: bytes | None = None
        self._msgpack: bytes | None = None
        self._log: Undo = []
        self._failed: list[int] = []

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def max_bytes(self) -> int:
        return self._max.max_bytes

    @property
    def max_memory(self) -> int:
        return self._max.max_memory

    def __repr__(self) -> str:
        return f"<RoomState seq={self._seq}>"

    def _old_size(self) -> _Size:
        return _size_of(self._doc.root, self.to_json()) if self._max != _NO_LIMITS else _Size(0, 0)

    def check(self, d: bytes | str) -> None:
        """DeltaError when d is malformed, would fail now or needs too much work; TooLarge
        when it would take the state past max_bytes. Changes nothing."""
        kind, body = _parse_delta(d)
        old = self._old_size()
        if kind == "merge":
            if self._max != _NO_LIMITS:
                new = _size_of(_merge_apply(_clone(self._doc.root), body))
                _check_size(old, new, self._max)
            return
        try:
            _apply_ops(self._doc, body, self._log, _budget(d), self._max)
            if self._max != _NO_LIMITS:
                _check_size(old, _size_of(self._doc.root), self._max)
        finally:
            _rollback(self._doc, self._log)

    def _apply_one(self, d: bytes | str) -> tuple[str, Json] | None:
        """Parse and apply d under the limits; None (a no-op) when it failed."""
        try:
            kind, body = _parse_delta(d)
            old = self._old_size()
            out = _apply_limited(self._doc, kind, body, self._log, _budget(d), self._max, old)
        except DeltaError:
            return None
        self._json, self._msgpack = out, None
        return kind, body

    def apply(self, d: bytes | str, seq: int) -> bool:
        """Apply d as delta number seq; False (a no-op, seq advances) when it fails."""
        _seq_arg(seq)
        if not isinstance(d, _TEXT_TYPES):
            raise TypeError(f"expected bytes or str, not {type(d).__name__}")
        if seq <= self._seq:
            raise ValueError(f"seq {seq} is not after the room's seq {self._seq}")
        self._seq = seq
        return self._apply_one(d) is not None

    def apply_batch(self, ds: Sequence[bytes | str], seq: int) -> bytes:
        """Apply deltas self.seq+1 .. seq; one delta from the previous state to the new."""
        _seq_arg(seq)
        todo = _deltas(ds)
        if seq < self._seq or len(todo) != seq - self._seq:
            raise ValueError(f"{len(todo)} deltas cannot take seq {self._seq} to {seq}")
        applied: list[tuple[str, Json]] = []
        concrete: list[_Op] = []
        self._failed = []
        for at, d in enumerate(todo, self._seq + 1):
            before: list[_Op] = []
            try:
                kind, body = _parse_delta(d)
            except DeltaError:
                self._failed.append(at)
                continue
            if kind == "merge":
                _merge_to_ops(self._doc.root, body, "", before)
            if self._apply_one(d) is None:
                self._failed.append(at)
                continue
            concrete.extend(before if kind == "merge" else body)
            applied.append((kind, body))
        self._seq = seq
        if not applied:
            return b'{"patch":[]}'
        try:
            return _delta_bytes(_fold(applied))
        except DeltaError:
            return _delta_bytes(("patch", concrete))

    def failed(self) -> list[int]:
        """The seqs among the last apply_batch's deltas that failed (no-ops), in order."""
        return list(self._failed)

    def to_json(self) -> bytes:
        if self._json is None:
            self._json = _dumps(self._doc.root)
        return self._json

    def to_msgpack(self) -> bytes:
        if self._msgpack is None:
            self._msgpack = bytes(msgpack.packb(self._doc.root, use_bin_type=True))
        return self._msgpack

    def json_size(self) -> int:
        return len(self.to_json())

    def copy(self) -> RoomState:
        """An independent room with the same state, seq and limits."""
        other = RoomState.__new__(RoomState)
        other._seq, other._max = self._seq, self._max
        other._doc = _Doc(_clone(self._doc.root))
        other._json, other._msgpack, other._log = self._json, None, []
        return other

    def memory_size(self) -> int:
        """The native engine's memory estimate of the state (see Limits above)."""
        return len(self.to_json()) + _weight(self._doc.root)

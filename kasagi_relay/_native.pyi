"""Type stub of the native delta engine (`rust/`, built by maturin as `kasagi_relay._native`).

The pure-Python twin `kasagi_relay._pydelta` has exactly this API, except `send_frame` at
the end (the relay's broadcast loop, not part of the engine). `kasagi_relay.delta` picks one
of the two at import time.

Conventions shared by both implementations:
- JSON arguments are `bytes` (UTF-8) or `str`; JSON results are `bytes`.
- A delta is the JSON object `{"patch": [...]}` (RFC 6902) or `{"merge": ...}` (RFC 7396);
  any other top-level key is ignored, exactly one of the two must be present.
- Documents nest at most `MAX_DEPTH` levels (serde_json's parser limit); deeper input is a
  `DeltaError`, never a crash.
- Integers outside the signed/unsigned 64-bit range become floats (as serde_json does);
  a number that overflows a double (`1e400`) is a `DeltaError`.
- Every error caused by the input is `DeltaError`; its message names the failing operation
  index and JSON Pointer when there is one, e.g. `op 2 (remove /a/b): path not found`.
- Object members: removing one (remove, move, a merge patch null) moves the LAST member
  into its place (IndexMap `swap_remove`, O(1)); JSON objects are unordered (RFC 8259) and
  both engines compute the same order, so the same bytes.

Limits (exact rules in `rust/apply.rs` and `_pydelta.py`; docs/design.md):
- Work budget: a patch of N bytes (UTF-8) may use `WORK_BASE + WORK_PER_BYTE * N` units;
  a copy (or a move into a deeper path) costs the compact JSON length of the value, an
  array insert/removal one unit per element shifted. Past it: `DeltaError("... delta needs
  too much work")` (`bad_patch` on the wire), in `apply`, `compact`, `RoomState.check`,
  `.apply` and `.apply_batch` alike (a failing delta is a no-op, deterministically).
- Size limit: `RoomState(max_bytes=...)` and `compact(..., max_bytes=...)` (0 = none). A
  delta that would make the state's compact JSON longer than `max_bytes` and longer than
  before fails with `TooLarge` (a `DeltaError`; `too_large` on the wire). It is checked
  at every op of a patch, before anything is cloned: a state never passes its limit, not
  even in the middle of a patch. The state's size is kept exact incrementally:
  `json_size()` is O(1) and never serialises.
- Memory limit: `RoomState(max_memory=...)` and `compact(..., max_memory=...)` (0 = none).
  The same rule for the state's memory estimate, `memory_size()`: its compact JSON length
  plus `NODE_BYTES` per node (scalar or container) and `MEMBER_BYTES` per object member,
  the engine's parsed representation (a `serde_json::Value` per node, an IndexMap entry
  and hash index per member). Kept exact incrementally like the size (O(1) to read); a
  copy is measured before it is cloned. Past it: `TooLarge` "... take about N bytes of
  memory, past its limit of M". Both engines compute the same estimate, so refuse the
  same deltas.

Which calls may cost time in the size of the STATE (run them off the event loop, e.g.
`asyncio.to_thread`; all of them release the GIL while they work):
- `RoomState(state)`, `to_json()`/`to_msgpack()` after a change (then cached),
  `apply_batch`, `compact`, `diff`, `apply`, `json_to_msgpack`, `msgpack_to_json`
  (these take whole documents);
- `RoomState.check` and `RoomState.apply` of a delta larger than 4 KiB, of a merge patch,
  or of a patch that copies/moves, drops a large value (remove/replace of a big subtree
  costs its size to measure and free), or inserts into an array larger than 64 elements.
Bounded by the DELTA's size whatever the state's (safe on the loop): `validate`, `merge`
(of its inputs), `json_size`, `seq`, and `RoomState.apply` of a patch of at most 4 KiB
whose every op is small (`rust/apply.rs` `apply_patch_bounded`): that case keeps the GIL
(cheaper than releasing it), every other case releases it. The work budget caps what any
one patch may copy or shift, so even the state-sized cases stay proportional to the
delta apart from measuring and freeing what it removes.
"""

from collections.abc import Sequence

IMPLEMENTATION: str
MAX_DEPTH: int
WORK_BASE: int
WORK_PER_BYTE: int
NODE_BYTES: int
MEMBER_BYTES: int

class DeltaError(ValueError): ...

class TooLarge(DeltaError):
    """The delta would take the state past its `max_bytes` (see Limits above)."""

def validate(d: bytes | str) -> tuple[str, bytes]:
    """Check that `d` is a well-formed delta; return (kind, body) where kind is "patch" or
    "merge" and body is the compact JSON of the patch array / merge object."""

def validate_request(
    d: bytes | str,
) -> tuple[dict[str, str | int | bool | None], str, bytes] | None:
    """`validate` of a whole request message, with its other top-level members read in the
    same parse: (those members in document order, a repeated one with its last value; kind;
    body as `validate` gives it). None when the message is anything else: not valid, not an
    object, no or both of "patch" and "merge", a member that is not a string, an integer
    within -2**63 .. 2**64-1, a boolean or null, or a delta `validate` refuses. Never
    raises but TypeError (not bytes or str)."""

def apply(state: bytes | str, d: bytes | str) -> bytes:
    """Apply one delta to a state. RFC 6902 patches are atomic: on failure (too much work
    included) DeltaError. No size limit."""

def merge(ds: Sequence[bytes | str]) -> bytes:
    """One delta equivalent to applying `ds` in order, on every state where they all apply.
    Runs of JSON Patches collapse repeated writes to one path; merge patches compose into
    one merge patch. Raises DeltaError when no single RFC 6902/7396 delta can express the
    sequence (e.g. a merge patch that deletes a key, mixed with JSON Patches)."""

def diff(a: bytes | str, b: bytes | str) -> bytes:
    """A `{"patch": [...]}` delta taking `a` to `b`, small when the change is small."""

def compact(
    state: bytes | str, ds: Sequence[bytes | str], max_bytes: int = 0, max_memory: int = 0
) -> bytes:
    """Apply `ds` in order to `state`; a delta that fails at its position is a no-op: the
    state a RoomState(state, max_bytes=max_bytes, max_memory=max_memory) reaches by applying
    `ds` one by one (same work budget, same limits), so a room loads from snapshot + ops exactly."""

def json_to_msgpack(doc: bytes | str) -> bytes:
    """Re-encode a JSON document as MessagePack."""

def msgpack_to_json_counted(data: bytes, budget: int) -> tuple[bytes, int]:
    """`msgpack_to_json` under an exact budget of arrays and maps (an int >= 0; 0: none
    may be read), returning the JSON and how many it read, so that the members of one
    message share one budget (protocol.py)."""

def msgpack_to_json(data: bytes, max_containers: int = 0) -> bytes:
    """Re-encode a MessagePack document as JSON (maps must have string keys; a repeated key
    keeps its first position and its last value). Past `max_containers` arrays and maps
    (an int >= 0; 0 = no limit) it stops at once with DeltaError "... may hold at most N
    arrays and objects". Memory in the size of the output, not of a decoded tree."""

class RoomState:
    """One room's state held natively; the relay keeps one per active room.

    Applying a small delta costs time in the size of the delta, not of the state; the
    encoded snapshots are cached until the next change."""

    def __init__(
        self, state: bytes | str = b"{}", seq: int = 0, max_bytes: int = 0, max_memory: int = 0
    ) -> None:
        """`max_bytes` (an int >= 0; 0 = no limit): deltas that would take the state past it
        fail (TooLarge). A state already larger loads, and may shrink. `max_memory`: the
        same for `memory_size()`."""
    @property
    def seq(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def max_memory(self) -> int: ...
    def check(self, d: bytes | str) -> None:
        """Raise DeltaError when `d` is malformed, would fail on the current state or needs
        too much work, TooLarge when it would take the state past max_bytes. Changes
        nothing. Releases the GIL unless `d` is small (<= 4 KiB) and the state too
        (<= 64 KiB), when the work is bounded by their sizes."""
    def apply(self, d: bytes | str, seq: int) -> bool:
        """Apply `d` as the room's delta number `seq` (> self.seq, else ValueError).
        Returns False when it failed at its position and was a no-op (the seq still
        advances): docs/protocol.md's rule. Malformed deltas, too much work and TooLarge
        are no-ops too (`check` first to tell the sender why)."""
    def apply_batch(self, ds: Sequence[bytes | str], seq: int) -> bytes:
        """Apply `ds` (the deltas self.seq+1 .. seq, in order, failures as no-ops) and return
        ONE delta, `{"patch": [...]}` or `{"merge": {...}}`, that takes the previous state to
        the new one. Always succeeds (it knows the state, so merge patches become concrete
        operations when needed). len(ds) must equal seq - self.seq, else ValueError."""
    def failed(self) -> list[int]:
        """The seqs among the last `apply_batch`'s deltas that failed at their position
        (no-ops), in order: the relay replays them as `{"patch": []}`."""
    def to_json(self) -> bytes:
        """The state as compact JSON; cached until the next change."""
    def to_msgpack(self) -> bytes:
        """The state as MessagePack; cached until the next change."""
    def json_size(self) -> int:
        """len(self.to_json()), kept exact as deltas apply: O(1), never serialises."""
    def memory_size(self) -> int:
        """The memory estimate of the state (see Limits above), kept exact: O(1)."""
    def copy(self) -> RoomState:
        """An independent room with the same state, seq and limits (a clone of the parsed
        state: no parse, so about the state's memory once, not the parser's peak; costs
        time in the size of the state, GIL released)."""

# Not part of the engine API: the relay's broadcast loop (kasagi_relay/fanout.py, Unix only)
# and its reading of client frames (kasagi_relay/session.py).

def send_frame(fds: Sequence[int], frame: bytes, /) -> list[tuple[int, int]]:
    """Send `frame` to each socket without blocking (GIL released); returns (position in
    `fds`, bytes taken) for each socket that took less than all of it (would block, or an
    error). The caller passes only sockets whose transport has nothing buffered."""

def read_frames(data: bytes, max_size: int | None, /) -> tuple[list[tuple[int, bytes]], int]:
    """The complete final masked text (opcode 1) and binary (2) frames without RSV bits at
    the start of `data`, each with a payload of at most `max_size` bytes, as (opcode,
    unmasked payload), and how many bytes they take; it stops at the first byte that
    starts anything else (session._data_frames, which it replaces, is the reference)."""
